"""Writing files so that a failed or interrupted run never leaves a half-written one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmpress.errors import LlmpressError


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block succeeds and
    removed when it fails."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise LlmpressError(f"cannot write {path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# --- reading untrusted text files --------------------------------------------------------
def read_text_file(path: str | os.PathLike) -> str:
    """A file a model directory ships, as UTF-8 text; anything else is one clear error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LlmpressError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise LlmpressError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_json_file(path: str | os.PathLike) -> Any:
    """Parsed JSON of a file a model directory ships. Nesting too deep for the parser is
    refused like any other malformed JSON (json raises RecursionError there)."""
    text = read_text_file(path)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise LlmpressError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise LlmpressError(f"{path}: not valid JSON (nested too deeply)") from None
