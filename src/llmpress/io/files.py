"""Writing files so that a failed or interrupted run never leaves a half-written one.

Every writer in llmpress goes through `replacing` (a file) or `replacing_directory` (a
directory): write under a temporary name beside the target, fsync, rename onto the
target, fsync the directory. A reader sees the old file or the whole new one, never a
part, and a crash leaves at most a hidden temporary file, which the next write to the
same target removes once its writer is dead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmpress.errors import LlmpressError


# --- temporary files beside their target -------------------------------------------------
# A writer's temporary file is named ".<target name>.<writer pid>.<random><suffix>", so the
# next write to the same target can tell the leftovers of dead writers (kill -9, power loss)
# from files that a live writer is still filling, and remove only the former.
LEGACY_LEFTOVER_SECONDS = 3600  # temp names without a pid (older llmpress): removed when stale


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def remove_dead_leftovers(path: Path, suffix: str) -> list[Path]:
    """Remove the temporary files of dead writers of `path`; -> the files removed."""
    removed = []
    prefix = f".{path.name}."
    directory = path.parent if str(path.parent) else Path(".")
    try:
        candidates = [p for p in directory.iterdir()
                      if p.name.startswith(prefix) and p.name.endswith(suffix)]
    except OSError:
        return removed
    for leftover in candidates:
        middle = leftover.name[len(prefix):-len(suffix)]
        pid = middle.split(".", 1)[0]
        try:
            if pid.isdigit() and "." in middle:
                dead = not _process_alive(int(pid))
            else:
                dead = time.time() - leftover.stat().st_mtime > LEGACY_LEFTOVER_SECONDS
            if dead:
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
                removed.append(leftover)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def temp_file_beside(path: Path, suffix: str) -> tuple[int, Path]:
    """(open fd, path) of a new temporary file in path's directory, after removing the
    leftovers of dead writers of path."""
    remove_dead_leftovers(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix,
                               dir=path.parent if str(path.parent) else Path("."))
    return fd, Path(tmp)


def _directory_of(path: Path) -> Path:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise LlmpressError(f"cannot write {path}: directory {directory} does not exist")
    return directory


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk, where the platform
    allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode(directory: bool) -> int:
    """The permissions a new file or directory gets under the current umask (mkstemp and
    mkdtemp make theirs private)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def replacing(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path`; when the block succeeds the file written there is
    fsynced and renamed onto `path`, and when it fails it is removed."""
    path = Path(path)
    directory = _directory_of(path)
    fd, tmp = temp_file_beside(path, suffix)
    os.close(fd)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(directory)


@contextmanager
def replacing_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside `path` (which must not exist yet); when the block
    succeeds every file in it is fsynced and the directory renamed to `path`, and when it
    fails it is removed with its contents."""
    path = Path(path)
    directory = _directory_of(path)
    if path.exists():
        raise LlmpressError(f"{path} exists; choose a new directory")
    remove_dead_leftovers(path, ".dir")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".dir",
                                dir=directory))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        os.chmod(tmp, _default_mode(directory=True))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(directory)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


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
