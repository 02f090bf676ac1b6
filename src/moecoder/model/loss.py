"""LM head + cross-entropy fused and chunked over tokens, for training.

Shape legend: N tokens, C model dim, V vocabulary, c tokens per chunk.

The plain formulation `F.cross_entropy(h @ W.T, y, reduction="sum")` materialises [N, V] logits,
their log-softmax and, in backward, two more [N, V] gradients: on CPU those fresh 100+ MB
buffers (page faults, memory passes) cost as much as a third of the head's matmuls. Here each
chunk of c tokens goes through logits -> log-softmax -> softmax - onehot -> both gradient matmuls
while the chunk is still in cache, so no [N, V] tensor ever exists. The gradients are computed in
the forward (the loss is the root of the graph, so its incoming gradient is a known scalar):
backward only hands them over, scaled by the incoming gradient when it is not the one the caller
announced.

fp16 (autocast + GradScaler): the gradients exist before the loss scale reaches them, so a caller that
scales the loss must put the loss scale into `scale` instead (train_step passes ce_scale x loss scale
and divides the returned loss by the loss scale again, so the incoming gradient is exactly 1). The
per-token factor is then applied to softmax - onehot in fp32, before its fp16 cast, which gives the
fp16 operands of the plain formulation's backward: no underflow of the unscaled gradient.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

# Tokens per chunk: a chunk's logits are c x V fp32 (64 MB: c = 524 for V = 32000). Smaller chunks make
# the head's matmuls less efficient (measured on CPU, V = 32000: c = 128 / 256 / 512 / 1024 cost
# ~10% / 5% / 2% / 0% more than unchunked) and accumulate the [V, C] weight gradient more often.
_CHUNK_ELEMENTS = 1 << 24


def chunk_tokens(vocab: int) -> int:
    return max(16, min(1024, _CHUNK_ELEMENTS // max(vocab, 1)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NC, w_VC, y_N, scale: float, ignore_index: int, chunk: int, compute_dtype):
        N, V = h_NC.shape[0], w_VC.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cd = compute_dtype or h_NC.dtype
        # fp16's range needs the per-token factor (1 / tokens x loss scale) in before the cast; bf16 and
        # fp32 have fp32's range, and apply it to the small [c, C] operands instead.
        prescale = cd == torch.float16
        h_cd, w_cd = h_NC.to(cd), w_VC.to(cd)
        valid_N = y_N != ignore_index
        safe_y_N = torch.where(valid_N, y_N, 0)
        # Per-token weight of its gradient: `scale` for real targets, 0 for ignored ones. Applied to the
        # small [c, C] operands/results instead of the [c, V] softmax.
        rowscale_N = valid_N.to(torch.float32) * scale
        loss_N = torch.empty(N, dtype=torch.float32, device=h_NC.device)
        grad_h = torch.empty(h_NC.shape, dtype=h_NC.dtype, device=h_NC.device) if need_h else None
        grad_w = torch.empty(w_VC.shape, dtype=torch.float32, device=w_VC.device) if need_w else None
        c = min(chunk, max(N, 1))
        # fp32 on CPU: the softmax overwrites the logits in place, in one [c, V] buffer reused across
        # calls. Elsewhere the logits stay for the exact fallback of `_target_nll` (no host sync).
        in_place = cd == torch.float32 and h_NC.device.type == "cpu"
        probs = _workspace(c * V, h_NC.device).view(c, V)
        logits = probs if in_place else torch.empty(c, V, dtype=cd, device=h_NC.device)
        try:
            for lo in range(0, N, c):
                hi = min(lo + c, N)
                n = hi - lo
                z = logits[:n]
                torch.mm(h_cd[lo:hi], w_cd.t(), out=z)
                # One softmax pass (cheaper than log_softmax + exp on CPU); the loss is -log(p_target).
                p = torch._softmax(z if cd == torch.float32 else z.float(), 1, False, out=probs[:n])
                rows = torch.arange(n, device=h_NC.device)
                y = safe_y_N[lo:hi]
                p_y = p[rows, y]
                loss_N[lo:hi] = _target_nll(p_y, y, logits=None if in_place else z, h_nC=h_cd[lo:hi], w_VC=w_cd)
                if not (need_h or need_w):
                    continue
                p[rows, y] = p_y - 1.0  # d(CE)/d(logits) = softmax - onehot (ignored targets: weight 0 below)
                s = rowscale_N[lo:hi, None]
                if prescale:
                    g = p.mul_(s).to(cd)
                else:
                    g = p if cd == torch.float32 else p.to(cd)
                if need_h:
                    gh = torch.mm(g, w_cd, out=grad_h[lo:hi]) if cd == grad_h.dtype else torch.mm(g, w_cd)
                    grad_h[lo:hi] = gh if prescale else gh.mul_(s.to(gh.dtype))
                if need_w:
                    hs = h_cd[lo:hi] if prescale else (h_NC[lo:hi].float() * s).to(cd)
                    if cd != torch.float32:
                        part = torch.mm(g.t(), hs).float()
                        grad_w.copy_(part) if lo == 0 else grad_w.add_(part)
                    elif lo == 0:
                        torch.mm(g.t(), hs, out=grad_w)
                    else:
                        grad_w.addmm_(g.t(), hs)
        finally:
            _release(probs)
        loss_N = torch.where(valid_N, loss_N, 0.0)
        ce_sum = loss_N.sum()
        ctx.scale = scale
        ctx.save_for_backward(grad_h, grad_w.to(w_VC.dtype) if need_w else None)
        ctx.mark_non_differentiable(ce_sum)
        return ce_sum * scale, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_sum):
        grad_h, grad_w = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 7
        # The gradients were computed for d(loss) = 1. Skip the rescale when that is what arrived (the
        # usual loss.backward() on CPU: reading a CPU scalar costs nothing); else scale out of place
        # (in place would change the saved tensors under retain_graph).
        if grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
            return grad_h, grad_w, None, None, None, None, None
        # In fp32 (type promotion) and cast back: an fp16 grad_h times a factor that is not a power of two
        # would otherwise round the factor to 11 bits first.
        g = grad_loss.to(torch.float32)
        return (None if grad_h is None else (grad_h * g).to(grad_h.dtype),
                None if grad_w is None else (grad_w * g).to(grad_w.dtype),
                None, None, None, None, None)


def _target_nll(p_y, y_n, *, logits, h_nC, w_VC) -> torch.Tensor:
    """-log softmax(z)[y] from p_y = softmax(z)[y], z = h W^T. Rows whose p_y is too small to log
    accurately (loss > ~69: p_y near or below fp32's normal range) get logsumexp(z) - z[y] instead:
    from `logits` for every row when given (no host sync), else from recomputed logits of those rows."""
    nll = -torch.log(p_y)
    tiny = p_y < 1e-30
    if logits is not None:
        rows = torch.arange(logits.shape[0], device=logits.device)
        exact = torch.logsumexp(logits.float(), dim=1) - logits[rows, y_n].float()
        return torch.where(tiny, exact, nll)
    if not bool(tiny.any()):
        return nll
    idx = tiny.nonzero().squeeze(1)
    z = (h_nC[idx] @ w_VC.t()).float()
    exact = torch.logsumexp(z, dim=1) - z[torch.arange(idx.shape[0], device=z.device), y_n[idx]]
    return nll.index_put((idx,), exact)


# One reusable CPU buffer for the chunk's logits/softmax: a fresh 30+ MB allocation per call is mmapped
# and page-faulted anew every step (~2 us per 4 KB page). Taken out while in use, so concurrent calls
# just allocate their own.
_WORKSPACE: dict[torch.device, torch.Tensor] = {}


def _workspace(numel: int, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(numel, dtype=torch.float32, device=device)
    buf = _WORKSPACE.pop(device, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32, device=device)
    return buf[:numel]


def _release(buf: torch.Tensor) -> None:
    if buf.device.type == "cpu":
        base = buf._base if buf._base is not None else buf
        _WORKSPACE[buf.device] = base


def linear_cross_entropy(
    h_NC: torch.Tensor,
    w_VC: torch.Tensor,
    y_N: torch.Tensor,
    *,
    scale: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale * sum_n CE(h_n @ W.T, y_n), sum_n CE) over targets != ignore_index, without [N, V] logits.

    The first is differentiable wrt h and W (exactly the gradient of the plain formulation times
    `scale`); the second is a detached fp32 sum for logging. Under CPU/CUDA autocast to bf16 or fp16
    the matmuls run in that dtype with fp32 softmax and fp32 accumulation of the weight gradient, as the
    plain `F.linear` + `.float()` + `F.cross_entropy` does. fp16 with a GradScaler: pass the loss scale
    in `scale` (see the module docstring), not by scaling the returned loss.
    """
    if h_NC.dim() != 2 or w_VC.dim() != 2 or y_N.shape != h_NC.shape[:1]:
        raise ValueError(f"need h [N, C], W [V, C], y [N]; got {tuple(h_NC.shape)}, {tuple(w_VC.shape)}, "
                         f"{tuple(y_N.shape)}")
    cd = None
    if torch.is_autocast_enabled(h_NC.device.type):
        cd = torch.get_autocast_dtype(h_NC.device.type)
        if cd not in _AUTOCAST_DTYPES:
            raise ValueError(f"linear_cross_entropy supports bf16 and fp16 autocast only, not {cd}")
    with torch.autocast(h_NC.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h_NC, w_VC, y_N, float(scale), ignore_index,
                                         chunk or chunk_tokens(w_VC.shape[0]), cd)


_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def fused_ce_supported(device_type: str) -> bool:
    """Whether the current autocast state allows `linear_cross_entropy` (off, bf16 or fp16)."""
    return not torch.is_autocast_enabled(device_type) or torch.get_autocast_dtype(device_type) in _AUTOCAST_DTYPES
