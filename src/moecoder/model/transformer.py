"""The decoder: embeddings -> N x (attention + dense FFN or MoE) -> norm -> logits.

Pure math: no I/O. `forward` returns logits and the router statistics of every MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention, AttentionStep, KVCache, RMSNorm
from .mla import MLAttention
from .moe import FeedForward, MoE, RouterStats
from .rope import rope_cos_sin, rope_frequencies


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, T, V] (or [B, 1, V] at the positions asked for)
    router: list[RouterStats] = field(default_factory=list)  # one per MoE layer

    @property
    def lb_loss(self) -> torch.Tensor:
        return sum((s.lb_loss for s in self.router), torch.zeros((), device=self.logits.device))

    @property
    def z_loss(self) -> torch.Tensor:
        return sum((s.z_loss for s in self.router), torch.zeros((), device=self.logits.device))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLAttention(cfg, layer) if cfg.is_mla else Attention(cfg, layer)
        self.post_attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn = MoE(cfg) if self.is_moe else FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, step: AttentionStep, cache: KVCache | None):
        x = x + self.attn(self.input_norm(x), step, cache)
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
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
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
    ) -> ForwardOutput:
        """Run the model.

        Without a cache, positions are 0..T-1 (training, scoring). With a cache, row b's new
        tokens sit at cache.pos[b].. and the cache is advanced by T for every row; callers that
        right-pad rows set cache.pos themselves afterwards. `logits_at` [B] picks one position
        per row to project to the vocabulary (saves the LM head on prefill).
        """
        B, T = tokens_BT.shape
        steps = torch.arange(T, device=tokens_BT.device)
        pos_BT = steps.expand(B, T) if cache is None else cache.pos[:B, None] + steps
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_scale, pos_BT)
        x = self.embed(tokens_BT)
        # Cast the rotary tables once here, not in every layer (apply_rope casts to q's dtype anyway).
        step = AttentionStep(pos_BT, cos.to(x.dtype), sin.to(x.dtype), cache)
        stats = []
        for layer in self.layers:
            x, s = layer(x, step, cache)
            if s is not None:
                stats.append(s)
        if cache is not None:
            cache.pos[:B] += T
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]
        logits = self.lm_head(self.norm(x))
        return ForwardOutput(logits, stats)

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
