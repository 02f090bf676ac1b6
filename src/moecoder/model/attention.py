"""Grouped-query attention with RoPE, optional qk-norm, q/k/v bias and sliding window.

Shape legend: B batch, T new tokens, S cached keys, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .linear import Linear
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
        n_v = cfg.n_layers
        if cfg.kv_lora_rank is not None:  # MLA (mla.py): one latent [c, k_rope] per token in k, nothing in v
            shape, n_v = (batch, 1, max_len, cfg.kv_lora_rank + cfg.qk_rope_dim), 0
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_v)]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class AttentionStep:
    """Where one forward's T new tokens sit, worked out once per forward and shared by every layer.

    pos_BT: the tokens' positions (row b's are pos[b]..pos[b]+T-1); cos/sin: their rotary tables.
    `kv_len` is how many key positions attention sees (the used prefix of the cache after this
    step's write, or T without a cache); `start` is the common write position when every row
    writes the same slice, else None (rows at different positions: one scatter per layer).
    """

    def __init__(self, pos_BT: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None):
        self.pos_BT, self.cos, self.sin = pos_BT, cos, sin
        T = pos_BT.shape[1]
        self._masks: dict[int | None, torch.Tensor] = {}
        if cache is None:
            self.kv_len, self.start = T, 0
            return
        if torch.compiler.is_compiling():
            # Traced by torch.compile: no host reads, so every decode step has the same shapes and
            # compiles once: write by scatter, attend over the whole cache under a mask.
            self.kv_len, self.start = cache.max_len, None
            return
        first = pos_BT[:, 0].tolist()  # the step's one host read of positions
        self.kv_len = max(first) + T
        if self.kv_len > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} positions is full (needs {self.kv_len})")
        self.start = first[0] if all(p == first[0] for p in first) else None

    def queries_at(self, x_BTC: torch.Tensor, query_at: torch.Tensor | None):
        """The query side's input and rotary tables: every token's, or only each row's `query_at`
        position ([B, 1, ...]: a prefill's last layer, whose other outputs nobody reads)."""
        if query_at is None:
            return x_BTC, self.cos, self.sin
        rows = torch.arange(x_BTC.shape[0], device=x_BTC.device)
        return x_BTC[rows, query_at][:, None], self.cos[rows, query_at][:, None], self.sin[rows, query_at][:, None]

    def mask_at(self, query_at: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
        """Boolean [B, 1, n_keys] mask for one query per row at its `query_at` position."""
        rows = torch.arange(query_at.shape[0], device=query_at.device)
        key_pos = torch.arange(n_keys, device=self.pos_BT.device)
        return _mask(self.pos_BT[rows, query_at][:, None], key_pos, window)

    def mask(self, window: int | None) -> torch.Tensor:
        """Boolean [B, T, kv_len] mask (see `_mask`), built once per window size per forward."""
        if window not in self._masks:
            key_pos = torch.arange(self.kv_len, device=self.pos_BT.device)
            self._masks[window] = _mask(self.pos_BT, key_pos, window)
        return self._masks[window]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window if cfg.uses_window(layer) else None
        self.layer = layer
        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.dim, q_out, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, kv_out, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, kv_out, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_out, cfg.dim, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(q_out, cfg.norm_eps), RMSNorm(kv_out, cfg.norm_eps)

    def forward(self, x_BTC, step: AttentionStep, cache: KVCache | None = None,
                query_at: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output [B, T, C]; with `query_at` [B] (each row's one position whose output is
        needed, e.g. the last layer of a prefill), keys and values are still made (and cached) for
        all T tokens, but queries, attention and the output projection only for those: [B, 1, C]."""
        B, T, _ = x_BTC.shape
        x_q, cos_q, sin_q = step.queries_at(x_BTC, query_at)
        Tq = x_q.shape[1]
        q, k, v = self.q_proj(x_q), self.k_proj(x_BTC), self.v_proj(x_BTC)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHTD = q.view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)
        k_BKTD = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v_BKTD = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q_BHTD, k_BKTD = self.q_norm(q_BHTD), self.k_norm(k_BKTD)
        q_BHTD, k_BKTD = apply_rope(q_BHTD, cos_q, sin_q), apply_rope(k_BKTD, step.cos, step.sin)

        keys, vals, mask = k_BKTD, v_BKTD, None
        if query_at is not None:
            if cache is not None:
                keys, vals = _cache_write(cache, self.layer, k_BKTD, v_BKTD, step)
            mask = step.mask_at(query_at, keys.shape[2], self.window)
        elif cache is None:
            if self.window is not None:
                mask = step.mask(self.window)
        else:
            keys, vals = _cache_write(cache, self.layer, k_BKTD, v_BKTD, step)
            if self.window is None and T > 1 and step.kv_len == T:
                keys, vals = k_BKTD, v_BKTD  # fresh prefill: plain causal attention
            elif T == 1 and step.start is not None:
                # Every row's query is its newest key: it sees the last `window` keys, no mask needed.
                lo = 0 if self.window is None else max(0, step.kv_len - self.window)
                keys, vals = keys[:, :, lo:], vals[:, :, lo:]
            else:
                mask = step.mask(self.window)
        # enable_gqa lets SDPA broadcast the K kv heads over the H query heads without copying the cache.
        gqa = self.n_heads != self.n_kv
        if mask is None:
            out = F.scaled_dot_product_attention(q_BHTD, keys, vals, is_causal=T > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q_BHTD, keys, vals, attn_mask=mask[:, None], enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, Tq, self.n_heads * self.head_dim))


def _cache_write(cache: KVCache, layer: int, k_BKTD, v_BKTD, step: AttentionStep):
    """Store new keys/values at each row's positions; return the used prefix of the cache."""
    B, _, T, _ = k_BKTD.shape
    kc, vc = cache.k[layer], cache.v[layer]
    if step.start is not None:  # all rows write the same slice: plain copy, no scatter
        kc[:B, :, step.start : step.start + T] = k_BKTD
        vc[:B, :, step.start : step.start + T] = v_BKTD
    else:
        rows = torch.arange(B, device=k_BKTD.device)[:, None]
        kc[rows, :, step.pos_BT] = k_BKTD.transpose(1, 2)
        vc[rows, :, step.pos_BT] = v_BKTD.transpose(1, 2)
    return kc[:B, :, : step.kv_len], vc[:B, :, : step.kv_len]


def _mask(q_pos_BT: torch.Tensor, k_pos, window: int | None) -> torch.Tensor:
    """Boolean [B, T, S] mask: key j is visible to a query at position p iff p - window < j <= p."""
    if k_pos.dim() == 1:
        k_pos = k_pos[None, :]
    qp, kp = q_pos_BT[:, :, None], k_pos[:, None, :]
    mask = kp <= qp
    if window is not None:
        mask &= kp > qp - window
    return mask
