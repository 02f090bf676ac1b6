"""Sizing: the meta-device counts equal the closed form on every preset and match published figures."""

import pytest
import torch

from moecoder.config import PRESETS, get_preset
from moecoder.model import Transformer
from moecoder.sizing import analytic_params, attention_flops, kv_bytes_per_token, meta_params, size_model


@pytest.mark.parametrize("name", list(PRESETS))
def test_meta_counts_equal_analytic_formula(name):
    cfg = get_preset(name)
    assert meta_params(cfg) == analytic_params(cfg)


@pytest.mark.parametrize(
    "kw",
    [
        {"tie_embeddings": True},
        {"n_shared_experts": 2, "shared_ffn_dim": 48, "shared_expert_gate": True, "qkv_bias": True, "qk_norm": "head"},
        {"dense_layers": (0,), "qk_norm": "full", "routing_bias": True},
        {"n_experts": 0},
        # multi-head latent attention, low-rank and plain query; group-limited routing adds no parameters
        {"kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_dim": 8, "qk_rope_dim": 4, "v_head_dim": 12,
         "n_shared_experts": 1, "dense_layers": (0,), "n_groups": 2},
        {"kv_lora_rank": 16, "qk_nope_dim": 8, "qk_rope_dim": 4, "v_head_dim": 12, "tie_embeddings": True},
    ],
)
def test_variants_counted_the_same_both_ways(kw):
    cfg = get_preset("debug").replace(**kw)
    assert meta_params(cfg) == analytic_params(cfg)


def test_debug_counts_match_a_materialised_model():
    cfg = get_preset("debug")
    m = Transformer(cfg)
    total = sum(p.numel() for p in m.parameters())
    one_expert_all_layers = sum(p[0].numel() for n, p in m.named_parameters() if ".experts." in n)
    counts = meta_params(cfg)
    assert counts.total == total
    assert counts.active == total - (cfg.n_experts - cfg.top_k) * one_expert_all_layers
    assert counts.embedding == 2 * cfg.vocab_size * cfg.dim


@pytest.mark.parametrize(
    "name, total, active, tol",
    [
        ("mixtral-8x7b", 46.7e9, 12.9e9, 0.01),
        ("qwen3-30b-a3b", 30.5e9, 3.3e9, 0.02),
        ("olmoe-1b-7b", 6.9e9, 1.3e9, 0.02),
        ("review-270b-a40b", 270e9, 40e9, 0.02),
    ],
)
def test_published_totals(name, total, active, tol):
    c = meta_params(get_preset(name))
    assert abs(c.total / total - 1) < tol
    assert abs(c.active / active - 1) < tol


def test_minimax_m2_near_230b_10b():
    c = meta_params(get_preset("minimax-m2"))
    assert abs(c.total / 230e9 - 1) < 0.01
    # MiniMax's "10B active" leaves out the 2 x 0.61B embedding + LM head (9.8B); with them it is 11.0B.
    assert abs((c.active - c.embedding) / 10e9 - 1) < 0.03
    assert 10.5e9 < c.active < 11.5e9


@pytest.mark.parametrize(
    "name, total, active",
    [
        ("deepseek-v3", 671e9, 37e9),  # 671.03B / 37.55B (36.63B without the embedding lookup)
        ("deepseek-coder-v2", 236e9, 21e9),  # 235.74B / 21.38B
    ],
)
def test_deepseek_published_totals(name, total, active):
    c = meta_params(get_preset(name))
    assert abs(c.total / total - 1) < 0.01
    assert abs(c.active / active - 1) < 0.02


def test_mla_attention_flops_use_qk_and_v_head_dims():
    cfg = get_preset("deepseek-v3")
    assert attention_flops(cfg, 10) == cfg.n_layers * 2 * 128 * (192 + 128) * 10


def test_flops_and_memory_figures():
    cfg = get_preset("bench-mixtral")
    s = size_model(cfg, context=1000)
    assert s.attention_flops_per_token == 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 1000
    assert s.flops_per_token == 2 * s.active_matmul_params + s.attention_flops_per_token
    # Active matmuls: everything active but the embedding gather and 1-D norm weights.
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    assert s.active_matmul_params == s.active_params - cfg.vocab_size * cfg.dim - norms
    assert s.weight_bytes == {"bf16": 2 * s.total_params, "fp8": s.total_params, "int4": s.total_params / 2}
    assert s.kv_bytes_per_token == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2


def test_kv_bytes_match_a_real_cache():
    from moecoder.model import KVCache

    cfg = get_preset("debug")
    cache = KVCache(cfg, batch=3, max_len=10, dtype=torch.bfloat16)
    assert cache.nbytes() == kv_bytes_per_token(cfg) * 3 * 10


def test_sliding_window_caps_attention_flops():
    cfg = get_preset("debug").replace(sliding_window=16, sliding_window_layers=(1,))
    per_layer = 4 * cfg.n_heads * cfg.head_dim
    assert attention_flops(cfg, 100) == per_layer * (100 + 16)
    assert attention_flops(cfg, 8) == per_layer * 16


def test_bad_context_is_named():
    with pytest.raises(ValueError, match="context"):
        size_model(get_preset("debug"), context=0)
