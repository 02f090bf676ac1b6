"""Model architecture configuration and named presets.

The config holds architecture only: never device, dtype or process groups.
Sizes in the presets are taken from the published Hugging Face configs of each family.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A model configuration is invalid or incomplete."""


@dataclass
class ModelConfig:
    # --- trunk ---
    vocab_size: int = 32000
    dim: int = 512  # hidden size
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2  # grouped-query attention; == n_heads for MHA
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 1024  # intermediate size of dense FFN layers
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    # --- attention ---
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope_parameters minus theta: {"rope_type": "yarn", "factor": 4, ...}
    rotary_dim: int | None = None  # partial rotary: rotate only the first rotary_dim dims of each head
    qkv_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (RMSNorm per head, Qwen3) | "full" (over all heads, OLMoE/MiniMax-M2)
    sliding_window: int | None = None  # attend to the last `sliding_window` keys only
    sliding_window_layers: tuple[int, ...] | None = None  # None: all layers use the window (if set)
    # --- multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank None: plain attention above ---
    # With MLA, head_dim is derived (qk_nope_dim + qk_rope_dim, the query/key head size), n_kv_heads is
    # n_heads, and RoPE covers only the qk_rope_dim part of each query/key head (see model/mla.py).
    kv_lora_rank: int | None = None  # width of the compressed key/value latent
    q_lora_rank: int | None = None  # low-rank query (q_a_proj -> norm -> q_b_proj); None: one q_proj
    qk_nope_dim: int | None = None  # per-head query/key dims without position
    qk_rope_dim: int | None = None  # per-head query/key dims under RoPE (one rotary key shared by all heads)
    v_head_dim: int | None = None  # per-head value dims
    rope_interleave: bool = False  # MLA RoPE rotates pairs (x0, x1), (x2, x3), ... instead of halves (DeepSeek)
    # --- mixture of experts ---
    n_experts: int = 8  # routed experts; 0 means a dense model
    top_k: int = 2
    moe_ffn_dim: int | None = None  # per-expert intermediate size; None: ffn_dim
    n_shared_experts: int = 0  # shared experts, fused into one FFN of n_shared * shared_ffn_dim
    shared_ffn_dim: int | None = None  # per shared expert; None: moe_ffn_dim
    shared_expert_gate: bool = False  # sigmoid scalar gate on the shared expert output (Qwen2-MoE)
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk: bool = False  # renormalise the selected top-k weights to sum to 1
    routing_bias: bool = False  # selection uses scores + a correction bias; weights stay unbiased
    routed_scale: float = 1.0  # multiply routed output weights (DeepSeek-V3 style)
    n_groups: int = 1  # experts form n_groups equal groups; a token picks its top_k within topk_groups groups
    topk_groups: int = 1  # groups a token may route to (DeepSeek device-limited routing)
    group_score: str = "max"  # group rank: "max" selection score (DeepSeek-V2) | "top2" sum of its two best (V3)
    dense_layers: tuple[int, ...] = ()  # layers with a dense FFN instead of MoE
    # --- which Hugging Face family this model saves as ---
    model_type: str = "mixtral"

    def __post_init__(self) -> None:
        if self.kv_lora_rank is not None:  # MLA: derived, so that replace() keeps them consistent
            if self.qk_nope_dim is None or self.qk_rope_dim is None or self.v_head_dim is None:
                raise ConfigError("multi-head latent attention (kv_lora_rank set) needs qk_nope_dim, qk_rope_dim "
                                  "and v_head_dim")
            self.head_dim = self.qk_nope_dim + self.qk_rope_dim
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.moe_ffn_dim is None:
            self.moe_ffn_dim = self.ffn_dim
        if self.shared_ffn_dim is None:
            self.shared_ffn_dim = self.moe_ffn_dim
        self.dense_layers = tuple(int(i) for i in self.dense_layers)
        if self.sliding_window_layers is not None:
            self.sliding_window_layers = tuple(int(i) for i in self.sliding_window_layers)
        self.validate()

    def validate(self) -> None:
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.n_experts < 0:
            raise ConfigError(f"n_experts must be >= 0, got {self.n_experts}")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ConfigError(f"score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.qk_norm not in ("none", "head", "full"):
            raise ConfigError(f"qk_norm must be 'none', 'head' or 'full', got {self.qk_norm!r}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ConfigError(f"rotary_dim={self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
        for i in self.dense_layers:
            if not 0 <= i < self.n_layers:
                raise ConfigError(f"dense_layers entry {i} is outside 0..{self.n_layers - 1}")
        self._validate_groups()
        self._validate_mla()

    def _validate_groups(self) -> None:
        if self.group_score not in ("max", "top2"):
            raise ConfigError(f"group_score must be 'max' or 'top2', got {self.group_score!r}")
        if self.n_groups < 1 or not 1 <= self.topk_groups <= self.n_groups:
            raise ConfigError(f"need n_groups >= 1 and 1 <= topk_groups <= n_groups, got n_groups={self.n_groups}, "
                              f"topk_groups={self.topk_groups}")
        if self.n_groups == 1 or not self.n_experts:
            return
        if self.n_experts % self.n_groups:
            raise ConfigError(f"n_experts={self.n_experts} is not divisible by n_groups={self.n_groups}")
        per_group = self.n_experts // self.n_groups
        if self.top_k > self.topk_groups * per_group:
            raise ConfigError(f"top_k={self.top_k} exceeds the {self.topk_groups} x {per_group} experts of the "
                              "groups a token may use")
        if self.group_score == "top2" and per_group < 2:
            raise ConfigError("group_score='top2' needs at least 2 experts per group")

    def _validate_mla(self) -> None:
        if self.kv_lora_rank is None:
            if self.rope_interleave:
                raise ConfigError("rope_interleave is only implemented for multi-head latent attention")
            return
        dims = {"kv_lora_rank": self.kv_lora_rank, "q_lora_rank": self.q_lora_rank, "qk_nope_dim": self.qk_nope_dim,
                "qk_rope_dim": self.qk_rope_dim, "v_head_dim": self.v_head_dim}
        for name, v in dims.items():
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.qk_rope_dim % 2:
            raise ConfigError(f"qk_rope_dim={self.qk_rope_dim} must be even")
        unsupported = {"qk_norm": self.qk_norm != "none", "qkv_bias": self.qkv_bias,
                       "rotary_dim": self.rotary_dim is not None, "sliding_window": self.sliding_window is not None}
        bad = [k for k, on in unsupported.items() if on]
        if bad:
            raise ConfigError(f"multi-head latent attention does not support {', '.join(bad)}")

    # --- derived ---
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def rot_dim(self) -> int:
        if self.kv_lora_rank is not None:
            return self.qk_rope_dim
        return self.rotary_dim or self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and i not in self.dense_layers

    def uses_window(self, i: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.sliding_window_layers is None or i in self.sliding_window_layers

    def replace(self, **kw: Any) -> ModelConfig:
        """A copy with `kw` changed. Sizes this config derived rather than was given (head_dim from
        dim / n_heads, moe_ffn_dim from ffn_dim, shared_ffn_dim from moe_ffn_dim) are derived again
        from the new values unless `kw` sets them: `get_preset("debug").replace(dim=256)` gets
        head_dim 64, not the debug preset's 16."""
        d = dataclasses.asdict(self)
        derived = {  # field: (the value it would derive to here, the fields it derives from)
            "head_dim": (self.dim // self.n_heads, ("dim", "n_heads")),
            "moe_ffn_dim": (self.ffn_dim, ("ffn_dim",)),
            "shared_ffn_dim": (self.moe_ffn_dim, ("ffn_dim", "moe_ffn_dim")),
        }
        for name, (value, sources) in derived.items():
            if name not in kw and d[name] == value and any(k in kw for k in sources):
                d[name] = None
        d.update(kw)
        return ModelConfig(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("dense_layers", "sliding_window_layers"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _preset(**kw: Any) -> ModelConfig:
    return ModelConfig(**kw)


PRESETS: dict[str, ModelConfig] = {
    # Tiny model for tests and CI.
    "debug": _preset(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, n_experts=4,
                     top_k=2, moe_ffn_dim=64, norm_topk=True, max_seq_len=256),
    # The reference config of the benchmarks: 85.7M total / 48.0M active.
    "bench-mixtral": _preset(vocab_size=32000, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=1024,
                             n_experts=8, top_k=2, norm_topk=True, max_seq_len=4096, rope_theta=1e6),
    "mixtral-8x7b": _preset(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                            n_experts=8, top_k=2, norm_topk=True, rope_theta=1e6, max_seq_len=32768,
                            model_type="mixtral"),
    "qwen3-30b-a3b": _preset(vocab_size=151936, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128,
                             ffn_dim=6144, moe_ffn_dim=768, n_experts=128, top_k=8, norm_topk=True,
                             qk_norm="head", norm_eps=1e-6, rope_theta=1e6, max_seq_len=40960,
                             model_type="qwen3_moe"),
    "olmoe-1b-7b": _preset(vocab_size=50304, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_dim=1024,
                           n_experts=64, top_k=8, qk_norm="full", max_seq_len=4096, model_type="olmoe"),
    # MiniMax-M2: 230B total / 10B active; sigmoid routing with a selection-only correction bias.
    "minimax-m2": _preset(vocab_size=200064, dim=3072, n_layers=62, n_heads=48, n_kv_heads=8, head_dim=128,
                          ffn_dim=1536, n_experts=256, top_k=8, score_func="sigmoid", routing_bias=True,
                          norm_topk=True, qk_norm="full", rotary_dim=64, rope_theta=5e6, norm_eps=1e-6,
                          max_seq_len=196608, model_type="minimax_m2"),
    # The class the review reports for MiniMax M2.7 (270B total / ~40B active), MiniMax-M2-shaped
    # (sigmoid + bias routing, full-width qk-norm, partial rotary) with a wider trunk, 72 layers and
    # top-24 of 192 fine-grained experts: 268.1B total / 39.8B active (within 1%).
    "review-270b-a40b": _preset(vocab_size=200064, dim=4096, n_layers=72, n_heads=64, n_kv_heads=8, head_dim=128,
                                ffn_dim=1536, n_experts=192, top_k=24, score_func="sigmoid", routing_bias=True,
                                norm_topk=True, qk_norm="full", rotary_dim=64, rope_theta=5e6, norm_eps=1e-6,
                                max_seq_len=196608, model_type="minimax_m2"),
    # DeepSeek-V3 / R1 (671B total / 37B active): multi-head latent attention, 3 dense layers, then 1 shared +
    # top-8 of 256 experts chosen by sigmoid + correction bias within the 4 best of 8 groups.
    "deepseek-v3": _preset(vocab_size=129280, dim=7168, n_layers=61, n_heads=128, n_kv_heads=128, ffn_dim=18432,
                           moe_ffn_dim=2048, n_experts=256, top_k=8, n_shared_experts=1, score_func="sigmoid",
                           routing_bias=True, norm_topk=True, routed_scale=2.5, n_groups=8, topk_groups=4,
                           group_score="top2", dense_layers=(0, 1, 2), kv_lora_rank=512, q_lora_rank=1536,
                           qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128, rope_interleave=True, norm_eps=1e-6,
                           rope_theta=1e4, max_seq_len=163840, model_type="deepseek_v3",
                           rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # DeepSeek-Coder-V2 (236B total / 21B active), the DeepSeek-V2 architecture: MLA, 1 dense layer, then
    # 2 shared + top-6 of 160 softmax-routed experts within the 3 best of 8 groups, weights x 16.
    "deepseek-coder-v2": _preset(vocab_size=102400, dim=5120, n_layers=60, n_heads=128, n_kv_heads=128,
                                 ffn_dim=12288, moe_ffn_dim=1536, n_experts=160, top_k=6, n_shared_experts=2,
                                 routed_scale=16.0, n_groups=8, topk_groups=3, dense_layers=(0,), kv_lora_rank=512,
                                 q_lora_rank=1536, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128,
                                 rope_interleave=True, norm_eps=1e-6, rope_theta=1e4, max_seq_len=163840,
                                 model_type="deepseek_v2",
                                 rope_scaling={"rope_type": "yarn", "factor": 40.0,
                                               "original_max_position_embeddings": 4096, "beta_fast": 32,
                                               "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
