"""MKL-packed weights for decoding on a CPU: each decode step multiplies a few rows by every weight matrix.

At batch 16 a decode step is bound by reading the weights, and MKL's plain sgemm repacks every weight matrix into
its panel layout on every call: the step streamed a GPT-2-small's fp32 weights at about half of the bandwidth a
`sum` reaches (`python -m bench.sampling_roofline`). Packed once per `sample_responses` call (`cblas_sgemm_pack`,
through torch's `mkl::_mkl_linear`, the op Inductor's CPU weight prepacking emits), the same products need no
repacking: the weight matmuls of a 124M-shape decode step ran 1.2-1.3x faster on one core.

The product of a packed weight is bitwise the plain one's at the packed row count; a step with fewer live rows is
padded to it (the rows are independent, and reading the weights costs the same for 16 rows as for 10). Larger
inputs (the prompt's prefill) run the module's own forward.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.pytorch_utils import Conv1D

# Packing costs one pass over the weights and a copy of them. It pays for itself within a few decode steps once the
# weights stream from memory; below this size they stay in the CPU's caches, and sampling stays as it is.
MIN_WEIGHT_BYTES = 32 * 2**20
MIN_NEW_TOKENS = 64


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def packable(module: torch.nn.Module) -> bool:
    """A plain fp32 linear layer on the CPU whose forward nobody else has replaced (accelerate's offload hooks do)."""
    if type(module) not in (torch.nn.Linear, Conv1D) or "forward" in vars(module):
        return False
    w = module.weight
    return w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2 and not w.is_meta


def worth_packing(model: torch.nn.Module, max_new_tokens: int) -> bool:
    """The rule of `sample_responses(pack_weights=None)`: decoding on a CPU in fp32 without autocast, weights too
    large for the caches, responses long enough to repay the packing pass, and room in memory for the packed copy."""
    if not mkl_packing_available() or torch.is_autocast_enabled("cpu") or max_new_tokens < MIN_NEW_TOKENS:
        return False
    size = sum(m.weight.numel() * 4 for m in model.modules() if packable(m))
    return size >= MIN_WEIGHT_BYTES and size <= available_memory() // 2


def available_memory() -> int:
    """Bytes of memory the system can still give (MemAvailable; the free pages where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


TRANSPOSE_BLOCK = 64


def transposed(w: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `w.t()` for a 2-D `w`, written a block of 64 rows of `w` at a time.

    `w.t().contiguous()` walks one of the two matrices a column at a time; in blocks each row written is 64
    contiguous floats read from 64 rows at once, which the caches serve (`packing_pass_s` of `python -m
    bench.sampling_roofline` times the whole packing pass). The same numbers."""
    out = w.new_empty((w.shape[1], w.shape[0]))
    for i in range(0, w.shape[0], TRANSPOSE_BLOCK):
        out[:, i: i + TRANSPOSE_BLOCK] = w[i: i + TRANSPOSE_BLOCK].t()
    return out


class PackedForward:
    """A linear layer's forward through its weight packed for `rows` input rows."""

    def __init__(self, module: torch.nn.Module, rows: int):
        # Conv1D keeps its weight as [in, out]; the packing reads [out, in]. Its transposed copy lives only as long as
        # the packing call, and the view serves the op's unpacked path.
        self.weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
        weight = transposed(module.weight.detach()) if isinstance(module, Conv1D) else self.weight.detach().contiguous()
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        self.bias = module.bias
        self.rows = rows
        self.forward = type(module).forward.__get__(module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        n = len(flat)
        if n > self.rows or x.dtype != torch.float32:
            return self.forward(x)
        if n < self.rows:
            flat = torch.cat([flat, flat.new_zeros(self.rows - n, flat.shape[1])])
        out = torch.ops.mkl._mkl_linear(flat.contiguous(), self.packed, self.weight, self.bias, self.rows)
        return out[:n].reshape(*x.shape[:-1], out.shape[-1])


@contextmanager
def packed_linears(model: torch.nn.Module, rows: int, enabled: bool) -> Iterator[int]:
    """Within the block, the model's plain fp32 linear layers multiply through weights packed for `rows` rows (when
    `enabled`); yields how many layers were packed. The weights must not change inside the block."""
    modules = [m for m in model.modules() if packable(m)] if enabled and mkl_packing_available() else []
    try:
        for m in modules:
            m.forward = PackedForward(m, rows)
        yield len(modules)
    finally:
        for m in modules:
            vars(m).pop("forward", None)
