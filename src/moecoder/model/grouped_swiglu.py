"""SwiGLU experts over expert-sorted rows, one matmul per expert segment, with a hand-written backward.

Shape legend: M (token, expert) rows sorted by expert, C model dim, F expert hidden dim, E experts.

Autograd over the plain per-expert loop (`w13.unbind(0)`, `F.linear`, `chunk`, `torch.cat`) copies
every gradient once more than needed: the chunk backward concatenates gate/up gradients per expert,
the unbind backward stacks E expert gradients into [E, ...] and the forward concatenates the
segments' outputs. Here every matmul writes straight into its slice of one preallocated
buffer (`out=`), the SwiGLU elementwise math runs once over all M rows, and backward uses the same
formulas autograd does (`silu_backward`, product rule), so results match the loop to fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import cpu as cpu_kernels
from .linear import MIN_ROWS, use_fp32_product


def _segments(counts_E: list[int]):
    lo = 0
    for e, n in enumerate(counts_E):
        yield e, lo, lo + n
        lo += n


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MC, w13_EHC, w2_ECF, counts_E: list[int], fp32_products: bool = False, kernel=None):
        M, C = x_MC.shape
        Fh = w2_ECF.shape[2]
        x_MC = x_MC.contiguous()
        h_MH = x_MC.new_empty(M, 2 * Fh)  # gate pre-activations, then up
        a_MF = x_MC.new_empty(M, Fh)
        y_MC = x_MC.new_empty(M, C)
        # Elementwise work per segment, right after the matmul that wrote it: the segment is still in cache.
        for e, lo, hi in _segments(counts_E):
            if hi > lo:
                if kernel is not None and kernel.takes(x_MC.dtype, hi - lo):  # few-row inference (kernels/cpu.py)
                    h = kernel.mm(x_MC[lo:hi], w13_EHC[e], out=h_MH[lo:hi])
                    a = torch.mul(F.silu(h[:, :Fh]), h[:, Fh:], out=a_MF[lo:hi])
                    kernel.mm(a, w2_ECF[e], out=y_MC[lo:hi])
                    continue
                if fp32_products and hi - lo >= MIN_ROWS:  # inference on a CPU where it is faster (linear.py)
                    h = h_MH[lo:hi].copy_(torch.mm(x_MC[lo:hi].float(), w13_EHC[e].float().t()))
                    a = torch.mul(F.silu(h[:, :Fh]), h[:, Fh:], out=a_MF[lo:hi])
                    y_MC[lo:hi].copy_(torch.mm(a.float(), w2_ECF[e].float().t()))
                    continue
                h = torch.mm(x_MC[lo:hi], w13_EHC[e].t(), out=h_MH[lo:hi])
                a = torch.mul(F.silu(h[:, :Fh]), h[:, Fh:], out=a_MF[lo:hi])
                torch.mm(a, w2_ECF[e].t(), out=y_MC[lo:hi])
        ctx.counts_E = counts_E
        ctx.save_for_backward(x_MC, w13_EHC, w2_ECF, h_MH, a_MF)
        return y_MC

    @staticmethod
    def backward(ctx, dy_MC):
        x_MC, w13_EHC, w2_ECF, h_MH, a_MF = ctx.saved_tensors
        counts_E = ctx.counts_E
        need_x, need_w13, need_w2 = ctx.needs_input_grad[:3]
        dy_MC = dy_MC.contiguous()
        Fh = w2_ECF.shape[2]
        dx = torch.empty_like(x_MC) if need_x else None
        dw13 = torch.empty_like(w13_EHC) if need_w13 else None
        dw2 = torch.empty_like(w2_ECF) if need_w2 else None
        # One segment-sized scratch for d(gate|up), reused by every expert: stays in cache, and a fresh
        # [M, 2F] buffer would be page-faulted in by its first writer.
        dh_buf = h_MH.new_empty(max(counts_E, default=0), h_MH.shape[1]) if (need_x or need_w13) else None
        for e, lo, hi in _segments(counts_E):
            if hi == lo:
                for g in (dw13, dw2):
                    if g is not None:
                        g[e].zero_()
                continue
            dy = dy_MC[lo:hi]
            if need_w2:
                torch.mm(dy.t(), a_MF[lo:hi], out=dw2[e])
            if dh_buf is None:
                continue
            da = torch.mm(dy, w2_ECF[e])
            gate, up, dh = h_MH[lo:hi, :Fh], h_MH[lo:hi, Fh:], dh_buf[: hi - lo]
            # a = silu(gate) * up: d(gate) = silu'(gate) * da * up, d(up) = da * silu(gate).
            torch.ops.aten.silu_backward(da * up, gate, grad_input=dh[:, :Fh])
            torch.mul(da, F.silu(gate), out=dh[:, Fh:])
            if need_w13:
                torch.mm(dh.t(), x_MC[lo:hi], out=dw13[e])
            if need_x:
                torch.mm(dh, w13_EHC[e], out=dx[lo:hi])
        return dx, dw13, dw2, None, None, None


def grouped_swiglu(x_MC: torch.Tensor, w13_EHC: torch.Tensor, w2_ECF: torch.Tensor, counts_E: list[int]):
    """Row block e of x (counts_E[e] rows) -> w2[e] @ (silu(gate) * up) with gate|up = w13[e] @ x.

    Under autocast the matmuls run in the autocast dtype and the output is in that dtype, as the
    per-expert `F.linear` loop gives.
    """
    dev = x_MC.device.type
    if torch.is_autocast_enabled(dev):
        cd = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _GroupedSwiGLU.apply(x_MC.to(cd), w13_EHC.to(cd), w2_ECF.to(cd), counts_E)
    # Decided here, outside the Function: inside its forward autograd is always off.
    fp32_products = w13_EHC.dtype == x_MC.dtype and use_fp32_product(x_MC, max(counts_E, default=0))
    kernel = cpu_kernels.kernel() if cpu_kernels.usable(x_MC, w13_EHC, cpu_kernels.MAX_ROWS) \
        and w2_ECF.dtype == x_MC.dtype and w2_ECF.stride(-1) == 1 else None
    return _GroupedSwiGLU.apply(x_MC, w13_EHC, w2_ECF, counts_E, fp32_products, kernel)
