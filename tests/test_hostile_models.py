"""Hostile model files, one minimal reproduction per defect class of issue 16: each must
give one clear error line naming the key or tensor, never a crash, a hang, a giant
allocation or a traceback. The cases that used to crash the process natively run in a
subprocess, so a regression fails the test instead of killing pytest."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import pytest
from fuzz import gguf_layout as g

from llmpress.cli import main

U32, U64, F32, STRING, ARRAY = 4, 10, 6, 8, 9


@pytest.fixture(scope="module")
def real_bytes(default_model_path) -> bytes:
    return default_model_path.read_bytes()


def one_error_line(status: int, err: str) -> str:
    assert status == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def run_in_process(path, capsys, *extra) -> str:
    status = main(["info", str(path), *extra])
    return one_error_line(status, capsys.readouterr().err)


def run_in_subprocess(path) -> str:
    """`llmpress run` asking for two tokens; a native crash shows as a negative status."""
    done = subprocess.run([sys.executable, "-m", "llmpress.cli", "run", str(path), "-p", "Hi",
                           "-n", "2", "--temp", "0"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode >= 0, f"killed by signal {-done.returncode}: {done.stderr[-2000:]}"
    return one_error_line(done.returncode, done.stderr)


def patched(real_bytes, tmp_path, key, value) -> str:
    data = bytearray(real_bytes)
    g.set_kv(data, key, value)
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    return path


# --- values that reached decode.c and wrote out of bounds / divided by zero ---------------
@pytest.mark.parametrize("key, value, named", [
    ("llama.embedding_length", 1152, "llama.embedding_length is 1152"),  # the segfault
    ("llama.rope.dimension_count", 2**31, "rope.dimension_count"),  # was an 8 GiB arange
    ("llama.rope.dimension_count", 65, "rope.dimension_count"),
    ("llama.rope.dimension_count", 128, "rope.dimension_count"),  # > head size 64
])
def test_metadata_that_crashed_decode(real_bytes, tmp_path, key, value, named):
    assert named in run_in_subprocess(patched(real_bytes, tmp_path, key, value))


def test_key_rows_giving_no_kv_heads(real_bytes, tmp_path):
    """K rows that are not whole heads (n_kv = 0 divided the head count in C)."""
    data = bytearray(real_bytes)
    g.patch(data, g.parse(real_bytes[:1 << 22]).field("tensor-dim:blk.0.attn_k.weight:1"), 32)
    path = tmp_path / "kv.gguf"
    path.write_bytes(data)
    line = run_in_subprocess(path)
    assert "blk.0.attn_k.weight" in line and "head size 64" in line


# --- size fields that drove allocations ---------------------------------------------------
def test_block_count_of_a_billion_is_refused_at_once(real_bytes, tmp_path, capsys):
    path = patched(real_bytes, tmp_path, "llama.block_count", 10**9)
    start = time.perf_counter()
    line = run_in_process(path, capsys)
    assert "llama.block_count is 1000000000" in line and "272 tensors" in line
    assert time.perf_counter() - start < 20


# --- values of the wrong type or out of range ---------------------------------------------
@pytest.mark.parametrize("key, value, named", [
    ("llama.block_count", 0, "llama.block_count must be a positive integer, not 0"),
    ("llama.attention.head_count", 0, "llama.attention.head_count is 0"),
    ("llama.attention.head_count", 1000, "head_count 1000 is larger than embedding_length 576"),
    ("llama.attention.head_count", 7, "blk.0.attn_q.weight has 576 rows"),  # head size 82
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), "layer_norm_rms_epsilon must be"),
    ("llama.rope.freq_base", float("inf"), "rope.freq_base must be a finite positive number"),
    ("tokenizer.ggml.bos_token_id", 2**31, "bos_token_id must be a token id"),
])
def test_out_of_range_values(real_bytes, tmp_path, capsys, key, value, named):
    assert named in run_in_process(patched(real_bytes, tmp_path, key, value), capsys)


@pytest.mark.parametrize("key, vtype, value, named", [
    ("llama.attention.head_count", STRING, "nine", "head_count must be an integer or one per"),
    ("llama.embedding_length", ARRAY, (U32, [576, 576]), "embedding_length must be a positive"),
    ("llama.context_length", U64, 2**63, "context_length must be a positive integer"),
    ("tokenizer.ggml.eos_token_id", STRING, "2", "eos_token_id must be a token id"),
    ("tokenizer.ggml.tokens", ARRAY, (U32, [1, 2, 3]), "tokenizer.ggml.tokens must be a list"),
    ("tokenizer.chat_template", U32, 7, "tokenizer.chat_template must be a string"),
])
def test_values_of_the_wrong_type(real_bytes, tmp_path, capsys, key, vtype, value, named):
    path = tmp_path / "typed.gguf"
    path.write_bytes(g.replace_kv(real_bytes, key, vtype, value))
    assert named in run_in_process(path, capsys)


# --- tensors missing or of the wrong shape ------------------------------------------------
def test_misnamed_tensor(real_bytes, tmp_path, capsys):
    data = bytearray(real_bytes)
    at = data.find(b"blk.3.ffn_up.weight")
    data[at:at + 19] = b"blk.3.ffn_uq.weight"
    path = tmp_path / "renamed.gguf"
    path.write_bytes(data)
    assert "tensor blk.3.ffn_up.weight is missing" in run_in_process(path, capsys)


def test_tensor_shape_disagreeing_with_the_others(real_bytes, tmp_path, capsys):
    data = bytearray(real_bytes)
    layout = g.parse(real_bytes[:1 << 22])
    g.patch(data, layout.field("tensor-dim:blk.5.ffn_down.weight:0"), 1024)  # in: 1536 -> 1024
    path = tmp_path / "shape.gguf"
    path.write_bytes(data)
    line = run_in_process(path, capsys)
    assert "blk.5.ffn_down.weight has shape [576, 1024]" in line and "ffn=1536" in line


def test_half_of_a_bias_group(real_bytes, tmp_path, capsys):
    """Found by the fuzzer: q has a bias, k does not (the runtime takes q/k/v biases as one)."""
    data = g.replace_kv(real_bytes, "general.name", STRING, "x")  # any valid file will do
    from llmpress.io.gguf import load_gguf
    from llmpress.io.source import ModelSource
    from llmpress.models.config import config_from_source
    src = load_gguf(tmp_path.joinpath("m.gguf").write_bytes(data) and tmp_path / "m.gguf")
    q = src.tensors["blk.0.attn_q.weight"]
    bias = type(q)("blk.0.attn_q.bias", q.ggml_type, (576,), 0, q.read_bytes)
    hostile = ModelSource(src.path, src.metadata, {**src.tensors, bias.name: bias},
                          src.file_bytes)
    from llmpress.errors import LlmpressError
    with pytest.raises(LlmpressError, match="tensor blk.0.attn_k.bias is missing"):
        config_from_source(hostile)


def test_names_from_the_file_are_shown_printable():
    """Found by the fuzzer: a mangled tensor name put raw bytes and newlines in the error."""
    from llmpress.io.gguf import shown
    assert shown("blk.1\n\x01.w") == "blk.1\\n\\x01.w"
    assert len(shown("x" * 10_000)) < 130


# --- the reader: nesting and alignment ----------------------------------------------------
def test_deeply_nested_gguf_arrays(tmp_path, capsys):
    nested = struct.pack("<IQ", ARRAY, 1) * 100_000 + struct.pack("<IQ", U32, 0)
    payload = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k"
               + struct.pack("<I", ARRAY) + nested)
    path = tmp_path / "nested.gguf"
    path.write_bytes(payload)
    assert "nests arrays more than 16 deep" in run_in_process(path, capsys)


def test_metadata_that_would_outgrow_the_file(tmp_path, capsys):
    """Found by the fuzzer's memory check: a corrupt length made a token string of the
    rest of the file (75 MB of tensor data), which decoded to 345 MiB of text."""
    rest = b"\xff" * (16 << 20)
    payload = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k"
               + struct.pack("<IQ", STRING, len(rest)) + rest)
    path = tmp_path / "outgrown.gguf"
    path.write_bytes(payload)
    assert "would take more memory than the file's size justifies" in run_in_process(
        path, capsys)
    many = struct.pack("<Q", 0) * (2 << 20)  # 2 M empty strings: 16 MB, ~130 MB as a list
    payload = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k"
               + struct.pack("<IIQ", ARRAY, STRING, 2 << 20) + many)
    path.write_bytes(payload)
    assert "k (2097152 strings) would take more memory" in run_in_process(path, capsys)


def test_alignment_of_the_wrong_type(tmp_path, capsys):
    payload = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + g.encode_value(STRING, "x")[4:]
               [:0] + struct.pack("<Q", 17) + b"general.alignment" + g.encode_value(STRING, "64"))
    path = tmp_path / "align.gguf"
    path.write_bytes(payload)
    assert "general.alignment '64' is not a power of two" in run_in_process(path, capsys)


# --- Hugging Face directories -------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tiny import save_tiny_hf_model
    return save_tiny_hf_model(tmp_path_factory.mktemp("hf"), hidden_size=64,
                              intermediate_size=128, vocab_size=300)


def with_config(hf_dir, tmp_path, **changes):
    import shutil
    target = tmp_path / "model"
    shutil.copytree(hf_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | changes))
    return target


@pytest.mark.parametrize("changes, named", [
    ({"num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000"),
    ({"vocab_size": 10**9}, "config.json implies [1000000000, 64]"),
    ({"rms_norm_eps": 1e400}, "rms_norm_eps must be a positive number, not inf"),
    ({"max_position_embeddings": 2**40}, "context_length must be a positive integer"),
    ({"num_attention_heads": "4"}, "num_attention_heads must be a positive integer"),  # fuzzer
])
def test_hostile_config_json(hf_dir, tmp_path, capsys, changes, named):
    start = time.perf_counter()
    assert named in run_in_process(with_config(hf_dir, tmp_path, **changes), capsys)
    assert time.perf_counter() - start < 20
