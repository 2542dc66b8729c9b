"""Our torch dequantizers against gguf-py's numpy ones (which match ggml's C code).

Bit-identical float32 results are required: every value, compared as bit patterns.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from ggml_ref import first_call_marked, ggml_quantize
from llmpress.errors import LlmpressError
from llmpress.formats import FORMATS, dequantize_tensor, get_format, supported_names

T = GGMLQuantizationType
ALL_TYPES = list(FORMATS)
N_BLOCKS = 512

# Byte offsets of the fp16 scales inside each block (ggml-common.h), so random blocks
# can be given finite scales while every other byte stays random.
FP16_OFFSETS = {
    T.F16: (0,), T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.IQ1_S: (0,), T.IQ2_XXS: (0,), T.IQ2_XS: (0,),
    T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.TQ1_0: (52,), T.TQ2_0: (64,),
}  # fmt: skip


def random_valid_blocks(ggml_type: GGMLQuantizationType, n_blocks: int, seed: int = 0):
    """Random bytes for every field, finite random fp16 (or f32 / bf16) values for scales."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    if ggml_type == T.F32:
        raw = rng.standard_normal((n_blocks, 1)).astype(np.float32).view(np.uint8)
    elif ggml_type == T.BF16:
        raw = (rng.standard_normal((n_blocks, 1)).astype(np.float32).view(np.uint32) >> 16)
        raw = raw.astype(np.uint16).view(np.uint8)
    for offset in FP16_OFFSETS.get(ggml_type, ()):
        magnitude = 10.0 ** rng.integers(-6, 3, n_blocks)
        scale = (rng.standard_normal(n_blocks) * magnitude).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    if ggml_type == T.IQ1_M:  # d's 16 bits are the top nibbles of the 4 scale words (48..55)
        d = rng.standard_normal(n_blocks).astype(np.float16).view(np.uint16)
        for k in range(4):
            top = ((d >> (4 * k)) & 0x0F).astype(np.uint8) << 4
            raw[:, 49 + 2 * k] = (raw[:, 49 + 2 * k] & 0x0F) | top
    return raw


def assert_bit_identical(ours: torch.Tensor, reference: np.ndarray) -> None:
    ours_np = ours.detach().cpu().numpy()
    assert ours.dtype == torch.float32 and ours_np.shape == reference.shape
    assert not np.isnan(reference).any()
    reference_bits = reference.astype(np.float32).view(np.uint32)
    differing = np.count_nonzero(ours_np.view(np.uint32) != reference_bits)
    assert differing == 0, f"{differing} values differ from gguf"


def gguf_reference(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    block_size = GGML_QUANT_SIZES[ggml_type][0]
    return gguf_quants.dequantize(raw, ggml_type).reshape(raw.shape[0], block_size)


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_gguf(ggml_type: GGMLQuantizationType) -> None:
    raw = random_valid_blocks(ggml_type, N_BLOCKS)
    ours = get_format(ggml_type).dequantize_blocks(torch.from_numpy(raw))
    assert_bit_identical(ours, gguf_reference(raw, ggml_type))


@pytest.mark.parametrize("type_name", first_call_marked(t.name for t in ALL_TYPES))
def test_ggml_quantized_blocks_match_gguf(type_name: str) -> None:
    """Realistic blocks, made by ggml's own quantizer from Gaussian weights."""
    ggml_type = T[type_name]
    rng = np.random.default_rng(1)
    values = rng.standard_normal((16, 1024)).astype(np.float32)
    importance = rng.uniform(0.1, 2.0, 1024).astype(np.float32)  # the very-low-bit types need one
    needs_importance = ggml_type.name.startswith("IQ")
    raw = ggml_quantize(ggml_type.name, values, importance if needs_importance else None)
    raw = raw.reshape(-1, GGML_QUANT_SIZES[ggml_type][1])
    ours = get_format(ggml_type).dequantize_blocks(torch.from_numpy(raw))
    assert_bit_identical(ours, gguf_reference(raw, ggml_type))


def test_whole_tensor_shape_and_strided_input() -> None:
    """dequantize_tensor reshapes rows; a non-contiguous / odd-offset byte view works too."""
    raw = random_valid_blocks(T.Q4_K, 6)
    padded = np.zeros(raw.size + 1, dtype=np.uint8)
    padded[1:] = raw.reshape(-1)
    view = torch.from_numpy(padded)[1:]  # storage offset 1: fp16 fields are misaligned
    ours = dequantize_tensor(view, "q4_k", (3, 512))
    assert ours.shape == (3, 512)
    assert_bit_identical(ours, gguf_quants.dequantize(raw.reshape(3, -1), T.Q4_K))


def test_get_format_accepts_enum_name_and_number() -> None:
    for ggml_type, fmt in FORMATS.items():
        assert get_format(ggml_type) is fmt
        assert get_format(ggml_type.name.lower()) is fmt
        assert get_format(int(ggml_type)) is fmt
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[ggml_type]


@pytest.mark.parametrize("bad", ["q4_9", T.MXFP4, 9999])
def test_get_format_rejects_unknown_types_with_the_supported_list(bad) -> None:
    with pytest.raises(LlmpressError) as info:
        get_format(bad)
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in supported_names())


def test_default_model_tensors_match_gguf(default_model_path) -> None:
    """Every tensor of the real SmolLM2 Q4_1 GGUF (Q4_1, Q8_0, F32) dequantizes exactly
    (its first 256 rows: every tensor, without minutes of numpy reference work)."""
    reader = GGUFReader(default_model_path)
    seen = set()
    for tensor in reader.tensors:
        ggml_type = T(tensor.tensor_type)
        row_length = int(tensor.shape[0])  # GGUF lists dims innermost first
        row_bytes = get_format(ggml_type).row_bytes(row_length)
        rows = np.asarray(tensor.data).view(np.uint8).reshape(-1, row_bytes)
        rows = rows[:256]
        shape = (rows.shape[0], row_length)
        ours = dequantize_tensor(torch.from_numpy(rows.reshape(-1).copy()), ggml_type, shape)
        assert_bit_identical(ours, gguf_quants.dequantize(rows, ggml_type).reshape(shape))
        seen.add(ggml_type)
    assert {T.Q4_1, T.Q8_0} <= seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_cuda_matches_gguf(ggml_type: GGMLQuantizationType) -> None:
    raw = random_valid_blocks(ggml_type, N_BLOCKS, seed=2)
    ours = get_format(ggml_type).dequantize_blocks(torch.from_numpy(raw).cuda())
    assert ours.device.type == "cuda"
    assert_bit_identical(ours, gguf_reference(raw, ggml_type))
