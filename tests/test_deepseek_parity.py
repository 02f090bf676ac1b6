"""DeepSeek-V2 / V3 (multi-head latent attention, group-limited routing) against transformers.

Tiny random transformers models built at test time (norms and the V3 routing-correction bias randomised
too, since they start at constants), written to disk and loaded with moecoder: fp32 logits agree within
1e-4 and 32-token greedy continuations through moecoder's latent KV cache are identical. The reverse
direction saves a moecoder model and loads it with transformers. The variants cover a plain q_proj
(q_lora_rank null), group-limited routing of both kinds, YaRN with the mscale softmax adjustment, and
both RoPE pairings (DeepSeek's interleaved pairs and V3's rope_interleave=False halves).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo
import transformers  # the dev extra pins it; a missing reference must fail, not skip, the parity tests
from parity_helpers import greedy as _greedy
from parity_helpers import randomise
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from moecoder.checkpoint import (
    CheckpointError,
    from_hf_config,
    load_checkpoint,
    read_config,
    save_checkpoint,
    to_hf_config,
)
from moecoder.config import get_preset
from moecoder.generate import decode_one_token, prefill
from moecoder.model import KVCache, Transformer
from moecoder.model.mla import mla_softmax_scale
from moecoder.sizing import kv_bytes_per_token

transformers.logging.set_verbosity_error()

FP32_ATOL = 1e-4

_BASE = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 4, "intermediate_size": 40, "moe_intermediate_size": 16, "num_experts_per_tok": 2,
         "n_routed_experts": 8, "n_shared_experts": 2, "first_k_dense_replace": 1, "kv_lora_rank": 16,
         "q_lora_rank": 24, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 12, "bos_token_id": 1,
         "eos_token_id": 2, "pad_token_id": 0}
_YARN = {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}

VARIANTS = {
    # V3 as released: sigmoid + bias, the 2 best of 4 groups by top-2 sum, renormalised, x 2.5.
    "v3-groups": ("deepseek_v3", {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}),
    # V3 without group limit, without renormalisation, halves RoPE, YaRN whose mscale_all_dim scales the logits.
    "v3-yarn-halves": ("deepseek_v3", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False,
                                       "rope_interleave": False, "max_position_embeddings": 64,
                                       "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, **_YARN,
                                                           "mscale": 1.0, "mscale_all_dim": 0.8}}),
    # V2 / Coder-V2: softmax, the 2 best of 4 groups by their best expert, weights x 3.
    "v2-group-limited": ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                         "routed_scaling_factor": 3.0}),
    # V2-Lite: one q_proj (q_lora_rank null), greedy routing; YaRN in the transformers-4 spelling.
    "v2-lite-yarn": ("deepseek_v2", {"q_lora_rank": None, "topk_method": "greedy", "max_position_embeddings": 64,
                                     "rope_scaling": {"type": "yarn", **_YARN, "mscale": 0.707,
                                                      "mscale_all_dim": 0.707}}),
}


def _hf_config(variant: str):
    model_type, extra = VARIANTS[variant]
    return AutoConfig.for_model(model_type, **{**_BASE, **extra})


def _hf_model(variant: str, seed: int = 0):
    cfg = _hf_config(variant)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    return randomise(model)


def _prompt(vocab: int, batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(7))


def _max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_pretrained_logits_and_greedy_match(variant, tmp_path):
    hf = _hf_model(variant)
    hf.save_pretrained(tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.config.model_type == VARIANTS[variant][0] and ckpt.config.is_mla
    assert ckpt.eos_token_ids == [2] and ckpt.bos_token_id == 1
    prompt = _prompt(hf.config.vocab_size)
    with torch.no_grad():
        assert _max_delta(ckpt.model(prompt).logits, hf(prompt).logits) <= FP32_ATOL
    ref_tokens = hf.generate(prompt, do_sample=False, max_new_tokens=32, min_new_tokens=32,
                             eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]
    assert torch.equal(_greedy(ckpt.model, prompt, 32), ref_tokens)


@pytest.mark.parametrize("variant", ["v3-groups", "v2-lite-yarn"])
def test_fused_expert_naming_loads(variant, tmp_path):
    """transformers 5's in-memory names on disk: experts as gate_up_proj / down_proj stacks."""
    hf = _hf_model(variant, seed=1)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    hf.config.to_json_file(folder / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    prompt = _prompt(hf.config.vocab_size)
    with torch.no_grad():
        assert _max_delta(load_checkpoint(folder).model(prompt).logits, hf(prompt).logits) <= FP32_ATOL


def _random_moecoder_model(variant: str, seed: int = 4) -> Transformer:
    model = Transformer(from_hf_config(_hf_config(variant).to_dict()))
    model.init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if "norm" in name else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("router.bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moecoder_save_loads_in_transformers(variant, tmp_path):
    model = _random_moecoder_model(variant)
    save_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=30_000, extra_config={"eos_token_id": 2})
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    assert type(hf).__name__ == to_hf_config(model.cfg)["architectures"][0]
    prompt = _prompt(model.cfg.vocab_size)
    with torch.no_grad():
        ours = model(prompt).logits
        assert _max_delta(hf(prompt).logits, ours) <= FP32_ATOL
        again = load_checkpoint(tmp_path / "ckpt")
        assert again.config == model.cfg
        assert torch.equal(again.model(prompt).logits, ours)


def test_bf16_error_no_worse_than_transformers(tmp_path):
    """As in test_hf_parity: moecoder's bf16 error against the fp32 reference is within 2x transformers' own."""
    hf = _hf_model("v3-groups", seed=3)
    hf.save_pretrained(tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ckpt.model.parameters())
    assert ckpt.model.layers[1].ffn.router.bias.dtype == torch.float32  # kept fp32, as transformers keeps it
    prompt = _prompt(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(prompt).logits
        hf_err = (hf.to(torch.bfloat16)(prompt).logits.float() - ref).abs().mean().item()
        our_err = (ckpt.model(prompt).logits.float() - ref).abs().mean().item()
    assert our_err <= 2.0 * hf_err


# --- the latent KV cache ---


def _mla_model(**kw) -> Transformer:
    cfg = get_preset("debug").replace(
        **{"kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_dim": 8, "qk_rope_dim": 4, "v_head_dim": 12,
           "rope_interleave": True, "n_experts": 8, "top_k": 3, "n_groups": 4, "topk_groups": 2,
           "group_score": "top2", "score_func": "sigmoid", "routing_bias": True, "n_shared_experts": 1,
           "dense_layers": (0,), "routed_scale": 2.5, **kw})
    model = Transformer(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(10)  # std 0.2: attention far from uniform, so a wrong key position shows
        for layer in model.layers:
            if layer.is_moe and layer.ffn.router.bias is not None:
                layer.ffn.router.bias.normal_(generator=torch.Generator().manual_seed(1))
    return model.eval()


MLA_VARIANTS = [
    {},
    {"q_lora_rank": None, "rope_interleave": False, "score_func": "softmax", "routing_bias": False,
     "group_score": "max", "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                            "mscale": 0.707, "mscale_all_dim": 0.707}},
]


@pytest.mark.parametrize("kw", MLA_VARIANTS, ids=["v3-like", "v2-lite-like"])
def test_cached_decode_equals_full_forward(kw):
    """Prefill (expanded keys) then one token at a time (attention over the cached latents, absorbed)."""
    m = _mla_model(**kw)
    tokens = torch.randint(0, m.cfg.vocab_size, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(tokens).logits
        cache = KVCache(m.cfg, 2, 32, torch.float32)
        outs = [m(tokens[:, :6], cache=cache).logits]
        outs.append(m(tokens[:, 6:9], cache=cache).logits)  # a multi-token step onto a filled cache
        for i in range(9, 14):
            outs.append(m(tokens[:, i : i + 1], cache=cache).logits)
    # fp32 summation order only (the steps' products and experts run in other kernels): logits reach ~7
    # here, where 2e-5 is ~40 fp32 ulps; a wrong cache or mask moves them by O(1).
    assert _max_delta(torch.cat(outs, 1), full) <= 2e-5


def test_rows_at_different_positions_and_compiled_step():
    """Rows of different lengths (scatter writes, masked latent attention) and the traced decode step
    (static shapes: whole-cache mask) give what each row alone gives, compiling once."""
    m = _mla_model()
    cfg = m.cfg
    prompts = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([7, 4])
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, backend="eager", fullgraph=True, dynamic=False)
    caches = [KVCache(cfg, 2, 20, torch.float32) for _ in range(2)]
    rows = [prompts[0:1, :7], prompts[1:2, :4]]
    with torch.inference_mode():
        logits = [prefill(m, prompts, lengths, c) for c in caches]
        for i in range(6):
            tok = logits[0].argmax(-1)[:, None]
            rows = [torch.cat((r, tok[b : b + 1]), 1) for b, r in enumerate(rows)]
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                logits = [decode_one_token(m, tok, caches[0]), step(m, tok, caches[1])]
            alone = torch.cat([m(r).logits[:, -1] for r in rows])
            assert _max_delta(logits[0], alone) <= 1e-5, f"step {i}"
            assert _max_delta(logits[1], alone) <= 1e-5, f"step {i}"


def test_cache_holds_one_latent_per_token_and_layer():
    cfg = get_preset("deepseek-v3")
    assert kv_bytes_per_token(cfg) == cfg.n_layers * (512 + 64) * 2  # 70,272 bytes: the latent + rotary key
    small = _mla_model().cfg
    cache = KVCache(small, batch=3, max_len=10, dtype=torch.bfloat16)
    assert [tuple(t.shape) for t in cache.k] == [(3, 1, 10, 16 + 4)] * small.n_layers and cache.v == []
    assert cache.nbytes() == kv_bytes_per_token(small) * 3 * 10


def test_softmax_scale_includes_yarn_mscale():
    cfg = get_preset("deepseek-coder-v2")
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert mla_softmax_scale(cfg) == pytest.approx(192**-0.5 * m * m)
    assert mla_softmax_scale(cfg.replace(rope_scaling=None)) == pytest.approx(192**-0.5)


# --- configs ---

# config.json of the released checkpoints (transformers-4 spelling; DeepSeek-V3 without the fp8
# quantization_config, as in bf16 re-uploads).
_DS_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
RELEASED = {
    "deepseek-v3": {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_shared_experts": 1, "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "bos_token_id": 0, "eos_token_id": 1,
        "tie_word_embeddings": False, "rope_theta": 10000, "rope_scaling": _DS_YARN, "attention_bias": False,
    },
    "deepseek-coder-v2": {  # DeepSeek-Coder-V2-Instruct
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400,
        "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 60,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 2, "n_routed_experts": 160,
        "ep_size": 1, "routed_scaling_factor": 16.0, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "group_limited_greedy",
        "n_group": 8, "topk_group": 3, "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
        "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
        "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "bos_token_id": 100000,
        "eos_token_id": 100001, "tie_word_embeddings": False, "rope_theta": 10000, "rope_scaling": _DS_YARN,
        "attention_bias": False,
    },
}


@pytest.mark.parametrize("preset", list(RELEASED))
def test_released_configs_match_presets_and_transformers_reading(preset):
    """The released config.json is the preset, and so is transformers 5's normalised re-save of it."""
    assert from_hf_config(RELEASED[preset]) == get_preset(preset)
    normalised = AutoConfig.for_model(**RELEASED[preset]).to_dict()
    assert "rope_parameters" in normalised
    assert from_hf_config(normalised) == get_preset(preset)
    assert from_hf_config(to_hf_config(get_preset(preset))) == get_preset(preset)


def test_v2_lite_greedy_config():
    lite = {**RELEASED["deepseek-coder-v2"], "hidden_size": 2048, "num_hidden_layers": 27, "num_attention_heads": 16,
            "num_key_value_heads": 16, "q_lora_rank": None, "n_routed_experts": 64, "topk_method": "greedy",
            "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "intermediate_size": 10944,
            "moe_intermediate_size": 1408}
    cfg = from_hf_config(lite)
    assert cfg.q_lora_rank is None and cfg.n_groups == 1 and cfg.routed_scale == 1.0
    assert from_hf_config(AutoConfig.for_model(**lite).to_dict()) == cfg


# --- errors ---


def _saved(tmp_path, variant="v2-group-limited"):
    return save_checkpoint(_random_moecoder_model(variant), tmp_path / "ckpt")


def _tensors(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        return {k: f.get_tensor(k) for k in names}


def _edit_config(folder, **changes):
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))


def test_missing_kv_b_proj_is_named(tmp_path):
    folder = _saved(tmp_path)
    tensors = _tensors(folder)
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.layers.1.self_attn.kv_b_proj.weight"):
        load_checkpoint(folder)


def test_v3_multi_token_prediction_layer_is_skipped_and_nothing_else(tmp_path):
    folder = _saved(tmp_path, "v3-groups")
    tensors = _tensors(folder)
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)  # the MTP module after 3 layers
    save_file(tensors, folder / "model.safetensors")
    _edit_config(folder, num_nextn_predict_layers=1)
    load_checkpoint(folder)
    tensors["model.layers.4.eh_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): model.layers.4.eh_proj.weight"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"norm_topk_prob": True}, "deepseek_v2 with norm_topk_prob=True is not supported"),
        ({"moe_layer_freq": 2}, "moe_layer_freq=2 is not supported"),
        ({"num_key_value_heads": 2}, "num_key_value_heads=2 != num_attention_heads"),
        ({"topk_method": "noaux_tc"}, "deepseek_v2 with topk_method='noaux_tc' is not supported"),
        ({"kv_lora_rank": None}, "missing required field.*kv_lora_rank"),
    ],
)
def test_unsupported_options_are_named(tmp_path, change, message):
    folder = _saved(tmp_path)
    _edit_config(folder, **change)
    with pytest.raises(CheckpointError, match=message):
        read_config(folder)


def test_cannot_save_what_deepseek_v2_cannot_express():
    cfg = from_hf_config(_hf_config("v2-group-limited").to_dict())
    with pytest.raises(CheckpointError, match="a deepseek_v2 checkpoint cannot express .*routing_bias=True"):
        to_hf_config(cfg.replace(routing_bias=True))
    with pytest.raises(CheckpointError, match="cannot express .*dense_layers=\\[1\\]"):
        to_hf_config(cfg.replace(dense_layers=(1,)))


def test_expert_count_aliases():
    released = {k: v for k, v in RELEASED["deepseek-v3"].items() if k != "n_routed_experts"}
    assert from_hf_config({**released, "num_local_experts": 256}) == get_preset("deepseek-v3")
    assert from_hf_config({**released, "num_experts": 256}) == get_preset("deepseek-v3")
    with pytest.raises(CheckpointError, match="missing required field.*n_routed_experts"):
        from_hf_config(released)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"qk_rope_dim": None}, "needs qk_nope_dim, qk_rope_dim and v_head_dim"),
        ({"qk_norm": "head"}, "multi-head latent attention does not support qk_norm"),
        ({"qk_rope_dim": 5}, "qk_rope_dim=5 must be even"),
        ({"n_groups": 3}, "n_experts=8 is not divisible by n_groups=3"),
        ({"topk_groups": 5}, "1 <= topk_groups <= n_groups"),
        ({"top_k": 5, "topk_groups": 2}, "top_k=5 exceeds the 2 x 2 experts"),
        ({"group_score": "sum"}, "group_score must be 'max' or 'top2'"),
    ],
)
def test_bad_mla_and_group_configs_are_named(kw, message):
    from moecoder.config import ConfigError

    base = _mla_model().cfg
    with pytest.raises(ConfigError, match=message):
        base.replace(**kw)
    with pytest.raises(ConfigError, match="rope_interleave is only implemented"):
        get_preset("debug").replace(rope_interleave=True)
