"""Grouped-query attention with RoPE, optional qk-norm, q/k/v bias and sliding window.

Shape legend: B batch, T new tokens, S cached keys, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .rope import apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 then cast back, as the reference implementations do.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache:
    """Static per-layer key/value buffers [B, K, S_max, D] with a write position per row.

    Row b holds `pos[b]` valid tokens. A step writes its T new tokens at pos[b]..pos[b]+T-1,
    so rows of different lengths share one batch (right-padded prefill, then decode).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device="cpu"):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window if cfg.uses_window(layer) else None
        self.layer = layer
        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, q_out, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, kv_out, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, kv_out, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_out, cfg.dim, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(q_out, cfg.norm_eps), RMSNorm(kv_out, cfg.norm_eps)

    def forward(self, x_BTC, cos, sin, pos_BT, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        q, k, v = self.q_proj(x_BTC), self.k_proj(x_BTC), self.v_proj(x_BTC)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHTD = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BKTD = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v_BKTD = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q_BHTD, k_BKTD = self.q_norm(q_BHTD), self.k_norm(k_BKTD)
        q_BHTD, k_BKTD = apply_rope(q_BHTD, cos, sin), apply_rope(k_BKTD, cos, sin)

        if cache is None:
            keys, vals = k_BKTD, v_BKTD
            if self.window is None:
                mask = None
            else:
                mask = _mask(pos_BT, pos_BT, self.window)
        else:
            keys, vals, key_pos = _cache_write(cache, self.layer, k_BKTD, v_BKTD, pos_BT)
            if self.window is None and T > 1 and keys.shape[2] == T:
                keys, vals, mask = k_BKTD, v_BKTD, None  # fresh prefill: plain causal attention
            else:
                mask = _mask(pos_BT, key_pos, self.window)
        # enable_gqa lets SDPA broadcast the K kv heads over the H query heads without copying the cache.
        gqa = self.n_heads != self.n_kv
        if mask is None:
            out = F.scaled_dot_product_attention(q_BHTD, keys, vals, is_causal=T > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q_BHTD, keys, vals, attn_mask=mask[:, None], enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def _cache_write(cache: KVCache, layer: int, k_BKTD, v_BKTD, pos_BT):
    """Store new keys/values at each row's positions; return the used prefix of the cache."""
    B, _, T, _ = k_BKTD.shape
    used = int(pos_BT.max()) + 1
    if used > cache.max_len:
        raise ValueError(f"KV cache of {cache.max_len} positions is full (needs {used})")
    kc, vc = cache.k[layer], cache.v[layer]
    if B == 1 or bool((pos_BT[:, :1] == pos_BT[0, 0]).all()):
        start = int(pos_BT[0, 0])  # all rows write the same slice: plain copy, no scatter
        kc[:B, :, start : start + T] = k_BKTD
        vc[:B, :, start : start + T] = v_BKTD
    else:
        rows = torch.arange(B, device=pos_BT.device)[:, None]
        kc[rows, :, pos_BT] = k_BKTD.transpose(1, 2)
        vc[rows, :, pos_BT] = v_BKTD.transpose(1, 2)
    key_pos = torch.arange(used, device=pos_BT.device)
    return kc[:B, :, :used], vc[:B, :, :used], key_pos


def _mask(q_pos_BT: torch.Tensor, k_pos, window: int | None) -> torch.Tensor:
    """Boolean [B, T, S] mask: key j is visible to a query at position p iff p - window < j <= p."""
    if k_pos.dim() == 1:
        k_pos = k_pos[None, :]
    qp, kp = q_pos_BT[:, :, None], k_pos[:, None, :]
    mask = kp <= qp
    if window is not None:
        mask &= kp > qp - window
    return mask
