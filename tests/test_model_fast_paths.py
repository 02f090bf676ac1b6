"""The decode fast paths against the plain ones: the host-read-free MoE path and the compiled decode step."""

import pytest
import torch
import torch._dynamo

from moecoder.config import get_preset
from moecoder.generate import decode_one_token, prefill
from moecoder.model import KVCache, Transformer

CONFIGS = [
    {},
    {"score_func": "sigmoid", "routing_bias": True, "norm_topk": True, "qk_norm": "full", "rotary_dim": 8},
    {"sliding_window": 5, "n_shared_experts": 1, "shared_expert_gate": True, "qk_norm": "head"},
]


def _model(**kw):
    cfg = get_preset("debug").replace(**kw)
    m = Transformer(cfg)
    m.init_weights(seed=0)
    for layer in m.layers:
        if layer.is_moe and layer.ffn.router.bias is not None:
            layer.ffn.router.bias.normal_(generator=torch.Generator().manual_seed(1))
    return cfg, m.eval()


@pytest.mark.parametrize("kw", CONFIGS)
def test_gathered_moe_path_equals_per_token_loop(kw):
    cfg, m = _model(**kw)
    moe = next(layer.ffn for layer in m.layers if layer.is_moe)
    x_NC = torch.randn(3, cfg.dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, _, weights_NK, ids_NK = moe.router(x_NC)
        loop = moe._decode_path(x_NC, weights_NK, ids_NK)
        gathered = moe._gathered_path(x_NC, weights_NK, ids_NK)
        ref = moe.reference_forward(x_NC[None])[0] - (moe._shared(x_NC) if moe.shared is not None else 0)
    assert torch.allclose(gathered, loop, atol=1e-6)
    assert torch.allclose(loop, ref, atol=1e-6)


@pytest.mark.parametrize("kw", CONFIGS)
def test_compiled_decode_step_is_one_graph_without_recompiles(kw):
    """Traced decode (static shapes: scatter write, whole-cache mask, gathered experts) == eager decode,
    for two rows at different positions, and the step compiles once for all positions."""
    cfg, m = _model(**kw)
    torch._dynamo.reset()
    # The "eager" backend runs exactly the traced graph without inductor's minutes of codegen.
    step = torch.compile(decode_one_token, backend="eager", fullgraph=True, dynamic=False)
    prompts = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([7, 4])
    caches = [KVCache(cfg, 2, 20, torch.float32) for _ in range(2)]
    with torch.inference_mode():
        logits = [prefill(m, prompts, lengths, c) for c in caches]
        for i in range(10):
            tok = logits[0].argmax(-1)[:, None]
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                logits = [decode_one_token(m, tok, caches[0]), step(m, tok, caches[1])]
            assert torch.allclose(logits[1], logits[0], atol=1e-5), f"step {i}"
    assert torch.equal(caches[0].pos, caches[1].pos)


@pytest.mark.parametrize("rows", [5, 6, 8, 64, 65])
def test_batched_decode_vocab_projection_equals_the_linear_layer(rows):
    """A decode step of 6-64 rows projects to the vocabulary as W @ h^T (faster on CPU BLAS);
    the logits equal the plain nn.Linear projection's."""
    torch.manual_seed(0)
    model = Transformer(get_preset("debug")).eval()
    model.init_weights(seed=1)
    tokens = torch.randint(0, model.cfg.vocab_size, (rows, 1))
    with torch.inference_mode():
        fast = model(tokens).logits
    with torch.no_grad():
        h = torch.randn(rows, 1, model.cfg.dim)
        assert torch.allclose(model._vocab_projection(h), model.lm_head(h), atol=1e-5, rtol=1e-5)
    with torch.enable_grad():  # training path: the plain linear layer
        plain = model(tokens).logits.detach()
    assert fast.shape == plain.shape == (rows, 1, model.cfg.vocab_size)
    assert torch.allclose(fast, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", CONFIGS + [
    {"sliding_window": 3, "dense_layers": (1,), "qkv_bias": True},
    {"kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_dim": 8, "qk_rope_dim": 4, "v_head_dim": 12,
     "rope_interleave": True},  # latent attention (DeepSeek): the one query attends in latent space
])
def test_prefill_runs_the_last_layer_only_where_logits_are_asked(kw):
    """A prefill projects one position per row to the vocabulary, so its last layer makes keys and
    values for every token but runs queries, attention and experts for that position only; the logits
    and every layer's cache equal those of the full forward (right-padded rows of three lengths)."""
    cfg, m = _model(**kw)
    tokens = torch.randint(0, cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([11, 4, 8])
    seen = {}
    last = m.layers[-1]
    q_in = last.attn.q_a_proj if hasattr(last.attn, "q_a_proj") else last.attn.q_proj
    hooks = [last.ffn.register_forward_pre_hook(lambda mod, args: seen.__setitem__("ffn", tuple(args[0].shape))),
             q_in.register_forward_pre_hook(lambda mod, args: seen.__setitem__("q", tuple(args[0].shape)))]
    with torch.inference_mode():
        cache_a, cache_b = (KVCache(cfg, 3, 16, torch.float32) for _ in range(2))
        got = prefill(m, tokens, lengths, cache_a)
        asked = dict(seen)
        full = m(tokens, cache=cache_b).logits[torch.arange(3), lengths - 1]
    for h in hooks:
        h.remove()
    assert asked["ffn"] == asked["q"] == (3, 1, cfg.dim), asked
    assert seen["ffn"] == (3, 11, cfg.dim)  # the full forward ran every token
    assert torch.allclose(got, full, rtol=1e-5, atol=1e-5), (got - full).abs().max()
    for a, b in zip(cache_a.k + cache_a.v, cache_b.k + cache_b.v):
        for row, n in enumerate(lengths.tolist()):
            assert torch.equal(a[row, :, :n], b[row, :, :n])
