"""Multi-head latent attention (MLA), the attention of DeepSeek-V2 and DeepSeek-V3.

Keys and values come from one compressed latent per token: c = norm(W_a x) of width L (kv_lora_rank),
expanded per head by kv_b_proj into a position-free key part (qk_nope_dim) and a value (v_head_dim).
Position enters through a separate rotary key part (qk_rope_dim) that is computed once per token and
shared by all heads. Queries are either one projection or a low-rank pair with a norm between.

    q_h   = [q_nope_h, rope(q_rope_h)]                       query head h, width nope + rope
    k_h   = [W_uk_h c, rope(k_rope)]                          key head h (k_rope shared by the heads)
    v_h   = W_uv_h c
    out   = o_proj(concat_h softmax(q_h . k_h * scale) v_h)

The KV cache holds what each token contributes, [c, rope(k_rope)], L + rope values per token and layer
(576 for DeepSeek-V3 instead of 2 x 128 heads x 192). Attention over the cache runs in latent space
("absorbed"): q_nope_h . W_uk_h c == (W_uk_h^T q_nope_h) . c and W_uv_h applies after the
probabilities, so the cache is never expanded to per-head keys/values. Without a cache (training,
scoring) and on a fresh prefill the keys/values are expanded per head, which costs less when the
queries are as many as the keys.

Shape legend: B batch, T new tokens, S keys, H heads, N qk_nope_dim, R qk_rope_dim, V v_head_dim,
L kv_lora_rank, W = L + R (one cached latent).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import AttentionStep, KVCache, RMSNorm
from .linear import Linear
from .rope import apply_rope

# DeepSeek's q_a_layernorm / kv_a_layernorm use the RMSNorm default eps whatever rms_norm_eps says
# (the reference code and transformers construct them without an eps argument).
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk head dim), times mscale^2 when the rope scaling sets mscale_all_dim (DeepSeek YaRN).

    The YaRN attention factor on cos/sin (rope.py) multiplies q and k by mscale/mscale_all_dim each; this
    factor belongs to the logits themselves, as in DeepSeek's reference code.
    """
    scale = (cfg.qk_nope_dim + cfg.qk_rope_dim) ** -0.5
    p = dict(cfg.rope_scaling or {})
    kind = p.get("rope_type", p.get("type", "default"))
    m_all = p.get("mscale_all_dim")
    if kind != "default" and m_all:
        factor = float(p["factor"])
        m = 1.0 if factor <= 1 else 0.1 * float(m_all) * math.log(factor) + 1.0
        scale *= m * m
    return scale


def rope_pairs(x: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate all R dims of x [B, heads, T, R].

    interleave=False: the halves convention of rope.apply_rope (dims i and i + R/2 form a pair).
    interleave=True: dims (2i, 2i+1) form pair i (DeepSeek's layout); the result is written halves-first
    (all rotated even dims, then all odd), the layout transformers' DeepSeek-V3 uses. Queries and keys are
    permuted alike, so their dot products equal those of the interleaved layout.
    """
    if not interleave:
        return apply_rope(x, cos_BTR, sin_BTR)
    half = cos_BTR.shape[-1] // 2
    cos, sin = cos_BTR[:, None, :, :half].to(x.dtype), sin_BTR[:, None, :, :half].to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.rank = cfg.n_heads, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim
        qk = self.nope + self.rope
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.dim, cfg.n_heads * qk, bias=False)
        else:
            self.q_a_proj = Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, cfg.n_heads * qk, bias=False)
        self.low_rank_q = cfg.q_lora_rank is not None
        self.kv_a_proj = Linear(cfg.dim, self.rank + self.rope, bias=False)  # HF: kv_a_proj_with_mqa
        self.kv_a_norm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        self.scale = mla_softmax_scale(cfg)
        self.interleave = cfg.rope_interleave

    def forward(self, x_BTC: torch.Tensor, step: AttentionStep, cache: KVCache | None = None,
                query_at: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output [B, T, C]; with `query_at` [B] (as in attention.py) latents are made (and cached)
        for all T tokens, the query side and attention only for those positions: [B, 1, C]."""
        B, T, _ = x_BTC.shape
        x_q, cos_q, sin_q = step.queries_at(x_BTC, query_at)
        Tq = x_q.shape[1]
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_q))) if self.low_rank_q else self.q_proj(x_q)
        q_nope, q_rope = q.view(B, Tq, self.n_heads, -1).transpose(1, 2).split([self.nope, self.rope], dim=-1)
        q_rope = rope_pairs(q_rope, cos_q, sin_q, self.interleave)
        c_BTL, k_rope_BTR = self.kv_a_proj(x_BTC).split([self.rank, self.rope], dim=-1)
        k_rope = rope_pairs(k_rope_BTR[:, None], step.cos, step.sin, self.interleave)
        latent_B1TW = torch.cat((self.kv_a_norm(c_BTL)[:, None], k_rope), dim=-1)

        if query_at is not None:  # one query per row over its prefix, in latent space (as decode)
            latents = latent_B1TW if cache is None else _latent_write(cache, self.layer, latent_B1TW, step)
            out = self._absorbed(q_nope, q_rope, latents, step.mask_at(query_at, latents.shape[2], None)[:, None])
        elif cache is None:
            out = self._expanded(q_nope, q_rope, latent_B1TW, causal=True)
        else:
            cached = _latent_write(cache, self.layer, latent_B1TW, step)
            if T > 1 and step.kv_len == T:  # fresh prefill: plain causal attention over this step's tokens
                out = self._expanded(q_nope, q_rope, latent_B1TW, causal=True)
            else:
                # A single new token per row at a common position sees every cached key: no mask.
                mask = None if T == 1 and step.start is not None else step.mask(None)[:, None]
                out = self._absorbed(q_nope, q_rope, cached, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, Tq, self.n_heads * self.v_dim))

    def _expanded(self, q_nope, q_rope, latent_B1SW, causal: bool) -> torch.Tensor:
        """Per-head keys and values from the latents; [B, H, T, V]."""
        B, _, S, _ = latent_B1SW.shape
        c_BSL, k_rope_B1SR = latent_B1SW[:, 0, :, : self.rank], latent_B1SW[..., self.rank :]
        kv = self.kv_b_proj(c_BSL).view(B, S, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v_BHSV = kv.split([self.nope, self.v_dim], dim=-1)
        k_BHSD = torch.cat((k_nope, k_rope_B1SR.expand(-1, self.n_heads, -1, -1)), dim=-1)
        q_BHTD = torch.cat((q_nope, q_rope), dim=-1)
        return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSV, is_causal=causal and q_BHTD.shape[2] > 1,
                                              scale=self.scale)

    def _absorbed(self, q_nope, q_rope, cached_B1SW, mask) -> torch.Tensor:
        """Attention in latent space over the cached latents; [B, H, T, V]."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk_HNL, w_uv_HVL = w[:, : self.nope], w[:, self.nope :]
        q_lat_BHTL = q_nope @ w_uk_HNL  # q_nope_h . (W_uk_h c) == (q_nope_h W_uk_h) . c
        q_BHTW = torch.cat((q_lat_BHTL, q_rope), dim=-1)
        # One shared "kv head": keys are whole latents [c, k_rope], values their c part.
        out_BHTL = F.scaled_dot_product_attention(q_BHTW, cached_B1SW, cached_B1SW[..., : self.rank],
                                                  attn_mask=mask, scale=self.scale, enable_gqa=True)
        return out_BHTL @ w_uv_HVL.transpose(1, 2)


def _latent_write(cache: KVCache, layer: int, latent_B1TW: torch.Tensor, step: AttentionStep) -> torch.Tensor:
    """Store the new latents at each row's positions; return the used prefix [B, 1, kv_len, W] of the cache."""
    B, _, T, _ = latent_B1TW.shape
    buf = cache.k[layer]
    if step.start is not None:  # all rows write the same slice: plain copy, no scatter
        buf[:B, :, step.start : step.start + T] = latent_B1TW
    else:
        rows = torch.arange(B, device=latent_B1TW.device)[:, None]
        buf[rows, :, step.pos_BT] = latent_B1TW.transpose(1, 2)
    return buf[:B, :, : step.kv_len]
