"""Writing files so that a failed or interrupted run never leaves a half-written one.

Every writer in llmpress goes through `replacing` (a file) or `replacing_directory` (a
directory): write under a temporary name beside the target, fsync, rename onto the
target, fsync the directory. A reader sees the old file or the whole new one, never a
part, and a crash leaves at most a hidden temporary file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmpress.errors import LlmpressError


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
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=directory)
    os.close(fd)
    tmp = Path(name)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=directory))
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
