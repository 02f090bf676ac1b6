"""Linear layers whose bf16/fp16 matrix products may run in fp32 on CPUs without fast 16-bit GEMM.

On x86 CPUs without AMX, PyTorch's bf16 GEMM is slower than its fp32 GEMM (measured here, one
thread, 128-512 rows: 1.4-1.6x slower). Converting both operands to fp32, multiplying and rounding
the product back to bf16 gives the same result as the native kernel (16-bit values are exact in
fp32 and both accumulate in fp32; only the summation order differs) and is faster once there are
enough rows to amortise converting the weight: prefill, scoring. With few rows (decode) converting
the weight costs more than the product, so the native kernel stays.

Whether the detour pays is measured once per process and dtype on a small product, so machines
with fast 16-bit matrix units keep their native kernel. Only inference uses it (no autograd graph,
no autocast): training numerics and memory stay exactly as they were.

Few-row bf16 products (decode) go to moecoder's own C kernel instead where it is built and measured
faster (kernels/cpu.py): here PyTorch's CPU bf16 matrix-vector kernel streams weights at ~7 GB/s,
the C kernel at 15 GB/s from DRAM and up to 28.6 GB/s from cache.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu as cpu_kernels

MIN_ROWS = 64  # below this the weight conversion costs more than the fp32 product saves
_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def _fp32_product_is_faster(dtype: torch.dtype) -> bool:
    """Time a [256, 512] x [512, 1024] product both ways (median of 5); the fp32 detour must win by 15%."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=g).to(dtype)
    w = torch.randn(1024, 512, generator=g).to(dtype)

    with torch.inference_mode():
        native = cpu_kernels.median_time(lambda: F.linear(x, w), 5)
        detour = cpu_kernels.median_time(lambda: F.linear(x.float(), w.float()).to(dtype), 5)
    return detour < 0.85 * native


def use_fp32_product(x: torch.Tensor, rows: int) -> bool:
    """Run this 16-bit CPU product in fp32? (inference, enough rows, and measured faster here)."""
    return (
        x.dtype in _HALF
        and rows >= MIN_ROWS
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and _fp32_product_is_faster(x.dtype)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with: few-row inference products on CPU by moecoder's C kernel where it is faster
    (kernels/cpu.py; an opaque custom op under torch.compile); the fp32 detour for many-row 16-bit
    products on CPUs where it is faster; and, without the kernel, 16-bit single-row products under
    torch.compile written as a multiply-and-sum (see below)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if cpu_kernels.usable(x, weight, rows) and (bias is None or bias.dtype == x.dtype):  # few-row inference
        x2 = x.reshape(rows, x.shape[-1])
        return cpu_kernels.kernel().mm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
    if weight.dtype == x.dtype and use_fp32_product(x, rows):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    if (torch.compiler.is_compiling() and cpu_kernels.READY is not None and not torch.is_grad_enabled()
            and cpu_kernels.READY.takes(torch.bfloat16, rows) and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and rows <= cpu_kernels.MAX_ROWS and x.device.type == "cpu"):
        # A compiled decode step: the kernel as an opaque op (see kernels/cpu.py).
        y = torch.ops.moecoder.bf16_mm(x.reshape(rows, x.shape[-1]), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    if rows == 1 and x.dtype in _HALF and x.device.type == "cpu" and torch.compiler.is_compiling():
        # A compiled batch-1 decode step: inductor fuses this into one pass over the 16-bit weight
        # with fp32 accumulation, which streams it faster than the eager bf16 matrix-vector kernel
        # (LM head 32000 x 512: 1.6 vs 2.2 ms). Same math: products and sums in fp32, one rounding.
        y = (x.float()[..., None, :] * weight.float()).sum(-1)
        return (y if bias is None else y + bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
