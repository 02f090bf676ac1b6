"""The decoder: embeddings -> N x (attention + dense FFN or MoE) -> norm -> logits.

Pure math: no I/O. `forward` returns logits (or, given targets, the fused LM-head cross-entropy)
and the router statistics of every MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from ..kernels import cpu as cpu_kernels
from .attention import Attention, AttentionStep, KVCache, RMSNorm
from .linear import Linear, linear
from .loss import IGNORE_INDEX, fused_ce_supported, linear_cross_entropy
from .mla import MLAttention
from .moe import FeedForward, MoE, RouterStats
from .rope import rope_cos_sin, rope_frequencies


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None  # [B, T, V] (or [B, 1, V] at the positions asked for); None given targets
    router: list[RouterStats] = field(default_factory=list)  # one per MoE layer
    ce_loss: torch.Tensor | None = None  # given targets: ce_scale * summed cross-entropy (differentiable)
    ce_sum: torch.Tensor | None = None  # given targets: summed cross-entropy, fp32, detached

    @property
    def _device(self) -> torch.device:
        return (self.logits if self.logits is not None else self.ce_sum).device

    @property
    def lb_loss(self) -> torch.Tensor:
        return sum((s.lb_loss for s in self.router), torch.zeros((), device=self._device))

    @property
    def z_loss(self) -> torch.Tensor:
        return sum((s.z_loss for s in self.router), torch.zeros((), device=self._device))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLAttention(cfg, layer) if cfg.is_mla else Attention(cfg, layer)
        self.post_attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn = MoE(cfg) if self.is_moe else FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, step: AttentionStep, cache: KVCache | None, out_at: torch.Tensor | None = None):
        """x [B, T, C] -> [B, T, C]; with `out_at` [B] (one position per row) -> [B, 1, C], the block's
        output at those positions only: keys and values are made (and cached) for every token, the rest
        (queries, attention, FFN or experts) runs for one token per row."""
        if out_at is None:
            x = x + self.attn(self.input_norm(x), step, cache)
        else:
            rows = torch.arange(x.shape[0], device=x.device)
            x = x[rows, out_at][:, None] + self.attn(self.input_norm(x), step, cache, query_at=out_at)
        h = self.post_attn_norm(x)
        if self.is_moe:
            y, stats = self.ffn(h)
        else:
            y, stats = self.ffn(h), None
        return x + y, stats


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        inv_freq, scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scale = scale

    def forward(
        self,
        tokens_BT: torch.Tensor,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
        targets_BT: torch.Tensor | None = None,
        ce_scale: float = 1.0,
    ) -> ForwardOutput:
        """Run the model.

        Without a cache, positions are 0..T-1 (training, scoring). With a cache, row b's new
        tokens sit at cache.pos[b].. and the cache is advanced by T for every row; callers that
        right-pad rows set cache.pos themselves afterwards. `logits_at` [B] picks one position
        per row to project to the vocabulary (saves the LM head on prefill, and the last layer's work
        but its keys and values for the other positions; its router statistics then cover those alone).

        `targets_BT` (training, scoring; IGNORE_INDEX marks padding) skips the logits: the LM head
        and the cross-entropy run fused in token chunks (model/loss.py), the output's `ce_sum` is
        the summed cross-entropy and `ce_loss` that sum times `ce_scale`, differentiable; `logits`
        is None. The gradients equal those of `F.cross_entropy(logits, ..., reduction="sum")`.
        """
        B, T = tokens_BT.shape
        steps = torch.arange(T, device=tokens_BT.device)
        pos_BT = steps.expand(B, T) if cache is None else cache.pos[:B, None] + steps
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_scale, pos_BT)
        x = self.embed(tokens_BT)
        # Cast the rotary tables once here, not in every layer (apply_rope casts to q's dtype anyway).
        step = AttentionStep(pos_BT, cos.to(x.dtype), sin.to(x.dtype), cache)
        stats = []
        # Only the positions in `logits_at` reach the LM head, so the last layer needs its output (not its
        # keys and values) at those alone: it skips ~(T-1)/T of its work (a prefill's last layer).
        last = len(self.layers) - 1 if logits_at is not None and targets_BT is None else -1
        for i, layer in enumerate(self.layers):
            x, s = layer(x, step, cache, out_at=logits_at) if i == last else layer(x, step, cache)
            if s is not None:
                stats.append(s)
        if cache is not None:
            cache.pos[:B] += T
        if logits_at is not None and last < 0:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]
        h = self.norm(x)
        if targets_BT is not None:
            if fused_ce_supported(h.device.type):
                ce_loss, ce_sum = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets_BT.flatten(),
                                                       scale=ce_scale, ignore_index=IGNORE_INDEX)
            else:  # fp16 autocast: the plain formulation
                logits = self.lm_head(h).float().flatten(0, 1)
                ce = torch.nn.functional.cross_entropy(logits, targets_BT.flatten(), ignore_index=IGNORE_INDEX,
                                                       reduction="sum")
                ce_loss, ce_sum = ce * ce_scale, ce.detach()
            return ForwardOutput(None, stats, ce_loss=ce_loss, ce_sum=ce_sum)
        return ForwardOutput(self._vocab_projection(h), stats)

    def _vocab_projection(self, h_BTC: torch.Tensor) -> torch.Tensor:
        """The LM head. For a few rows (a batched decode step) on CPU it runs as W @ h^T: BLAS's
        h @ W^T kernel for 6-64 rows measured up to 1.6x slower than its tall-skinny one (vocab
        8192 x 256, 8 rows: 0.93 vs 0.58 ms; 32000 x 512: 7.1 vs 5.1 ms), while for 1-4 rows
        h @ W^T is the faster one (a matrix-vector product)."""
        rows = h_BTC.shape[0] * h_BTC.shape[1]
        if 6 <= rows <= 64 and h_BTC.device.type == "cpu" and not torch.is_grad_enabled() \
                and not cpu_kernels.usable(h_BTC, self.lm_head.weight, rows):
            h_NC, w = h_BTC.reshape(rows, -1), self.lm_head.weight
            if torch.is_autocast_enabled("cpu"):
                h_NC, w = h_NC.to(torch.get_autocast_dtype("cpu")), w.to(torch.get_autocast_dtype("cpu"))
            return torch.mm(w, h_NC.t()).t().reshape(*h_BTC.shape[:2], -1)
        return linear(h_BTC, self.lm_head.weight)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random init: normal(0, std) for matrices, ones for norms, zeros for biases."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        for name, b in self.named_buffers():
            if name.endswith("router.bias"):
                b.zero_()
