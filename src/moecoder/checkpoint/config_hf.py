"""Hugging Face config.json <-> ModelConfig, for the supported MoE families.

Reads both spellings transformers has used: `rope_theta` + `rope_scaling` (4.x) and
`rope_parameters` (5.x); `num_experts` and `num_local_experts`; MiniMax-M2 `rotary_dim` and
`partial_rotary_factor`; DeepSeek `n_routed_experts` and its `num_experts` / `num_local_experts` aliases. Optional fields default to the values transformers 5 uses for the
family, so a config.json means the same model here as there.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..config import ConfigError, ModelConfig
from ..model.rope import rope_frequencies
from .formats import ARCHITECTURES, SUPPORTED, CheckpointError
from .fp8 import fp8_format

# transformers 5 defaults for the optional fields, per family.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "kv": 8},
    "qwen2_moe": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "kv": 16},
    "qwen3_moe": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "kv": 4},
    "olmoe": {"rope_theta": 1e4, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "kv": None},
    "minimax_m2": {"rope_theta": 5e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 196608, "kv": 8},
    "deepseek_v2": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "kv": None},
    "deepseek_v3": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "kv": None},
}
# ... and for the DeepSeek-only fields (DeepseekV2Config / DeepseekV3Config).
_DEEPSEEK_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {"q_lora_rank": 1536, "n_shared_experts": 2, "first_k_dense_replace": 0,
                    "routed_scaling_factor": 1.0, "topk_method": "greedy", "norm_topk_prob": False},
    "deepseek_v3": {"q_lora_rank": 1536, "n_shared_experts": 1, "first_k_dense_replace": 3,
                    "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4, "norm_topk_prob": True,
                    "rope_interleave": True},
}
_DEEPSEEK = tuple(_DEEPSEEK_DEFAULTS)
_REQUIRED = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "num_experts_per_tok"]
_MLA_REQUIRED = ["moe_intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
_REQUIRED_EXTRA = {"qwen2_moe": ["moe_intermediate_size", "shared_expert_intermediate_size"],
                   "qwen3_moe": ["moe_intermediate_size"], "deepseek_v2": _MLA_REQUIRED, "deepseek_v3": _MLA_REQUIRED}


def _model_type(d: dict[str, Any]) -> str:
    mt = d.get("model_type")
    if mt not in SUPPORTED:
        raise CheckpointError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED)}")
    return mt


def _rope_kind(params: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """(rope type, remaining parameters), accepting both the `rope_type` and legacy `type` keys."""
    rest = dict(params or {})
    kind = rest.pop("rope_type", None) or rest.pop("type", None) or "default"
    rest.pop("type", None)
    return kind, rest


def _rope(d: dict[str, Any], mt: str) -> tuple[float, dict | None, float | None]:
    """(theta, moecoder rope_scaling, partial_rotary_factor) from either spelling."""
    kind, params = _rope_kind(d.get("rope_scaling") or d.get("rope_parameters"))  # transformers: rope_scaling wins
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or _DEFAULTS[mt]["rope_theta"]
    partial = params.pop("partial_rotary_factor", None) or d.get("partial_rotary_factor")
    if kind == "default":
        return float(theta), None, partial
    if kind in ("yarn", "llama3"):
        # transformers falls back to max_position_embeddings, and derives a missing yarn factor.
        orig = params.get("original_max_position_embeddings") or d.get("original_max_position_embeddings")
        params["original_max_position_embeddings"] = orig or d.get("max_position_embeddings")
        if kind == "yarn" and params.get("factor") is None and orig:
            params["factor"] = d["max_position_embeddings"] / orig
    return float(theta), {"rope_type": kind, **params}, partial


def from_hf_config(d: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face config.json dict; CheckpointError names what is missing or unsupported."""
    mt = _model_type(d)
    fp8_format(d)  # fp8 block-quantized weights are dequantized at load; any other quantization is refused
    n_experts = d.get("num_experts", d.get("num_local_experts"))
    if mt in _DEEPSEEK:
        n_experts = d.get("n_routed_experts", n_experts)
    missing = [k for k in _REQUIRED + _REQUIRED_EXTRA.get(mt, []) if d.get(k) is None]
    if n_experts is None:
        missing.append("num_local_experts" if mt in ("mixtral", "minimax_m2") else
                       "n_routed_experts" if mt in _DEEPSEEK else "num_experts")
    if missing:
        raise CheckpointError(f"config.json is missing required field(s): {', '.join(missing)}")
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
    for flag in ("attention_bias", "clip_qkv"):  # qwen3_moe / olmoe options no released model uses
        if d.get(flag):
            raise CheckpointError(f"{mt} with {flag}={d[flag]!r} is not supported")

    n_layers, n_heads = d["num_hidden_layers"], d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or _DEFAULTS[mt]["kv"] or n_heads
    theta, scaling, partial = _rope(d, mt)
    kw: dict[str, Any] = {
        "model_type": mt, "vocab_size": d["vocab_size"], "dim": d["hidden_size"], "n_layers": n_layers,
        "n_heads": n_heads, "n_kv_heads": kv, "head_dim": d.get("head_dim"), "ffn_dim": d["intermediate_size"],
        "norm_eps": float(d.get("rms_norm_eps") or _DEFAULTS[mt]["rms_norm_eps"]),
        "tie_embeddings": bool(d.get("tie_word_embeddings", False)),
        "max_seq_len": d.get("max_position_embeddings") or _DEFAULTS[mt]["max_position_embeddings"],
        "rope_theta": theta, "rope_scaling": scaling, "n_experts": n_experts, "top_k": d["num_experts_per_tok"],
        "norm_topk": bool(d.get("norm_topk_prob", False)),
    }
    if mt in ("qwen2_moe", "qwen3_moe"):
        kw["moe_ffn_dim"] = d["moe_intermediate_size"]
        step = d.get("decoder_sparse_step") or 1
        only = set(d.get("mlp_only_layers") or [])
        kw["dense_layers"] = tuple(i for i in range(n_layers) if i in only or (i + 1) % step)
    if mt == "mixtral":
        # Mixtral always renormalises the top-k weights; `norm_topk_prob` is a moecoder extension
        # (see to_hf_config) that real Mixtral configs never carry.
        kw.update(norm_topk=bool(d.get("norm_topk_prob", True)), sliding_window=d.get("sliding_window") or None)
    elif mt == "qwen2_moe":
        kw.update(qkv_bias=bool(d.get("qkv_bias", True)), n_shared_experts=1, shared_expert_gate=True,
                  shared_ffn_dim=d["shared_expert_intermediate_size"])
        if d.get("use_sliding_window"):
            types = d.get("layer_types") or [
                "sliding_attention" if (i + 1) % 2 and i < d.get("max_window_layers", 28) else "full_attention"
                for i in range(n_layers)
            ]
            kw.update(sliding_window=d.get("sliding_window") or 4096,
                      sliding_window_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"))
    elif mt == "qwen3_moe":
        kw["qk_norm"] = "head"
        if d.get("use_sliding_window"):
            kw["sliding_window"] = d.get("sliding_window") or 4096
    elif mt == "olmoe":
        kw["qk_norm"] = "full"
    elif mt == "minimax_m2":
        head_dim = kw["head_dim"] = d.get("head_dim") or 128  # the MiniMaxM2Config default
        rotary = d.get("rotary_dim") or (int(head_dim * partial) if partial else None)
        kw.update(qk_norm="full", score_func="sigmoid", routing_bias=True, norm_topk=True,
                  rotary_dim=None if rotary == head_dim else rotary)
    elif mt in _DEEPSEEK:
        kw.update(_deepseek(d, mt, partial))
    try:
        cfg = ModelConfig(**kw)
        rope_frequencies(cfg)  # rejects rope types the model does not implement
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"config.json describes an invalid {mt} model: {e}") from None
    return cfg


def _deepseek(d: dict[str, Any], mt: str, partial: float | None) -> dict[str, Any]:
    """The DeepSeek-V2/V3 fields: MLA, shared experts, leading dense layers and (group-limited) routing.

    Options transformers 5 reads differently from DeepSeek's own code are refused rather than guessed:
    moe_layer_freq (transformers ignores it), V2 norm_topk_prob (transformers ignores it; DeepSeek's code
    renormalises *instead of* scaling), key/value heads other than the query heads.
    """
    dflt = _DEEPSEEK_DEFAULTS[mt]

    def get(key: str) -> Any:
        return dflt.get(key) if d.get(key) is None else d[key]

    if d.get("mlp_bias"):
        raise CheckpointError(f"{mt} with mlp_bias={d['mlp_bias']!r} is not supported")
    if (d.get("moe_layer_freq") or 1) != 1:
        raise CheckpointError(f"{mt} with moe_layer_freq={d['moe_layer_freq']!r} is not supported "
                              "(transformers ignores it)")
    kv = d.get("num_key_value_heads")
    if kv is not None and kv != d["num_attention_heads"]:
        raise CheckpointError(f"{mt} with num_key_value_heads={kv} != num_attention_heads is not supported "
                              "(multi-head latent attention has one key/value head per query head)")
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"{mt} with partial_rotary_factor={partial!r} is not supported")
    n_layers = d["num_hidden_layers"]
    kw: dict[str, Any] = {
        "head_dim": None, "kv_lora_rank": d["kv_lora_rank"],
        "q_lora_rank": d["q_lora_rank"] if "q_lora_rank" in d else dflt["q_lora_rank"],  # null: a plain q_proj
        "qk_nope_dim": d["qk_nope_head_dim"], "qk_rope_dim": d["qk_rope_head_dim"], "v_head_dim": d["v_head_dim"],
        "moe_ffn_dim": d["moe_intermediate_size"], "n_shared_experts": get("n_shared_experts"),
        "dense_layers": tuple(range(min(get("first_k_dense_replace"), n_layers))),
        "routed_scale": float(get("routed_scaling_factor")),
    }
    if mt == "deepseek_v2":
        method = get("topk_method")
        if method not in ("greedy", "group_limited_greedy"):
            raise CheckpointError(f"deepseek_v2 with topk_method={method!r} is not supported "
                                  "(greedy, group_limited_greedy)")
        if get("norm_topk_prob"):
            raise CheckpointError("deepseek_v2 with norm_topk_prob=True is not supported (transformers ignores it, "
                                  "DeepSeek's code renormalises instead of scaling)")
        groups = (d.get("n_group"), d.get("topk_group")) if method == "group_limited_greedy" else (1, 1)
        if None in groups:
            raise CheckpointError("deepseek_v2 with topk_method='group_limited_greedy' needs n_group and topk_group")
        kw.update(score_func="softmax", norm_topk=False, group_score="max", rope_interleave=True)
    else:  # V3: sigmoid scores, selection by score + correction bias within the best groups
        groups = (get("n_group"), get("topk_group"))
        kw.update(score_func="sigmoid", routing_bias=True, norm_topk=bool(get("norm_topk_prob")),
                  group_score="top2", rope_interleave=bool(get("rope_interleave")))
    kw.update(n_groups=groups[0], topk_groups=groups[1])
    return kw


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for cfg.model_type; CheckpointError if that family cannot express cfg."""
    mt = _model_type({"model_type": cfg.model_type})
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[mt]], "model_type": mt, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len, "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": cfg.norm_topk,
    }
    kind, rope = _rope_kind(cfg.rope_scaling)
    d["rope_parameters"] = {"rope_type": kind, **rope, "rope_theta": cfg.rope_theta}
    experts_key = "num_local_experts" if mt in ("mixtral", "minimax_m2") else "num_experts"
    d["n_routed_experts" if mt in _DEEPSEEK else experts_key] = cfg.n_experts
    if mt in ("qwen2_moe", "qwen3_moe"):
        d.update(intermediate_size=cfg.ffn_dim, moe_intermediate_size=cfg.moe_ffn_dim, decoder_sparse_step=1,
                 mlp_only_layers=list(cfg.dense_layers))
    else:
        d["intermediate_size"] = cfg.moe_ffn_dim
    if mt == "mixtral":
        d["sliding_window"] = cfg.sliding_window
        if not cfg.norm_topk:
            # transformers' Mixtral ignores this key and renormalises anyway: moecoder reads the
            # folder back exactly, transformers does not. Warn rather than refuse, because the
            # debug preset is mixtral-typed without renormalisation.
            warnings.warn("saving a mixtral model with norm_topk=False; transformers will renormalise its "
                          "top-k weights", stacklevel=3)
        else:
            del d["norm_topk_prob"]
    elif mt == "qwen2_moe":
        d.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=cfg.n_shared_experts * cfg.shared_ffn_dim)
        window = cfg.sliding_window is not None
        layers = range(cfg.n_layers) if cfg.sliding_window_layers is None else cfg.sliding_window_layers
        d.update(use_sliding_window=window, sliding_window=cfg.sliding_window if window else None,
                 layer_types=["sliding_attention" if window and i in layers else "full_attention"
                              for i in range(cfg.n_layers)])
    elif mt == "qwen3_moe":
        d.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
    elif mt in _DEEPSEEK:
        _deepseek_to_hf(cfg, d)
    elif mt == "minimax_m2" and cfg.rotary_dim is not None:
        d["rotary_dim"] = cfg.rotary_dim
        d["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
    _check_round_trip(cfg, d)
    return d


def _deepseek_to_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    shared = cfg.n_shared_experts * cfg.shared_ffn_dim
    d.pop("head_dim")  # transformers derives it (as the rotary size)
    n_dense = len(cfg.dense_layers)
    d.update(intermediate_size=cfg.ffn_dim if n_dense else cfg.moe_ffn_dim, moe_intermediate_size=cfg.moe_ffn_dim,
             n_shared_experts=shared // cfg.moe_ffn_dim if shared % cfg.moe_ffn_dim == 0 else cfg.n_shared_experts,
             first_k_dense_replace=n_dense, moe_layer_freq=1, kv_lora_rank=cfg.kv_lora_rank,
             q_lora_rank=cfg.q_lora_rank, qk_nope_head_dim=cfg.qk_nope_dim, qk_rope_head_dim=cfg.qk_rope_dim,
             v_head_dim=cfg.v_head_dim, routed_scaling_factor=cfg.routed_scale, n_group=cfg.n_groups,
             topk_group=cfg.topk_groups, attention_bias=False)
    if cfg.model_type == "deepseek_v2":
        d.update(scoring_func="softmax", topk_method="group_limited_greedy" if cfg.n_groups > 1 else "greedy")
    else:
        d.update(scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=cfg.rope_interleave)


def _canonical(cfg: ModelConfig) -> dict[str, Any]:
    """cfg as a dict with equivalent spellings made equal."""
    d = cfg.to_dict()
    if cfg.n_experts and not cfg.dense_layers:
        d["ffn_dim"] = None  # only dense layers use it
    if cfg.n_shared_experts == 0:
        d["shared_ffn_dim"] = None
    elif cfg.n_shared_experts > 1:  # several shared experts are one wider FFN
        d.update(n_shared_experts=1, shared_ffn_dim=cfg.n_shared_experts * cfg.shared_ffn_dim)
    if cfg.sliding_window is None:
        d["sliding_window_layers"] = None
    elif cfg.sliding_window_layers is None:
        d["sliding_window_layers"] = list(range(cfg.n_layers))
    else:
        d["sliding_window_layers"] = sorted(set(cfg.sliding_window_layers))
    d["dense_layers"] = sorted(set(cfg.dense_layers))
    if cfg.topk_groups == cfg.n_groups:  # every group allowed: no group limit, however grouped
        d.update(n_groups=1, topk_groups=1, group_score=None)
    kind, rope = _rope_kind(cfg.rope_scaling)
    d["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **rope}
    return d


def _check_round_trip(cfg: ModelConfig, d: dict[str, Any]) -> None:
    """The family's config must mean exactly cfg; name the fields it cannot express."""
    want, got = _canonical(cfg), _canonical(from_hf_config(d))
    diff = sorted(k for k in want if want[k] != got[k])
    if diff:
        detail = ", ".join(f"{k}={want[k]!r}" for k in diff)
        raise CheckpointError(f"a {cfg.model_type} checkpoint cannot express {detail}")
