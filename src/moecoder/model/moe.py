"""Mixture-of-experts FFN: router, grouped experts, optional shared expert.

Shape legend: N tokens (flattened batch*time), C model dim, F expert hidden dim,
E routed experts, K experts per token.

Dispatch is dropless: every (token, expert) pair is computed. The fast path sorts the
N*K assignments by expert and runs one matmul per expert segment (or `torch._grouped_mm`
on CUDA); `reference_forward` keeps the obviously-correct per-expert loop beside it.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels import cpu as cpu_kernels
from .grouped_swiglu import grouped_swiglu
from .linear import Linear, linear


class FeedForward(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RouterStats:
    """Per-layer routing statistics returned by forward for training and logging.

    Each is computed from the router's outputs on first access: decoding never reads them,
    so a decode step does not pay the dozen small ops per layer they cost.
    """

    def __init__(self, logits_NE: torch.Tensor, scores_NE: torch.Tensor, ids_NK: torch.Tensor, n_experts: int):
        self._logits_NE, self._scores_NE, self._ids_NK, self._n_experts = logits_NE, scores_NE, ids_NK, n_experts

    @cached_property
    def tokens_per_expert(self) -> torch.Tensor:
        """[E] long, counts of (token, expert) assignments."""
        return torch.bincount(self._ids_NK.flatten(), minlength=self._n_experts)

    @cached_property
    def lb_loss(self) -> torch.Tensor:
        """Scalar: E * sum_e f_e * P_e (Switch/GShard load-balancing loss)."""
        n, k = self._ids_NK.shape
        scores_NE = self._scores_NE
        frac_E = self.tokens_per_expert.float() / max(n * k, 1)
        probs_E = (scores_NE / scores_NE.sum(-1, keepdim=True)).mean(0) if n else scores_NE.sum(0)
        return self._n_experts * (frac_E * probs_E).sum()

    @cached_property
    def z_loss(self) -> torch.Tensor:
        """Scalar: mean(logsumexp(logits)^2) (ST-MoE router z-loss)."""
        logits_NE = self._logits_NE
        return torch.logsumexp(logits_NE, dim=-1).pow(2).mean() if logits_NE.shape[0] else logits_NE.sum()


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.score_func, self.norm_topk, self.scale = cfg.score_func, cfg.norm_topk, cfg.routed_scale
        self.n_groups, self.topk_groups, self.group_score = cfg.n_groups, cfg.topk_groups, cfg.group_score
        self.gate = Linear(cfg.dim, cfg.n_experts, bias=False)
        # Correction bias used for expert *selection* only (aux-loss-free balancing); not trained by SGD.
        self.register_buffer("bias", torch.zeros(cfg.n_experts) if cfg.routing_bias else None)

    def forward(self, x_NC: torch.Tensor):
        logits_NE = self.gate(x_NC).float()  # router math in fp32
        if self.score_func == "softmax":
            scores_NE = logits_NE.softmax(dim=-1)
        else:
            scores_NE = logits_NE.sigmoid()
        choice_NE = scores_NE if self.bias is None else scores_NE + self.bias.float()
        if self.topk_groups < self.n_groups:
            choice_NE = self._limit_groups(choice_NE)
        _, ids_NK = torch.topk(choice_NE, self.top_k, dim=-1)
        weights_NK = scores_NE.gather(1, ids_NK)
        if self.norm_topk:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        if self.scale != 1.0:
            weights_NK = weights_NK * self.scale
        return logits_NE, scores_NE, weights_NK, ids_NK

    def _limit_groups(self, choice_NE: torch.Tensor) -> torch.Tensor:
        """Group-limited routing (DeepSeek): keep the topk_groups best of n_groups expert groups, ranked by
        their best selection score ("max", V2) or the sum of their two best ("top2", V3); -inf elsewhere."""
        N = choice_NE.shape[0]
        grouped_NGe = choice_NE.view(N, self.n_groups, -1)
        if self.group_score == "max":
            group_NG = grouped_NGe.amax(dim=-1)
        else:
            group_NG = grouped_NGe.topk(2, dim=-1).values.sum(dim=-1)
        keep_NG = torch.zeros_like(group_NG, dtype=torch.bool)
        keep_NG.scatter_(1, group_NG.topk(self.topk_groups, dim=-1).indices, True)
        return grouped_NGe.masked_fill(~keep_NG[..., None], float("-inf")).view(N, -1)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked: w13 [E, 2F, C] (gate rows then up rows), w2 [E, C, F]."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.use_grouped_mm = False  # set by the engine at the edge (helps on CUDA, not on CPU)

    def expert(self, e: int, x_nC: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x_nC, self.w13[e]).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.w2[e])

    def forward(self, x_sorted_MC: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """x sorted by expert, counts_E[e] rows for expert e; returns outputs in the same order."""
        if self.use_grouped_mm and x_sorted_MC.is_cuda:
            offs = torch.tensor(counts_E, device=x_sorted_MC.device).cumsum(0).to(torch.int32)
            h = torch._grouped_mm(x_sorted_MC, self.w13.transpose(1, 2), offs=offs)
            gate, up = h.chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offs)
        # One matmul per expert segment into preallocated buffers, hand-written backward (no per-expert
        # gradient stacking or concatenation; see grouped_swiglu.py). Same math as `expert` per segment.
        return grouped_swiglu(x_sorted_MC, self.w13, self.w2, counts_E)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_experts, cfg.dim, cfg.moe_ffn_dim)
        self.shared = FeedForward(cfg.dim, cfg.n_shared_experts * cfg.shared_ffn_dim) if cfg.n_shared_experts else None
        self.shared_gate = Linear(cfg.dim, 1, bias=False) if cfg.shared_expert_gate else None

    def _shared(self, x_NC: torch.Tensor) -> torch.Tensor | None:
        if self.shared is None:
            return None
        out = self.shared(x_NC)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x_NC)) * out
        return out

    def forward(self, x_BTC: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x_BTC.shape
        x_NC = x_BTC.reshape(-1, shape[-1])
        logits_NE, scores_NE, weights_NK, ids_NK = self.router(x_NC)
        stats = RouterStats(logits_NE, scores_NE, ids_NK, self.n_experts)
        if cpu_kernels.moe_usable(x_NC, self.experts.w13, self.experts.w2):
            # A decode step's few tokens (<= 16) on CPU: every routed expert in one C call (kernels/cpu.py).
            out_NC = cpu_kernels.kernel().moe_swiglu(x_NC, self.experts.w13, self.experts.w2, ids_NK, weights_NK)
        elif x_NC.shape[0] <= 4:
            out_NC = self._decode_path(x_NC, weights_NK, ids_NK)
        else:
            out_NC = self._dispatch(x_NC, weights_NK, ids_NK, stats.tokens_per_expert)
        shared = self._shared(x_NC)
        if shared is not None:
            out_NC = out_NC + shared
        return out_NC.view(shape), stats

    def _dispatch(self, x_NC, weights_NK, ids_NK, counts_E) -> torch.Tensor:
        """Sort (token, expert) pairs by expert, run expert segments, scatter-add back weighted."""
        flat_ids = ids_NK.flatten()
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // self.top_k
        x_sorted = x_NC.index_select(0, token_of)
        y_sorted = self.experts(x_sorted, counts_E.tolist())
        w = weights_NK.flatten().index_select(0, order).to(y_sorted.dtype)
        out = torch.zeros_like(x_NC)
        # Under autocast the experts return bf16/fp16 while x stays fp32: accumulate in x's dtype.
        out.index_add_(0, token_of, (y_sorted * w[:, None]).to(out.dtype))
        return out

    def _decode_path(self, x_NC, weights_NK, ids_NK) -> torch.Tensor:
        """Few tokens (decode): loop over each token's experts on weight views, no sort or copies."""
        if torch.compiler.is_compiling():
            if cpu_kernels.READY is not None and torch.bfloat16 in cpu_kernels.READY.fast_moe \
                    and not torch.is_grad_enabled() and x_NC.dtype == torch.bfloat16 and x_NC.device.type == "cpu" \
                    and self.experts.w13.dtype == torch.bfloat16:
                return torch.ops.moecoder.bf16_moe_swiglu(x_NC, self.experts.w13, self.experts.w2, ids_NK, weights_NK)
            return self._gathered_path(x_NC, weights_NK, ids_NK)
        # One host read of the ids and weights (Python floats hold the x-dtype weights exactly).
        ids, ws = ids_NK.tolist(), weights_NK.to(x_NC.dtype).tolist()
        rows = []
        for n in range(x_NC.shape[0]):
            x = x_NC[n : n + 1]
            acc = None
            for e, w in zip(ids[n], ws[n]):
                y = self.experts.expert(e, x) * w
                acc = y if acc is None else acc + y
            rows.append(acc)
        if not rows:
            return torch.zeros_like(x_NC)
        # Under autocast the experts return bf16/fp16 while x stays fp32: return x's dtype.
        return (rows[0] if len(rows) == 1 else torch.cat(rows)).to(x_NC.dtype)

    def _gathered_path(self, x_NC, weights_NK, ids_NK) -> torch.Tensor:
        """Few tokens without host reads (for torch.compile): index each token's expert weights.

        Written as multiply-and-sum so that inductor fuses the gather into one pass over the chosen
        experts' weights; eager would materialise [N, K, 2F, C] copies, so eager uses the loop.
        """
        h_NKH = (x_NC[:, None, None, :] * self.experts.w13[ids_NK]).sum(-1)  # H = 2F: gate then up
        gate, up = h_NKH.chunk(2, dim=-1)
        y_NKC = ((F.silu(gate) * up)[:, :, None, :] * self.experts.w2[ids_NK]).sum(-1)
        return (y_NKC * weights_NK.to(y_NKC.dtype)[..., None]).sum(1).to(x_NC.dtype)

    @torch.no_grad()
    def reference_forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        """Plain per-expert loop: for each expert, the tokens that chose it. For tests."""
        x_NC = x_BTC.reshape(-1, x_BTC.shape[-1])
        _, _, weights_NK, ids_NK = self.router(x_NC)
        out = torch.zeros_like(x_NC)
        for e in range(self.n_experts):
            tok, slot = torch.where(ids_NK == e)
            if tok.numel():
                out[tok] += self.experts.expert(e, x_NC[tok]) * weights_NK[tok, slot, None].to(x_NC.dtype)
        shared = self._shared(x_NC)
        if shared is not None:
            out = out + shared
        return out.view(x_BTC.shape)
