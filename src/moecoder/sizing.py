"""Model sizing: parameters (total and active), forward FLOPs, weight and KV-cache memory.

Conventions (printed with every table):
- Active parameters are those a single token touches: the whole embedding matrix and LM head
  (as the published "A10B"-style figures count them), attention, norms, the full router, the
  shared experts and `top_k` routed experts per MoE layer.
- Forward FLOPs per token = 2 x active matmul parameters (one multiply-add = 2 FLOPs; the
  embedding lookup is a gather and is not counted, the LM head is) + attention scores and
  values, 4 x heads x head_dim per key, for a token that attends to `context` keys (itself
  included; sliding-window layers attend to at most `window` keys). Norms, RoPE, softmax and
  activations are ignored. Multi-head latent attention (DeepSeek) counts the same per-head form,
  2 x heads x (query/key head dim + value head dim) per key, as if keys and values were expanded.
- Weight memory = total parameters x bytes per parameter (bf16 2, fp8 1, int4 0.5), without
  quantisation scales. KV cache = keys + values of every layer for one token, in bf16; with MLA,
  the one compressed latent + rotary key per layer that model/mla.py caches.

Counts come from the model built on the `meta` device; `analytic_params` is an independent
closed-form formula that the tests hold equal to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .config import ModelConfig

WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5}
KV_DTYPE_BYTES = 2  # bf16

CONVENTIONS = (
    "active = params one token touches (full embedding + LM head, attention, norms, router, shared + top-k experts); "
    "FLOPs/token = 2 x active matmul params (LM head yes, embedding lookup no) + 2 x heads x (qk + v head dims) x keys "
    "attended (a token at the given context; windowed layers capped at the window); weights without quantisation "
    "scales; KV cache in bf16 (MLA: the cached latent)."
)


@dataclass(frozen=True)
class ParamCounts:
    total: int  # distinct parameters (tied embeddings counted once)
    active: int  # parameters touched per token
    active_matmul: int  # weights of the matmuls one token runs (LM head included, embedding lookup not)
    embedding: int  # embedding matrix + untied LM head (some model cards leave these out of "active")


@dataclass(frozen=True)
class Sizing:
    total_params: int
    active_params: int
    active_matmul_params: int
    embedding_params: int
    context: int
    flops_per_token: int
    attention_flops_per_token: int
    weight_bytes: dict[str, float]
    kv_bytes_per_token: int

    def to_dict(self) -> dict:
        return asdict(self)


def _mla_params(cfg: ModelConfig) -> int:
    """Multi-head latent attention: (low-rank) query, latent down/up projections, their norms, output."""
    qk = cfg.qk_nope_dim + cfg.qk_rope_dim
    if cfg.q_lora_rank is None:
        n = cfg.dim * cfg.n_heads * qk
    else:
        n = cfg.dim * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * cfg.n_heads * qk
    n += cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_dim) + cfg.kv_lora_rank  # kv_a_proj + its norm
    n += cfg.kv_lora_rank * cfg.n_heads * (cfg.qk_nope_dim + cfg.v_head_dim)  # kv_b_proj
    return n + cfg.n_heads * cfg.v_head_dim * cfg.dim  # o_proj


def _block_params(cfg: ModelConfig, layer: int, active: bool) -> int:
    """Parameters of one decoder block (active=True: only the routed experts a token uses)."""
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    if cfg.is_mla:
        n = _mla_params(cfg)
    else:
        n = cfg.dim * q_out + 2 * cfg.dim * kv_out + q_out * cfg.dim  # q, k, v, o
        if cfg.qkv_bias:
            n += q_out + 2 * kv_out
        n += {"none": 0, "head": 2 * cfg.head_dim, "full": q_out + kv_out}[cfg.qk_norm]
    n += 2 * cfg.dim  # input and post-attention norms
    if not cfg.is_moe_layer(layer):
        return n + 3 * cfg.dim * cfg.ffn_dim
    experts = cfg.top_k if active else cfg.n_experts
    n += cfg.dim * cfg.n_experts  # router gate: every score is computed for every token
    n += experts * 3 * cfg.dim * cfg.moe_ffn_dim
    n += 3 * cfg.dim * cfg.n_shared_experts * cfg.shared_ffn_dim
    if cfg.shared_expert_gate:
        n += cfg.dim
    return n


def _norm_params(cfg: ModelConfig, layer: int) -> int:
    if cfg.is_mla:
        return (cfg.q_lora_rank or 0) + cfg.kv_lora_rank + 2 * cfg.dim
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    qk = {"none": 0, "head": 2 * cfg.head_dim, "full": q_out + kv_out}[cfg.qk_norm]
    bias = q_out + 2 * kv_out if cfg.qkv_bias else 0
    return qk + bias + 2 * cfg.dim


def analytic_params(cfg: ModelConfig) -> ParamCounts:
    """Closed-form parameter counts, written independently of the module tree."""
    embed = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    total = embed + head + cfg.dim  # + final norm
    active = embed + head + cfg.dim
    vectors = cfg.dim  # 1-D parameters (norms, biases), not matmuls
    for i in range(cfg.n_layers):
        total += _block_params(cfg, i, active=False)
        active += _block_params(cfg, i, active=True)
        vectors += _norm_params(cfg, i)
    # Matmuls one token runs: everything active except the embedding gather and 1-D vectors,
    # plus the LM head projection (even when its weight is the tied embedding).
    active_matmul = active - embed - head - vectors + cfg.vocab_size * cfg.dim
    return ParamCounts(total=total, active=active, active_matmul=active_matmul, embedding=embed + head)


def meta_params(cfg: ModelConfig) -> ParamCounts:
    """Counts read off the real module tree, built on the meta device (no memory allocated)."""
    from .model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    total = active = active_matmul = embedding = 0
    for name, p in model.named_parameters():  # tied weights appear once
        n = p.numel()
        total += n
        if name in ("embed.weight", "lm_head.weight"):
            embedding += n
        if ".experts." in name:  # stacked routed experts [E, ...]: a token uses top_k of them
            n = n // p.shape[0] * cfg.top_k
        active += n
        if p.dim() >= 2 and name != "embed.weight":
            active_matmul += n
    if cfg.tie_embeddings:  # the LM head matmul still runs, with the embedding's weight
        active_matmul += model.embed.weight.numel()
    return ParamCounts(total=total, active=active, active_matmul=active_matmul, embedding=embedding)


def attention_flops(cfg: ModelConfig, context: int) -> int:
    """Score (q.k) and value (p.v) FLOPs for one token attending to `context` keys."""
    qk, v = cfg.head_dim, (cfg.v_head_dim if cfg.is_mla else cfg.head_dim)  # MLA: head_dim is nope + rope
    flops = 0
    for i in range(cfg.n_layers):
        keys = min(context, cfg.sliding_window) if cfg.uses_window(i) else context
        flops += 2 * cfg.n_heads * (qk + v) * keys
    return flops


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = KV_DTYPE_BYTES) -> int:
    """Keys and values of every layer for one token (MLA: the latent and rotary key, see model/mla.py)."""
    if cfg.is_mla:
        return cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_dim) * dtype_bytes
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def size_model(cfg: ModelConfig, context: int = 4096) -> Sizing:
    """All figures for one config; parameter counts from the meta-device model."""
    if context <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context}")
    counts = meta_params(cfg)
    attn = attention_flops(cfg, context)
    return Sizing(
        total_params=counts.total,
        active_params=counts.active,
        active_matmul_params=counts.active_matmul,
        embedding_params=counts.embedding,
        context=context,
        flops_per_token=2 * counts.active_matmul + attn,
        attention_flops_per_token=attn,
        weight_bytes={k: counts.total * b for k, b in WEIGHT_BYTES.items()},
        kv_bytes_per_token=kv_bytes_per_token(cfg),
    )


def human(n: float, unit: str = "") -> str:
    """1.23B / 45.6M style numbers (powers of 1000)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    """Bytes in GB/MB/KB (powers of 1000) and GiB in brackets for the large ones."""
    for scale, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if n >= scale:
            text = f"{n / scale:.2f} {suffix}"
            return text + (f" ({n / 2**30:.1f} GiB)" if suffix == "GB" else "")
    return f"{n:.0f} B"
