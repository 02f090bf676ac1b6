"""Equivalence checks of the model math on CPU."""

import pytest
import torch

from moecoder.config import ConfigError, ModelConfig, get_preset
from moecoder.model import KVCache, Transformer
from moecoder.model.moe import FeedForward, MoE


def _model(**kw):
    cfg = get_preset("debug").replace(**kw)
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights(seed=0)
    return cfg, m


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"score_func": "sigmoid", "routing_bias": True, "norm_topk": True, "qk_norm": "full", "rotary_dim": 8},
        {"n_shared_experts": 1, "shared_expert_gate": True, "qkv_bias": True, "qk_norm": "head"},
        {"sliding_window": 5, "dense_layers": (0,)},
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    ],
)
def test_cached_decode_equals_full_forward(kw):
    cfg, m = _model(**kw)
    for layer in m.layers:
        if layer.is_moe and layer.ffn.router.bias is not None:
            layer.ffn.router.bias.normal_()
    tokens = torch.randint(0, cfg.vocab_size, (2, 14))
    with torch.no_grad():
        full = m(tokens).logits
        cache = KVCache(cfg, 2, 32, torch.float32)
        outs = [m(tokens[:, :6], cache=cache).logits]
        for i in range(6, 14):
            outs.append(m(tokens[:, i : i + 1], cache=cache).logits)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)


def test_rows_at_different_positions_match_single_rows():
    cfg, m = _model()
    a, b = torch.randint(0, cfg.vocab_size, (1, 9)), torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        ref_a, ref_b = m(a).logits[0, -1], m(b).logits[0, -1]
        cache = KVCache(cfg, 2, 16, torch.float32)
        padded = torch.zeros(2, 9, dtype=torch.long)
        padded[0], padded[1, :5] = a[0], b[0]
        m(padded[:, :-1], cache=cache)  # prefill all but the last token of the longer row
        cache.pos[1] = 4  # row 1 only had 5 tokens: rewind so its last token is re-fed
        last = torch.tensor([[a[0, -1]], [b[0, -1]]])
        out = m(last, cache=cache).logits[:, 0]
    assert torch.allclose(out[0], ref_a, atol=1e-5)
    assert torch.allclose(out[1], ref_b, atol=1e-5)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_fast_dispatch_equals_reference_loop(score_func):
    cfg = get_preset("debug").replace(n_experts=8, top_k=3, score_func=score_func, n_shared_experts=2)
    torch.manual_seed(1)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    for n_tokens in (1, 3, 40):  # decode path and sorted dispatch path
        x = torch.randn(1, n_tokens, cfg.dim)
        fast, stats = moe(x)
        assert torch.allclose(fast, moe.reference_forward(x), atol=1e-6)
        assert int(stats.tokens_per_expert.sum()) == n_tokens * cfg.top_k


def test_one_expert_moe_equals_dense_ffn():
    cfg = get_preset("debug").replace(n_experts=1, top_k=1)
    torch.manual_seed(2)
    moe, ffn = MoE(cfg), FeedForward(cfg.dim, cfg.moe_ffn_dim)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        ffn.gate_proj.weight.copy_(moe.experts.w13[0, : cfg.moe_ffn_dim])
        ffn.up_proj.weight.copy_(moe.experts.w13[0, cfg.moe_ffn_dim :])
        ffn.down_proj.weight.copy_(moe.experts.w2[0])
    x = torch.randn(2, 7, cfg.dim)
    assert torch.allclose(moe(x)[0], ffn(x), atol=1e-6)


def test_router_stats_and_losses_are_differentiable():
    cfg, m = _model()
    out = m(torch.randint(0, cfg.vocab_size, (2, 16)))
    assert len(out.router) == cfg.n_layers
    (out.lb_loss + out.z_loss).backward()
    assert m.layers[0].ffn.router.gate.weight.grad.abs().sum() > 0
    # perfectly uniform routing gives lb_loss == 1 per layer
    assert all(s.lb_loss.item() > 0 for s in out.router)


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="top_k"):
        ModelConfig(n_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(ConfigError, match="unknown config fields: bogus"):
        ModelConfig.from_dict({"bogus": 1})


def test_replace_derives_again_what_the_preset_derived():
    """A preset's derived sizes follow the fields they came from; sizes it was given stay."""
    from moecoder.config import get_preset

    debug = get_preset("debug")  # head_dim 64 / 4 = 16 (derived), moe_ffn_dim 64 (given)
    assert debug.replace(dim=256).head_dim == 64
    assert debug.replace(dim=256, head_dim=16).head_dim == 16
    assert debug.replace(n_heads=8).head_dim == 8
    assert debug.replace(vocab_size=100).head_dim == 16  # nothing it derives from changed
    qwen = get_preset("qwen3-30b-a3b")  # head_dim 128 given (dim / n_heads would be 64)
    assert qwen.replace(dim=1024).head_dim == 128
    mixtral = get_preset("bench-mixtral")  # moe_ffn_dim and shared_ffn_dim derived from ffn_dim
    changed = mixtral.replace(ffn_dim=2000)
    assert (changed.moe_ffn_dim, changed.shared_ffn_dim) == (2000, 2000)
    assert mixtral.replace(ffn_dim=2000, moe_ffn_dim=500).shared_ffn_dim == 500
