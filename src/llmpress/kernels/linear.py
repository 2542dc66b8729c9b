"""Linear and embedding layers whose weights stay in their GGUF block format.

The packed bytes are the memory-mapped file pages themselves (no copy on the CPU), so a
Q4 model occupies about Q4 memory while it runs. Two matmul paths:
- exact: dequantize (exactly, in row chunks, so at most CHUNK_VALUES floats exist at once)
  and multiply in float32 — the reference the fast path is measured against;
- fast: the compiled CPU kernel dots the packed blocks with activations rounded to 8 bits
  (llmpress/kernels/qmatmul.c), for any number of rows: each row's result is the same
  bits whether it comes alone or with others, so a prompt's logits do not depend on how
  it was split into calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from llmpress.formats import get_format
from llmpress.io.source import TensorRef
from llmpress.kernels import cpu

CHUNK_VALUES = 1 << 22  # dequantize at most 4M weights (16 MiB) at a time


def dense_tensor(ref: TensorRef, device) -> torch.Tensor:
    """A small tensor (norm weight, bias) dequantized to float32."""
    return get_format(ref.ggml_type).dequantize(ref.read_bytes(), ref.shape).to(device)


def _packed_rows(ref: TensorRef, device) -> torch.Tensor:
    rows = ref.read_bytes().view(ref.shape[0], -1)  # (out, row_bytes)
    return rows if device.type == "cpu" else rows.to(device)


def kernel_weights(linears: list["QuantLinear"]) -> list[tuple[torch.Tensor, int]]:
    """(bytes, kernel type) of linears that one kernel call computes side by side: each
    one's repacked layout, unless its rows would not start on a whole repacked group of
    the call's output (then the file's layout)."""
    weights, start = [], 0
    for lin in linears:
        use_repacked = lin.repacked is not None and start % cpu.REPACKED_GROUP_ROWS == 0
        weights.append(lin.repacked if use_repacked else (lin.rows, int(lin.ggml_type)))
        start += lin.out_features
    return weights


class QuantLinear(nn.Module):
    def __init__(self, ref: TensorRef, mode: str, device: torch.device):
        super().__init__()
        self.name, self.ggml_type = ref.name, ref.ggml_type
        self.out_features, self.in_features = ref.shape
        self.format = get_format(ref.ggml_type)
        self.rows = _packed_rows(ref, device)
        self.dense = None
        if ref.ggml_type == GGMLQuantizationType.F32:  # already float32: use the bytes as is
            self.dense = self.rows.view(torch.float32)
        self.kernel = self.repacked = None
        if mode == "fast" and device.type == "cpu" and cpu.supports(self.ggml_type, self.in_features):
            # the kernel's own layout where it has a faster one (the file's bytes stay
            # for the exact path, their pages handed back to the OS)
            self.repacked = cpu.repacked(self.rows, self.ggml_type, self.in_features)
            self.kernel = cpu.FusedWeights(kernel_weights([self]))

    def dequantized(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        rows = self.rows[start:end]
        return self.format.dequantize(rows.reshape(-1), (rows.shape[0], self.in_features))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.dense is not None:
            return F.linear(x, self.dense, bias)
        flat = x.reshape(-1, self.in_features)
        if self.kernel is not None:
            y = cpu.qmatmul(self.kernel, flat)
        else:
            step = max(1, CHUNK_VALUES // self.in_features)
            y = torch.cat([F.linear(flat, self.dequantized(r, r + step))
                           for r in range(0, self.out_features, step)], dim=-1)
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], self.out_features)


class FusedLinear(nn.Module):
    """Several Linears that read the same input (q/k/v, gate/up): one kernel call for all
    of them when each has a kernel, else one call each."""

    def __init__(self, linears: list[QuantLinear]):
        super().__init__()
        self.linears = nn.ModuleList(linears)
        self.kernel = None
        if all(lin.kernel is not None for lin in linears):
            self.kernel = cpu.FusedWeights(kernel_weights(linears))
        self.splits = [lin.out_features for lin in linears]

    def forward(self, x: torch.Tensor, biases=None) -> list[torch.Tensor]:
        biases = biases or [None] * len(self.linears)
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel is None:
            return [lin(x, b) for lin, b in zip(self.linears, biases)]
        outputs = cpu.qmatmul(self.kernel, flat).split(self.splits, dim=-1)
        return [(y if b is None else y + b).view(*x.shape[:-1], y.shape[-1])
                for y, b in zip(outputs, biases)]


class QuantEmbedding(nn.Module):
    """Token embedding lookup that dequantizes only the rows it is asked for."""

    def __init__(self, ref: TensorRef, device: torch.device):
        super().__init__()
        self.format = get_format(ref.ggml_type)
        self.rows = _packed_rows(ref, device)
        self.dim = ref.shape[1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        picked = self.rows[tokens.reshape(-1)]  # (n, row_bytes)
        values = self.format.dequantize(picked.reshape(-1), (picked.shape[0], self.dim))
        return values.view(*tokens.shape, self.dim)


def matmul_path(model: nn.Module, mode: str) -> str:
    """How this model's matmuls run, in words (for `llmpress info`)."""
    if mode == "exact":
        return "exact: dequantize + float32"
    linears = [m for m in model.modules() if isinstance(m, QuantLinear) and m.dense is None]
    packed = sum(m.kernel is not None for m in linears)
    isa = cpu.kernel_info()["isa"]
    if isa is None:
        return "fast requested, but the C kernel was not built: dequantize + float32"
    if packed < len(linears):
        missing = sorted({m.ggml_type.name for m in linears if m.kernel is None})
        return (f"fast: C kernels ({isa}) for {packed} of {len(linears)} matmuls; "
                f"{', '.join(missing)} dequantize + float32")
    repacked = sum(m.repacked is not None for m in linears)
    layouts = f"; {repacked} of {len(linears)} repacked in 8-row groups" if repacked else ""
    fused = " + all layers in one call" if getattr(model, "decoder", None) is not None else ""
    return f"fast: C kernels ({isa}, 8-bit activations{layouts}){fused}"
