"""io/files.py, the one way llmpress writes a file or a directory: all or nothing."""

from __future__ import annotations

import os

import pytest

from llmpress.errors import LlmpressError
from llmpress.io.files import replacing, replacing_directory, write_bytes_atomically


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_written_file_replaces_the_old_one_with_ordinary_permissions(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    write_bytes_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask()  # not mkstemp's private 0600
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(LlmpressError, match="does not exist"):
        write_bytes_atomically(tmp_path / "nowhere" / "out.bin", b"x")


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with replacing_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}"
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask()
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError), replacing_directory(failed) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["model"]
    with pytest.raises(LlmpressError, match="exists"), replacing_directory(target):
        pass
