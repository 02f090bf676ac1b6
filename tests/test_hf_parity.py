"""moecoder vs transformers on tiny random checkpoints of each supported family.

Each test builds a small random model with transformers at test time (norms, biases and the
MiniMax-M2 routing-correction bias randomised too, since they start at constants), writes it
to disk and loads it with moecoder: fp32 logits agree within 1e-4 and 32-token greedy
continuations are identical. The reverse direction saves a moecoder model and loads it with
transformers.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # the dev extra pins it; a missing reference must fail, not skip, the parity tests
from parity_helpers import greedy as _greedy
from parity_helpers import randomise
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from moecoder.checkpoint import from_hf_config, load_checkpoint, save_checkpoint
from moecoder.model import Transformer

transformers.logging.set_verbosity_error()



_BASE = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 24, "num_experts_per_tok": 2, "bos_token_id": 1,
         "eos_token_id": 2, "pad_token_id": 0}

# One config per family, each switching on the family's distinctive options.
FAMILIES = {
    "mixtral": {"num_local_experts": 4, "sliding_window": 7, "rope_theta": 1e4},
    "qwen2_moe": {"num_experts": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 20,
                  "norm_topk_prob": False, "mlp_only_layers": [1], "use_sliding_window": True, "sliding_window": 6,
                  "max_window_layers": 2},
    "qwen3_moe": {"num_experts": 6, "moe_intermediate_size": 16, "head_dim": 16, "norm_topk_prob": True,
                  "decoder_sparse_step": 2, "max_position_embeddings": 64,
                  "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                      "original_max_position_embeddings": 16}},
    "olmoe": {"num_experts": 4, "norm_topk_prob": False, "tie_word_embeddings": True},
    "minimax_m2": {"num_local_experts": 6, "head_dim": 16, "rotary_dim": 8},
}

FP32_ATOL = 1e-4
# bf16: both implementations round weights and activations to bf16, in different op orders,
# and a rounding difference can flip a near-tie expert choice for a token, which moves that
# token's logits by O(1) on either side. So the bf16 check is against the fp32 reference:
# moecoder's mean |error| must be within BF16_ERROR_RATIO of transformers' own bf16 error.
# Measured on these configs, seeds 3..7 (25 cases): ratio 0.5..1.67 (worst: mixtral seed 3,
# 0.063 vs 0.038, logits of magnitude ~6); max |moecoder - transformers| in bf16 was 0.07..2.8.
BF16_ERROR_RATIO = 2.0


def _hf_model(model_type: str, seed: int = 0):
    cfg = AutoConfig.for_model(model_type, **{**_BASE, **FAMILIES[model_type]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    return randomise(model)


def _prompt(vocab: int, batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(7))


def _write_fused(hf_model, folder) -> None:
    """The transformers-5 in-memory naming on disk: experts as gate_up_proj / down_proj stacks."""
    folder.mkdir()
    hf_model.config.to_json_file(folder / "config.json")
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _write_per_expert(hf_model, folder) -> None:
    """Released-checkpoint naming written by hand from the fused tensors."""
    folder.mkdir()
    hf_model.config.to_json_file(folder / "config.json")
    mixtral_like = hf_model.config.model_type in ("mixtral", "minimax_m2")
    names = ("w1", "w3", "w2") if mixtral_like else ("gate_proj", "up_proj", "down_proj")
    state = {}
    for k, v in hf_model.state_dict().items():
        if k == "lm_head.weight" and hf_model.config.tie_word_embeddings:
            continue
        block = k.replace(".mlp.", ".block_sparse_moe.") if mixtral_like else k
        if k.endswith("experts.gate_up_proj"):
            prefix = block.removesuffix("gate_up_proj")
            for e, w in enumerate(v):
                gate, up = w.chunk(2, dim=0)
                state[f"{prefix}{e}.{names[0]}.weight"] = gate.clone()
                state[f"{prefix}{e}.{names[1]}.weight"] = up.clone()
        elif k.endswith("experts.down_proj"):
            prefix = block.removesuffix("down_proj")
            for e, w in enumerate(v):
                state[f"{prefix}{e}.{names[2]}.weight"] = w.clone()
        elif mixtral_like and ".mlp." in k:
            state[block] = v.contiguous()
        else:
            state[k] = v.contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_save_pretrained_logits_and_greedy_match(model_type, tmp_path):
    hf = _hf_model(model_type)
    hf.save_pretrained(tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.config.model_type == model_type
    assert ckpt.eos_token_ids == [2] and ckpt.bos_token_id == 1
    prompt = _prompt(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(prompt).logits
        ours = ckpt.model(prompt).logits
    assert (ours - ref).abs().max().item() <= FP32_ATOL

    ref_tokens = hf.generate(prompt, do_sample=False, max_new_tokens=32, min_new_tokens=32,
                             eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]
    assert torch.equal(_greedy(ckpt.model, prompt, 32), ref_tokens)


@pytest.mark.parametrize("writer", [_write_fused, _write_per_expert], ids=["fused", "per_expert"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_both_expert_namings_load(model_type, writer, tmp_path):
    hf = _hf_model(model_type, seed=1)
    writer(hf, tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    prompt = _prompt(hf.config.vocab_size)
    with torch.no_grad():
        assert (ckpt.model(prompt).logits - hf(prompt).logits).abs().max().item() <= FP32_ATOL


def test_sharded_save_pretrained_loads(tmp_path):
    hf = _hf_model("qwen2_moe", seed=2)
    hf.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ckpt = load_checkpoint(tmp_path / "ckpt")
    prompt = _prompt(hf.config.vocab_size)
    with torch.no_grad():
        assert (ckpt.model(prompt).logits - hf(prompt).logits).abs().max().item() <= FP32_ATOL


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_bf16_error_no_worse_than_transformers(model_type, tmp_path):
    hf = _hf_model(model_type, seed=3)
    hf.save_pretrained(tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ckpt.model.parameters())
    prompt = _prompt(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(prompt).logits
        hf_err = (hf.to(torch.bfloat16)(prompt).logits.float() - ref).abs().mean().item()
        our_err = (ckpt.model(prompt).logits.float() - ref).abs().mean().item()
    assert our_err <= BF16_ERROR_RATIO * hf_err


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_moecoder_save_loads_in_transformers(model_type, tmp_path):
    cfg = from_hf_config(AutoConfig.for_model(model_type, **{**_BASE, **FAMILIES[model_type]}).to_dict())
    model = Transformer(cfg)
    model.init_weights(seed=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("router.bias"):
                b.normal_(0, 0.2)
    model.eval()
    save_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=30_000, extra_config={"eos_token_id": 2})
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    assert hf.config.eos_token_id == 2
    prompt = _prompt(cfg.vocab_size)
    with torch.no_grad():
        ours = model(prompt).logits
        assert (hf(prompt).logits - ours).abs().max().item() <= FP32_ATOL
        again = load_checkpoint(tmp_path / "ckpt").model(prompt).logits
    assert torch.equal(again, ours)


def test_save_pretrained_writes_the_per_expert_naming(tmp_path):
    """Guards the premise of the tests above: transformers writes released-style names."""
    _hf_model("mixtral").save_pretrained(tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in names


# config.json of released checkpoints, in the transformers-4 spelling they were published with
# (MiniMax-M2 minus its fp8 quantization_config, as in bf16 re-uploads).
RELEASED = {
    "mixtral-8x7b": {
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1e6,
        "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960, "max_window_layers": 48,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1e6, "sliding_window": None,
        "use_sliding_window": False, "attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "olmoe-1b-7b": {
        "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "norm_topk_prob": False, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "clip_qkv": None, "attention_bias": False,
        "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "minimax-m2": {
        "model_type": "minimax_m2", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 1536,
        "num_hidden_layers": 62, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
        "rotary_dim": 64, "num_local_experts": 256, "num_experts_per_tok": 8, "max_position_embeddings": 196608,
        "rms_norm_eps": 1e-06, "rope_theta": 5000000, "scoring_func": "sigmoid", "use_routing_bias": True,
        "use_qk_norm": True, "qk_norm_type": "per_layer", "shared_intermediate_size": 0,
        "tie_word_embeddings": False, "hidden_act": "silu",
    },
}


@pytest.mark.parametrize("preset", list(RELEASED))
def test_released_configs_match_presets(preset):
    from moecoder.config import get_preset

    assert from_hf_config(RELEASED[preset]) == get_preset(preset)


QWEN15_MOE = {  # Qwen1.5-MoE-A2.7B
    "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
    "norm_topk_prob": False, "decoder_sparse_step": 1, "max_position_embeddings": 8192, "max_window_layers": 21,
    "rms_norm_eps": 1e-06, "rope_theta": 1e6, "sliding_window": 32768, "use_sliding_window": False,
}

LEGACY_SPELLINGS = {
    "qwen15-moe": QWEN15_MOE,
    "qwen2-moe-sparse-step-window": {**QWEN15_MOE, "num_hidden_layers": 6, "decoder_sparse_step": 2,
                                     "mlp_only_layers": [3], "use_sliding_window": True, "sliding_window": 64,
                                     "max_window_layers": 4},
    "qwen3-yarn-type": {**RELEASED["qwen3-30b-a3b"],
                        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    "mixtral-no-head-dim-window": {**RELEASED["mixtral-8x7b"], "sliding_window": 4096,
                                   "num_experts": 8, "num_local_experts": None},
    "minimax-partial-factor": {**{k: v for k, v in RELEASED["minimax-m2"].items() if k != "rotary_dim"},
                               "partial_rotary_factor": 0.5},
}


@pytest.mark.parametrize("name", list(LEGACY_SPELLINGS))
def test_legacy_spellings_mean_what_transformers_reads(name):
    """A transformers-4 config.json and transformers 5's normalised re-save of it map to one ModelConfig."""
    legacy = {k: v for k, v in LEGACY_SPELLINGS[name].items() if v is not None}
    normalised = AutoConfig.for_model(**legacy).to_dict()
    assert "rope_parameters" in normalised
    assert from_hf_config(legacy) == from_hf_config(normalised)


def test_qwen15_moe_fields():
    cfg = from_hf_config(QWEN15_MOE)
    assert (cfg.n_shared_experts, cfg.shared_ffn_dim, cfg.shared_expert_gate, cfg.qkv_bias) == (1, 5632, True, True)
    assert cfg.sliding_window is None and cfg.dense_layers == ()
    stepped = from_hf_config(LEGACY_SPELLINGS["qwen2-moe-sparse-step-window"])
    assert stepped.dense_layers == (0, 2, 3, 4)  # odd (i + 1) % 2, plus mlp_only_layers
    assert stepped.sliding_window == 64 and stepped.sliding_window_layers == (0, 2)


def test_legacy_rope_type_key_saves_as_rope_type():
    from moecoder.checkpoint import to_hf_config
    from moecoder.config import get_preset

    yarn = {"factor": 4.0, "original_max_position_embeddings": 32768}
    cfg = get_preset("qwen3-30b-a3b").replace(rope_scaling={"type": "yarn", **yarn})
    d = to_hf_config(cfg)
    assert AutoConfig.for_model(**d).rope_parameters == {"rope_type": "yarn", "rope_theta": 1e6, **yarn}
    assert from_hf_config(d).rope_scaling == {"rope_type": "yarn", **yarn}
