"""Tensor-name tables between moecoder and Hugging Face checkpoints, one per model type.

Each table maps a moecoder state-dict name to the name of the tensor in the checkpoint as the
released models spell it, with `{layer}` and `{expert}` placeholders. The same table drives
loading and saving, so the two directions cannot drift apart.

Released checkpoints store experts one at a time. A moecoder entry `...experts.w13[{expert}]` is
slice e of the stacked [E, 2F, C] parameter; its value is a pair (gate, up) whose rows are
concatenated, gate first. `...experts.w2[{expert}]` is slice e of [E, C, F].

transformers >= 5 keeps experts fused in memory (`mlp.experts.gate_up_proj` [E, 2F, C],
`mlp.experts.down_proj` [E, C, F]) and calls every MoE block `mlp`; checkpoints written from its
state dict use that naming. `fused_table` derives it from the released table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

Source = str | tuple[str, str]  # one tensor, or (gate, up) concatenated along rows

L = "model.layers.{layer}"

_TRUNK: dict[str, Source] = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{layer}.input_norm.weight": f"{L}.input_layernorm.weight",
    "layers.{layer}.post_attn_norm.weight": f"{L}.post_attention_layernorm.weight",
    "layers.{layer}.attn.q_proj.weight": f"{L}.self_attn.q_proj.weight",
    "layers.{layer}.attn.k_proj.weight": f"{L}.self_attn.k_proj.weight",
    "layers.{layer}.attn.v_proj.weight": f"{L}.self_attn.v_proj.weight",
    "layers.{layer}.attn.o_proj.weight": f"{L}.self_attn.o_proj.weight",
    "layers.{layer}.attn.q_proj.bias": f"{L}.self_attn.q_proj.bias",
    "layers.{layer}.attn.k_proj.bias": f"{L}.self_attn.k_proj.bias",
    "layers.{layer}.attn.v_proj.bias": f"{L}.self_attn.v_proj.bias",
    "layers.{layer}.attn.q_norm.weight": f"{L}.self_attn.q_norm.weight",
    "layers.{layer}.attn.k_norm.weight": f"{L}.self_attn.k_norm.weight",
    # dense FFN layers (Qwen `mlp_only_layers`)
    "layers.{layer}.ffn.gate_proj.weight": f"{L}.mlp.gate_proj.weight",
    "layers.{layer}.ffn.up_proj.weight": f"{L}.mlp.up_proj.weight",
    "layers.{layer}.ffn.down_proj.weight": f"{L}.mlp.down_proj.weight",
}

_MIXTRAL_MOE: dict[str, Source] = {
    "layers.{layer}.ffn.router.gate.weight": f"{L}.block_sparse_moe.gate.weight",
    "layers.{layer}.ffn.experts.w13[{expert}]": (
        f"{L}.block_sparse_moe.experts.{{expert}}.w1.weight",  # w1 = gate
        f"{L}.block_sparse_moe.experts.{{expert}}.w3.weight",  # w3 = up
    ),
    "layers.{layer}.ffn.experts.w2[{expert}]": f"{L}.block_sparse_moe.experts.{{expert}}.w2.weight",
}

_QWEN_MOE: dict[str, Source] = {
    "layers.{layer}.ffn.router.gate.weight": f"{L}.mlp.gate.weight",
    "layers.{layer}.ffn.experts.w13[{expert}]": (
        f"{L}.mlp.experts.{{expert}}.gate_proj.weight",
        f"{L}.mlp.experts.{{expert}}.up_proj.weight",
    ),
    "layers.{layer}.ffn.experts.w2[{expert}]": f"{L}.mlp.experts.{{expert}}.down_proj.weight",
    "layers.{layer}.ffn.shared.gate_proj.weight": f"{L}.mlp.shared_expert.gate_proj.weight",
    "layers.{layer}.ffn.shared.up_proj.weight": f"{L}.mlp.shared_expert.up_proj.weight",
    "layers.{layer}.ffn.shared.down_proj.weight": f"{L}.mlp.shared_expert.down_proj.weight",
    "layers.{layer}.ffn.shared_gate.weight": f"{L}.mlp.shared_expert_gate.weight",
}

# DeepSeek-V2/V3: multi-head latent attention, a gate-less shared expert block, dense layers in `mlp`.
_DEEPSEEK: dict[str, Source] = {
    "layers.{layer}.attn.q_a_proj.weight": f"{L}.self_attn.q_a_proj.weight",
    "layers.{layer}.attn.q_a_norm.weight": f"{L}.self_attn.q_a_layernorm.weight",
    "layers.{layer}.attn.q_b_proj.weight": f"{L}.self_attn.q_b_proj.weight",
    "layers.{layer}.attn.kv_a_proj.weight": f"{L}.self_attn.kv_a_proj_with_mqa.weight",
    "layers.{layer}.attn.kv_a_norm.weight": f"{L}.self_attn.kv_a_layernorm.weight",
    "layers.{layer}.attn.kv_b_proj.weight": f"{L}.self_attn.kv_b_proj.weight",
    "layers.{layer}.ffn.router.gate.weight": f"{L}.mlp.gate.weight",
    "layers.{layer}.ffn.experts.w13[{expert}]": (
        f"{L}.mlp.experts.{{expert}}.gate_proj.weight",
        f"{L}.mlp.experts.{{expert}}.up_proj.weight",
    ),
    "layers.{layer}.ffn.experts.w2[{expert}]": f"{L}.mlp.experts.{{expert}}.down_proj.weight",
    "layers.{layer}.ffn.shared.gate_proj.weight": f"{L}.mlp.shared_experts.gate_proj.weight",
    "layers.{layer}.ffn.shared.up_proj.weight": f"{L}.mlp.shared_experts.up_proj.weight",
    "layers.{layer}.ffn.shared.down_proj.weight": f"{L}.mlp.shared_experts.down_proj.weight",
}

TABLES: dict[str, dict[str, Source]] = {
    "mixtral": {**_TRUNK, **_MIXTRAL_MOE},
    "minimax_m2": {
        **_TRUNK,
        **_MIXTRAL_MOE,
        "layers.{layer}.ffn.router.bias": f"{L}.block_sparse_moe.e_score_correction_bias",
    },
    "qwen2_moe": {**_TRUNK, **_QWEN_MOE},
    "qwen3_moe": {**_TRUNK, **_QWEN_MOE},
    "olmoe": {**_TRUNK, **_QWEN_MOE},
    "deepseek_v2": {**_TRUNK, **_DEEPSEEK},
    "deepseek_v3": {**_TRUNK, **_DEEPSEEK, "layers.{layer}.ffn.router.bias": f"{L}.mlp.gate.e_score_correction_bias"},
}

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "minimax_m2": "MiniMaxM2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}

SUPPORTED = tuple(TABLES)

# Tensors some older checkpoints carry that hold nothing to load.
IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint folder cannot be read or written; the message names the problem."""


def fused_table(table: dict[str, Source]) -> dict[str, Source]:
    """The transformers-5 naming of a released table: MoE block `mlp`, experts stacked."""
    out: dict[str, Source] = {}
    for ours, theirs in table.items():
        if ours.endswith("experts.w13[{expert}]"):
            out[ours.removesuffix("[{expert}]")] = f"{L}.mlp.experts.gate_up_proj"
        elif ours.endswith("experts.w2[{expert}]"):
            out[ours.removesuffix("[{expert}]")] = f"{L}.mlp.experts.down_proj"
        else:
            assert isinstance(theirs, str)
            out[ours] = theirs.replace(".block_sparse_moe.", ".mlp.")
    return out


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor and where it lands in a moecoder tensor: `dest[index] = tensor`."""

    name: str  # checkpoint tensor name
    index: tuple  # () for the whole moecoder tensor, else (expert,) or (expert, row slice)
    shape: tuple[int, ...]  # expected shape of the checkpoint tensor


_LAYER = re.compile(r"^layers\.(\d+)\.")


def plan(table: dict[str, Source], shapes: dict[str, tuple[int, ...]]) -> dict[str, list[Piece]]:
    """For every moecoder tensor (name -> shape), the checkpoint pieces that make it up.

    Raises KeyError naming a moecoder tensor the table does not cover (a programming error).
    """
    out: dict[str, list[Piece]] = {}
    for name, shape in shapes.items():
        m = _LAYER.match(name)
        layer = m.group(1) if m else None
        pattern = name if layer is None else "layers.{layer}." + name[m.end() :]
        if pattern in table:
            src = table[pattern]
            assert isinstance(src, str)
            out[name] = [Piece(src.format(layer=layer), (), tuple(shape))]
            continue
        per_expert = table.get(pattern + "[{expert}]")
        if per_expert is None:
            raise KeyError(f"no checkpoint name for moecoder tensor {name}")
        pieces = []
        for e in range(shape[0]):
            if isinstance(per_expert, tuple):  # [E, 2F, C]: gate rows then up rows
                f = shape[1] // 2
                for part, rows in zip(per_expert, (slice(0, f), slice(f, 2 * f))):
                    pieces.append(Piece(part.format(layer=layer, expert=e), (e, rows), (f, *shape[2:])))
            else:
                pieces.append(Piece(per_expert.format(layer=layer, expert=e), (e,), tuple(shape[1:])))
        out[name] = pieces
    return out
