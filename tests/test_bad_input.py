"""Bad model files and paths: one clear error line, exit status 1, no traceback."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFWriter

from llmpress.cli import main


def run_info(path, capsys) -> str:
    status = main(["info", str(path)])
    err = capsys.readouterr().err
    assert status == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def gguf_header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def tiny_model_file(path, arch="llama", tensor_type=None):
    """A structurally valid GGUF with one tensor (enough to reach the model checks)."""
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    else:  # raw bytes labelled with another ggml type id
        writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.uint8),
                          raw_shape=(8, 32), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
def test_missing_path(tmp_path, capsys):
    assert "no such file" in run_info(tmp_path / "nope.gguf", capsys)


def test_text_file_is_not_a_model(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am not a model\n" * 10)
    assert "not a GGUF file" in run_info(path, capsys)


def test_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert "not a GGUF file" in run_info(path, capsys)


def test_directory_without_config(tmp_path, capsys):
    assert "config.json" in run_info(tmp_path, capsys)


def test_truncated_real_model(tmp_path, capsys, default_model_path):
    path = tmp_path / "truncated.gguf"
    with open(default_model_path, "rb") as src:
        path.write_bytes(src.read(20_000_000))
    assert "past the end of the file" in run_info(path, capsys)


def test_truncated_inside_header(tmp_path, capsys, default_model_path):
    path = tmp_path / "header.gguf"
    with open(default_model_path, "rb") as src:
        path.write_bytes(src.read(100_000))  # ends inside the vocabulary array
    assert "truncated or corrupt" in run_info(path, capsys)


@pytest.mark.parametrize("payload, message", [
    (gguf_header(2**60, 0), "tensor count"),
    (gguf_header(0, 2**62), "metadata count"),
    # a key whose length claims an exabyte
    (gguf_header(0, 1) + struct.pack("<Q", 2**60), "metadata key length"),
    # an array value claiming 2^58 uint32 items
    (gguf_header(0, 1) + gguf_string("k") + struct.pack("<IIQ", 9, 4, 2**58), "array length"),
    # a tensor with 2^50 x 2^50 elements at offset 0
    (gguf_header(1, 0) + gguf_string("t") + struct.pack("<IQQIQ", 2, 2**50, 2**50, 0, 0),
     "impossible dimensions"),
    # a tensor with 9 dimensions
    (gguf_header(1, 0) + gguf_string("t") + struct.pack("<I", 9), "dimensions"),
])
def test_absurd_header_sizes(tmp_path, capsys, payload, message):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(payload + b"\0" * 64)
    assert message in run_info(path, capsys)


def test_unknown_tensor_type_id(tmp_path, capsys):
    payload = gguf_header(1, 0) + gguf_string("t") + struct.pack("<IQIQ", 1, 32, 250, 0)
    path = tmp_path / "type.gguf"
    path.write_bytes(payload + b"\0" * 64)
    assert "unknown tensor type id 250" in run_info(path, capsys)


def test_unsupported_architecture(tmp_path, capsys):
    path = tiny_model_file(tmp_path / "gemma.gguf", arch="gemma")
    line = run_info(path, capsys)
    assert "architecture 'gemma' is not supported" in line and "llama" in line


def test_unsupported_tensor_type(tmp_path, capsys):
    from gguf import GGMLQuantizationType
    path = tiny_model_file(tmp_path / "iq2.gguf", tensor_type=GGMLQuantizationType.I8)
    line = run_info(path, capsys)
    assert "I8" in line and "Q4_K" in line  # names the type and lists the supported ones


def test_missing_metadata_key(tmp_path, capsys):
    path = tiny_model_file(tmp_path / "llama.gguf")  # no head count, no layers' tensors
    assert "is missing" in run_info(path, capsys)


@pytest.mark.slow
def test_no_traceback_from_the_real_command(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 40)
    done = subprocess.run([sys.executable, "-m", "llmpress.cli", "info", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: ")


@pytest.mark.slow
def test_bad_arguments_exit_nonzero():
    done = subprocess.run([sys.executable, "-m", "llmpress.cli", "run"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "usage:" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["bench", "smollm2", "-t", "0"], "argument -t/--threads: 0 is below 1"),
    (["run", "smollm2", "-p", "hi", "--threads", "-2"], "argument -t/--threads: -2 is below 1"),
    (["bench", "smollm2", "-d", "-5"], "argument -d/--depth: -5 is below 0"),
    (["bench", "smollm2", "-t", "two"], "argument -t/--threads: 'two' is not an integer"),
])
def test_bad_counts_are_refused_before_loading(args, message, capsys):
    """A thread count below 1 or a negative depth: the option named, exit status 2, and
    no model is loaded (the check is argparse's)."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
