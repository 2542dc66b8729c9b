"""Shared fixtures. The real default model comes from PyPI via `llmpress pull`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmpress import hub

DATA = Path(__file__).resolve().parent / "data"  # what tests read; tests/data/README.md
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
REFERENCE = DATA / "reference"  # made with llama.cpp's own tools; see tests/data/README.md
TENSOR_HASHES = REFERENCE / "smollm2-135m-llamacpp-tensors.json"
REFERENCE_IMATRIX = REFERENCE / "smollm2-135m-imatrix-pydoc.gguf"


# The fixtures that bring in the real default model. A test that uses one (directly or
# through another fixture) is `slow`; `pytest -m "not slow"` runs the rest, the fast set.
REAL_MODEL_FIXTURES = {"default_model_path", "f32_gguf"}


def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all overhead: with several threads torch spends its time waking them
    (5x slower on a busy 2-core machine), so modules of tiny models run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, pulled once into the llmpress cache."""
    return hub.pull(hub.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def wikitext_bytes() -> bytes:
    return WIKITEXT.read_bytes()


@pytest.fixture(scope="session")
def f32_gguf(default_model_path, tmp_path_factory) -> Path:
    """The default model dequantized to F32 by gguf-py (independent of our code), every
    metadata field copied: the "original" of tests/data/README.md."""
    path = tmp_path_factory.mktemp("f32") / "SmolLM2-135M-Instruct.F32.gguf"
    return write_f32_gguf(default_model_path, path)


@pytest.fixture(scope="session")
def tiny_f32(default_model_path, tmp_path_factory) -> Path:
    """iquant_files.py's random two-layer Llama, F32."""
    from iquant_files import write_tiny_llama

    return write_tiny_llama(default_model_path, tmp_path_factory.mktemp("tiny") / "tiny.F32.gguf")


@pytest.fixture(scope="session")
def quantized_file(tiny_f32):
    """type name -> the file llama.cpp's quantizer writes from tiny_f32 in that type, made
    once for all the modules that use it (llama.cpp's very-low-bit quantizers are slow)."""
    from iquant_files import llama_quantize

    made: dict[str, Path] = {}

    def make(type_name: str) -> Path:
        if type_name not in made:
            made[type_name] = llama_quantize(tiny_f32, tiny_f32.parent / f"{type_name}.gguf",
                                             type_name)
        return made[type_name]
    return make


def copy_metadata(reader, writer, skip=()) -> None:
    """Every metadata field of a GGUFReader into a GGUFWriter, but those in `skip`, the
    header's and the architecture (the writer writes those itself)."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", *skip):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub_type = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)


def write_f32_gguf(source: Path, path: Path) -> Path:
    """`source` dequantized to F32 by gguf-py, every metadata field copied, at `path`."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(path, reader.fields["general.architecture"].contents())
    copy_metadata(reader, writer)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type)
                          .astype(np.float32, copy=False))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
