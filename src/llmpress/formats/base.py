"""The contract every block format follows.

A GGUF tensor is a sequence of fixed-size blocks: `block_size` values stored in
`type_size` bytes. A format class holds one pure pair:

    quantize(values, importance)  float32 (n_blocks, block_size) -> uint8 (n_blocks, type_size)
    dequantize(blocks)            uint8 (n_blocks, type_size)    -> float32 (n_blocks, block_size)

vectorized over all blocks at once. `dequantize` is torch (it runs at model run time, on
CPU or CUDA); `quantize_blocks` is numpy float32 (bit-exactness with ggml's C code needs
control of every rounding). The base class does the reshaping and the shape/dtype checks,
and its `quantize` of whole tensors runs the C quantizers of quantize.c (cquant.py) when
they are built: the same bytes, at C speed, on all cores. The numpy ports stay the
readable reference and the fallback.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llmpress.errors import LlmpressError
from llmpress.formats import cquant


class BlockFormat:
    name: str
    ggml_type: GGMLQuantizationType
    block_size: int  # values per block  } both from gguf's GGML_QUANT_SIZES, the one
    type_size: int  # bytes per block    } table of them, when a subclass names its type
    writable = True  # False: llmpress reads this type but has no quantizer for it

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "ggml_type" in cls.__dict__:
            cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.ggml_type]

    # --- the pure pair each subclass implements -------------------------------------
    def quantize_blocks(self, values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError(f"quantizing to {self.name} is not implemented")

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_row_blocks(
        self, values: np.ndarray, weights: np.ndarray | None, row_length: int
    ) -> np.ndarray:
        """quantize_blocks for blocks that tile whole rows of `row_length` values, in order.

        Some ggml quantizers use a statistic of the whole row (the legacy types' imatrix
        path scales weights by the row's mean square); those formats override this.
        """
        return self.quantize_blocks(values, weights)

    # --- whole tensors ---------------------------------------------------------------
    def row_bytes(self, row_length: int) -> int:
        if row_length % self.block_size:
            raise ValueError(f"{self.name} needs rows that are a multiple of {self.block_size}")
        return row_length // self.block_size * self.type_size

    def dequantize(self, raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """uint8 bytes of a whole tensor -> float32 tensor of `shape` (last dim = row)."""
        n_values = int(np.prod(shape))
        assert raw.dtype == torch.uint8 and raw.numel() * self.block_size == n_values * self.type_size
        blocks = raw.reshape(-1, self.type_size)
        return self.dequantize_blocks(blocks).reshape(shape)

    def quantize(self, values: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """float32 (..., row) -> uint8 (..., row_bytes). `importance` is per column (row,).

        The one place that picks the engine: the C quantizers (cquant) when built, else
        the numpy ports below (same bytes)."""
        if not self.writable:
            raise LlmpressError(f"llmpress reads {self.name} but cannot write it; "
                                "quantize to it with llama.cpp's llama-quantize")
        values = np.ascontiguousarray(values, dtype=np.float32)
        row = values.shape[-1]
        if row % self.block_size:
            raise LlmpressError(
                f"{self.name} needs rows that are a multiple of {self.block_size} values, "
                f"got rows of {row}"
            )
        if importance is not None:
            importance = np.ascontiguousarray(importance, dtype=np.float32)
            if importance.shape != (row,):
                raise LlmpressError(
                    f"importance has shape {importance.shape}, the rows need ({row},)"
                )
            if not np.isfinite(importance).all():
                raise LlmpressError("the importance matrix holds a NaN or an infinity")
        if cquant.supports(self.ggml_type):
            rows = values.reshape(-1, row)
            out = cquant.quantize_rows(self.ggml_type, rows, importance, self.row_bytes(row))
            return out.reshape(*values.shape[:-1], self.row_bytes(row))
        # Blocks quantizers (block_size > 1) would silently write garbage for NaN/inf; the
        # float types store them as they are.
        if self.block_size > 1 and not np.isfinite(values).all():
            bad_row = int(np.argmin(np.isfinite(values.reshape(-1, row)).all(axis=1)))
            raise LlmpressError(f"row {bad_row} holds a NaN or an infinity; cannot quantize it")
        return self.quantize_numpy(values, importance)

    def quantize_numpy(
        self, values: np.ndarray, importance: np.ndarray | None = None
    ) -> np.ndarray:
        """`quantize` through the numpy ports (the readable reference, and the fallback)."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        row = values.shape[-1]
        blocks = values.reshape(-1, self.block_size)
        weights = None
        if importance is not None:
            importance = np.asarray(importance, dtype=np.float32)
            assert importance.shape == (row,), f"importance must be ({row},)"
            per_row = importance.reshape(-1, self.block_size)
            n_rows = blocks.shape[0] // per_row.shape[0]
            weights = np.broadcast_to(per_row, (n_rows, *per_row.shape))
            weights = weights.reshape(-1, self.block_size)
        with np.errstate(all="ignore"):  # huge values overflow in ggml's C code too
            out = self.quantize_row_blocks(blocks, weights, row)
        assert out.dtype == np.uint8 and out.shape == (blocks.shape[0], self.type_size)
        return out.reshape(*values.shape[:-1], self.row_bytes(row))


# --- helpers shared by the dequantizers ------------------------------------------------
def read_f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 stored at byte `offset` of every block, as float32 (n_blocks, 1).

    Viewing the two bytes as float16 then widening is exact (ggml's GGML_FP16_TO_FP32).
    The copy makes the view legal whatever the alignment of the source buffer.
    """
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def bit_shifts(step: int, count: int, device: torch.device) -> torch.Tensor:
    """uint8 [0, step, 2*step, ...] (count values), for unpacking packed small integers."""
    return torch.arange(0, step * count, step, dtype=torch.uint8, device=device)
