"""Rotary position embeddings, with the scaling types the supported HF families use.

Shape legend: B batch, T tokens, H heads, D head dim, R rotary dim (<= D).
"""

from __future__ import annotations

import math

import torch

from ..config import ConfigError, ModelConfig

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _yarn(inv_freq_base: torch.Tensor, rot_dim: int, theta: float, p: dict) -> tuple[torch.Tensor, float]:
    factor = float(p["factor"])
    orig = p.get("original_max_position_embeddings")
    if orig is None:
        raise ConfigError("yarn rope scaling needs original_max_position_embeddings")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attn_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def corr_dim(n_rot: float) -> float:
        return (rot_dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp  # 1 where we keep the original frequency
    inv_freq = (inv_freq_base / factor) * (1 - extrap) + inv_freq_base * extrap
    return inv_freq, float(attn_factor)


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor = float(p["factor"])
    low_ff, high_ff = float(p["low_freq_factor"]), float(p["high_freq_factor"])
    orig = float(p["original_max_position_embeddings"])
    low_wl, high_wl = orig / low_ff, orig / high_ff
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return torch.where(medium, smoothed, out)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the attention scaling applied to cos/sin."""
    r = cfg.rot_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    p = dict(cfg.rope_scaling or {})
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(p["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, p), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, r, cfg.rope_theta, p)
    raise ConfigError(f"unsupported rope type {kind!r}; supported: {', '.join(ROPE_TYPES)}")


def rope_cos_sin(inv_freq: torch.Tensor, scale: float, pos_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, R] (fp32) for integer positions."""
    freqs = pos_BT.to(torch.float32)[..., None] * inv_freq  # [B, T, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x_BHTD: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head (HF "rotate_half" layout); the rest pass through."""
    r = cos_BTR.shape[-1]
    cos, sin = cos_BTR[:, None].to(x_BHTD.dtype), sin_BTR[:, None].to(x_BHTD.dtype)
    x_rot, x_pass = x_BHTD[..., :r], x_BHTD[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)
