"""FP8 block-quantized checkpoints (DeepSeek-V3/R1 and MiniMax-M2 as released) load dequantized.

Each test builds a tiny random transformers model, quantizes its Linear weights to float8_e4m3fn the
way the released checkpoints store them (a float32 `<weight>_scale_inv` of shape
[ceil(rows / bm), ceil(cols / bn)] beside each fp8 weight; embeddings, norms, router, lm_head and
biases left as they are) and writes the folder with a quantization_config. The reference is the same
folder with every quantized weight replaced by (fp8 value) x (the scale of its block), computed here
by index arithmetic, independently of moecoder's chunked code. moecoder's fp32 weights equal it
exactly, and its logits and 32-token greedy continuations equal transformers' on those dequantized
weights. Dims that the blocks do not divide (hidden 192 in [128, 128] blocks, non-square [16, 32]
blocks) test the partial last block row / column.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # the dev extra pins it; a missing reference must fail, not skip
from parity_helpers import greedy, randomise
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from moecoder.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from moecoder.checkpoint import fp8 as fp8_module

transformers.logging.set_verbosity_error()

FP32_ATOL = 1e-4
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448

_COMMON = {"vocab_size": 96, "num_experts_per_tok": 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_DEEPSEEK = {"num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8, "n_shared_experts": 2,
             "first_k_dense_replace": 1, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 12}

# name -> (model_type, config, weight_block_size, expert naming). The first five are also checked
# against transformers (logits, greedy); all are checked weight by weight.
CASES = {
    # the released block size over dims it does not divide: 192 = 128 + 64, 160 = 128 + 32, k_proj 96 < 128
    "mixtral-128": ("mixtral", {"hidden_size": 192, "intermediate_size": 160, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                                "rope_theta": 1e4}, [128, 128], "per_expert"),
    # several blocks per matrix, partial ones (80 = 2 x 32 + 16, 48 = 32 + 16), MiniMax's skip-list
    "minimax_m2-32": ("minimax_m2", {"hidden_size": 80, "intermediate_size": 48, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                     "rotary_dim": 8, "num_local_experts": 6}, [32, 32], "per_expert"),
    # non-square blocks: a swapped (rows, cols) convention would not pass; kv_a_proj has 24 + 4 rows
    "deepseek_v3-16x32": ("deepseek_v3", {**_DEEPSEEK, "hidden_size": 72, "intermediate_size": 56,
                                          "moe_intermediate_size": 24, "num_hidden_layers": 3, "kv_lora_rank": 24,
                                          "q_lora_rank": 40, "n_group": 4, "topk_group": 2,
                                          "routed_scaling_factor": 2.5}, [16, 32], "per_expert"),
    # transformers-5 naming: one scale grid per expert over the fused [2F, C] gate_up rows; two shards
    "deepseek_v3-fused": ("deepseek_v3", {**_DEEPSEEK, "hidden_size": 40, "intermediate_size": 40,
                                          "moe_intermediate_size": 12, "num_hidden_layers": 2, "kv_lora_rank": 16,
                                          "q_lora_rank": 24, "n_group": 1, "topk_group": 1}, [16, 16], "fused"),
    # "weight_block_size": null: one scale per matrix, stored 0-d as transformers' FP8Linear holds it
    "mixtral-per-tensor": ("mixtral", {"hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                                       "rope_theta": 1e4}, None, "per_expert"),
    # the other families: the quantization is the same, the names are theirs
    "qwen2_moe": ("qwen2_moe", {"hidden_size": 40, "intermediate_size": 36, "moe_intermediate_size": 20,
                                "shared_expert_intermediate_size": 24, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4,
                                "mlp_only_layers": [1]}, [16, 16], "per_expert"),
    "qwen3_moe": ("qwen3_moe", {"hidden_size": 40, "intermediate_size": 36, "moe_intermediate_size": 20,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "head_dim": 16, "num_experts": 6, "norm_topk_prob": True}, [16, 16], "per_expert"),
    "olmoe": ("olmoe", {"hidden_size": 40, "intermediate_size": 20, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 4, "num_experts": 4}, [16, 16], "per_expert"),
    "deepseek_v2": ("deepseek_v2", {**_DEEPSEEK, "hidden_size": 40, "intermediate_size": 40,
                                    "moe_intermediate_size": 12, "num_hidden_layers": 2, "kv_lora_rank": 16,
                                    "q_lora_rank": None, "topk_method": "greedy"}, [16, 16], "per_expert"),
}
PARITY = ["mixtral-128", "minimax_m2-32", "deepseek_v3-16x32", "deepseek_v3-fused", "mixtral-per-tensor"]
NOT_CONVERTED = ("embed_tokens.weight", "lm_head.weight", ".gate.weight")  # and everything 1-D


def _hf_model(case: str, seed: int = 0):
    model_type, extra, _, _ = CASES[case]
    cfg = AutoConfig.for_model(model_type, **{**_COMMON, **extra})
    torch.manual_seed(seed)
    return randomise(AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quantize(w: torch.Tensor, block: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale_inv) with weight ~= fp8 * scale_inv per block of the last two dims."""
    *lead, rows, cols = w.shape
    bm, bn = block or (rows, cols)
    nr, nc = _cdiv(rows, bm), _cdiv(cols, bn)
    padded = torch.nn.functional.pad(w.float(), (0, nc * bn - cols, 0, nr * bm - rows))
    blocks = padded.reshape(*lead, nr, bm, nc, bn)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    q = q.reshape(padded.shape)[..., :rows, :cols].contiguous()
    return q, (scale.reshape(lead) if block is None else scale).float()


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor, block: list[int] | None) -> torch.Tensor:
    """The released convention, written as index arithmetic: w[i, j] = q[i, j] * scale[i // bm, j // bn]."""
    *lead, rows, cols = q.shape
    bm, bn = block or (rows, cols)
    grid = scale.reshape(*lead, _cdiv(rows, bm), _cdiv(cols, bn))
    return q.float() * grid[..., torch.arange(rows) // bm, :][..., torch.arange(cols) // bn]


def released_state(hf_model, fused: bool) -> dict[str, torch.Tensor]:
    """The model's tensors under the released per-expert names, or transformers 5's fused ones."""
    mixtral_like = hf_model.config.model_type in ("mixtral", "minimax_m2")
    gate, up, down = ("w1", "w3", "w2") if mixtral_like else ("gate_proj", "up_proj", "down_proj")
    out = {}
    for k, v in hf_model.state_dict().items():
        if k == "lm_head.weight" and hf_model.config.tie_word_embeddings:
            continue
        if fused:
            out[k] = v.clone()
            continue
        k = k.replace(".mlp.", ".block_sparse_moe.") if mixtral_like else k
        if k.endswith("experts.gate_up_proj"):
            prefix = k.removesuffix("gate_up_proj")
            for e, w in enumerate(v):
                g, u = w.chunk(2)
                out[f"{prefix}{e}.{gate}.weight"], out[f"{prefix}{e}.{up}.weight"] = g.clone(), u.clone()
        elif k.endswith("experts.down_proj"):
            prefix = k.removesuffix("down_proj")
            for e, w in enumerate(v):
                out[f"{prefix}{e}.{down}.weight"] = w.clone()
        else:
            out[k] = v.clone()
    return out


def _write(folder, hf_model, tensors: dict[str, torch.Tensor], quantization_config=None, shards: int = 1):
    folder.mkdir()
    config = json.loads(hf_model.config.to_json_string())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    # Round-robin over sorted names: every weight lands in another shard than its scale.
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {n: files[i % shards] for i, n in enumerate(names)}
    for f in files:
        save_file({n: tensors[n] for n in names if weight_map[n] == f}, folder / f, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_fp8(case: str, tmp_path, seed: int = 0):
    """(hf model, fp8 folder, folder of the same weights dequantized by the reference formula)."""
    _, _, block, naming = CASES[case]
    hf = _hf_model(case, seed)
    stored, dequantized = {}, {}
    for k, v in released_state(hf, fused=naming == "fused").items():
        if v.dim() >= 2 and not k.endswith(NOT_CONVERTED):
            q, s = quantize(v, block)
            stored[k], stored[k + "_scale_inv"] = q, s
            dequantized[k] = dequantize_reference(q, s, block)
        else:
            stored[k] = dequantized[k] = v
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": block}
    if hf.config.model_type == "minimax_m2":
        qc["modules_to_not_convert"] = ["gate", "e_score_correction_bias", "lm_head"]
    _write(tmp_path / "fp8", hf, stored, qc, shards=2 if naming == "fused" else 1)
    _write(tmp_path / "dequantized", hf, dequantized)
    return hf, tmp_path / "fp8", tmp_path / "dequantized"


def _prompt(vocab: int, batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(7))


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# --- the weights ---


def test_quantizer_round_trip_is_close_and_has_partial_blocks():
    """Guards the test's own quantizer: scales of ceil(dims / block), fp8 error within fp8's precision."""
    w = torch.randn(40, 70)
    q, s = quantize(w, [16, 32])
    assert q.dtype == FP8 and q.shape == w.shape and s.shape == (3, 3) and s.dtype == torch.float32
    deq = dequantize_reference(q, s, [16, 32])
    assert ((deq - w).abs() <= w.abs() * 2**-3 + 1e-6).all()  # e4m3: 3 mantissa bits
    assert torch.equal(deq[32:, 64:], q[32:, 64:].float() * s[2, 2])  # the partial corner block


@pytest.mark.parametrize("case", list(CASES))
def test_dequantized_weights_equal_the_block_formula(case, tmp_path):
    """fp32: every moecoder tensor (experts stacked, gate/up concatenated) is exactly fp8 x block scale."""
    _, fp8_dir, ref_dir = write_fp8(case, tmp_path)
    ours = load_checkpoint(fp8_dir)
    assert ours.hf_config["quantization_config"]["quant_method"] == "fp8"
    _assert_same_state(ours.model, load_checkpoint(ref_dir).model)


def test_direct_formula_on_one_weight(tmp_path):
    """The same, spelled out on one attention and one expert weight of the non-square-block case."""
    _, fp8_dir, _ = write_fp8("deepseek_v3-16x32", tmp_path)
    model = load_checkpoint(fp8_dir).model
    with safe_open(fp8_dir / "model.safetensors", "pt") as f:
        def ref(name):
            return dequantize_reference(f.get_tensor(name), f.get_tensor(name + "_scale_inv"), [16, 32])

        kv_a = ref("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
        assert torch.equal(model.layers[0].attn.kv_a_proj.weight, kv_a)
        gate, up = (ref(f"model.layers.2.mlp.experts.5.{p}.weight") for p in ("gate_proj", "up_proj"))
        assert torch.equal(model.layers[2].ffn.experts.w13[5], torch.cat([gate, up]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_chunks_give_the_same_weights(tmp_path, monkeypatch, dtype):
    """One block row per dequantization step (the path large tensors take) changes nothing."""
    _, fp8_dir, _ = write_fp8("deepseek_v3-16x32", tmp_path)
    whole = load_checkpoint(fp8_dir, dtype=dtype).model
    monkeypatch.setattr(fp8_module, "_CHUNK_ELEMENTS", 1)
    _assert_same_state(load_checkpoint(fp8_dir, dtype=dtype).model, whole)


def test_bf16_load_rounds_the_fp32_product_once(tmp_path):
    _, fp8_dir, _ = write_fp8("minimax_m2-32", tmp_path)
    fp32, bf16 = load_checkpoint(fp8_dir).model.state_dict(), load_checkpoint(fp8_dir, dtype=torch.bfloat16).model
    for k, v in bf16.state_dict().items():
        if k.endswith("router.bias"):  # kept fp32, as transformers keeps it
            assert v.dtype == torch.float32 and torch.equal(v, fp32[k])
        else:
            assert v.dtype == torch.bfloat16 and torch.equal(v, fp32[k].to(torch.bfloat16)), k


# --- against transformers ---


@pytest.mark.parametrize("case", PARITY)
def test_logits_and_greedy_match_transformers_on_the_dequantized_weights(case, tmp_path):
    _, fp8_dir, ref_dir = write_fp8(case, tmp_path)
    ours = load_checkpoint(fp8_dir).model
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, attn_implementation="eager").eval()
    prompt = _prompt(ref.config.vocab_size)
    with torch.no_grad():
        assert (ours(prompt).logits - ref(prompt).logits).abs().max().item() <= FP32_ATOL
    ref_tokens = ref.generate(prompt, do_sample=False, max_new_tokens=32, min_new_tokens=32,
                              eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]
    assert torch.equal(greedy(ours, prompt, 32), ref_tokens)


# transformers 5.24 loads an fp8 folder on a machine without a GPU by dequantizing it at load
# (FineGrainedFP8HfQuantizer switches to dequantize=True), but first insists on `accelerate`, which
# that path does not use and which is not a dependency here: the test lifts that one guard. Its
# load-time dequantizer (Fp8Dequantize._dequantize_one) derives the block size from the scale grid
# (rows // scale_rows), which is the released convention only where the blocks divide the dims: on
# the partial blocks of "mixtral-128" it reads 192 rows as 2 blocks of 96 (max |delta logit| 11 vs
# the formula), and where the grid does not divide the dims (80 columns, 3 scale columns) it refuses to
# load. So it is compared here on dims the blocks divide; partial blocks are checked against the
# formula above, which is DeepSeek's own weight_dequant kernel (ceil grid, w * s[i // bm, j // bn]).
DIVISIBLE = ("minimax_m2", {**CASES["minimax_m2-32"][1], "hidden_size": 64, "intermediate_size": 32}, [32, 32],
             "per_expert")


def test_transformers_fp8_loader_agrees_where_blocks_divide(tmp_path, monkeypatch):
    from transformers.quantizers import quantizer_finegrained_fp8

    monkeypatch.setattr(quantizer_finegrained_fp8, "is_accelerate_available", lambda: True)
    monkeypatch.setitem(CASES, "minimax_m2-divisible", DIVISIBLE)
    _, fp8_dir, _ = write_fp8("minimax_m2-divisible", tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # dequantized, not FP8Linear
    ours = load_checkpoint(fp8_dir).model
    prompt = _prompt(hf.config.vocab_size)
    with torch.no_grad():
        assert (ours(prompt).logits - hf(prompt).logits).abs().max().item() <= FP32_ATOL
    ref_tokens = hf.generate(prompt, do_sample=False, max_new_tokens=32, min_new_tokens=32,
                             eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]
    assert torch.equal(greedy(ours, prompt, 32), ref_tokens)


# --- saving ---


def test_a_loaded_fp8_checkpoint_saves_as_a_plain_folder(tmp_path):
    _, fp8_dir, _ = write_fp8("deepseek_v3-16x32", tmp_path)
    model = load_checkpoint(fp8_dir, dtype=torch.bfloat16).model
    out = save_checkpoint(model, tmp_path / "saved")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as f:
        names = f.keys()
        dtypes = {f.get_slice(n).get_dtype() for n in names}
    assert not any(n.endswith("_scale_inv") for n in names) and dtypes <= {"BF16", "F32"}
    _assert_same_state(load_checkpoint(out, dtype=torch.bfloat16).model, model)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    prompt = _prompt(hf.config.vocab_size)
    with torch.no_grad():
        ours = load_checkpoint(out).model(prompt).logits
        assert (hf(prompt).logits - ours).abs().max().item() <= FP32_ATOL


# --- errors ---


@pytest.fixture
def fp8_dir(tmp_path):
    return write_fp8("minimax_m2-32", tmp_path)[1]


def _tensors(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        return {k: f.get_tensor(k).clone() for k in names}


def _edit(folder, drop=(), add=None, config=None):
    t = _tensors(folder)
    for n in drop:
        del t[n]
    t.update(add or {})
    save_file(t, folder / "model.safetensors")
    if config is not None:
        d = json.loads((folder / "config.json").read_text())
        d.update(config)
        (folder / "config.json").write_text(json.dumps({k: v for k, v in d.items() if v is not None}))


W3 = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
Q = "model.layers.0.self_attn.q_proj.weight"  # [64, 80]: scale [2, 3] in [32, 32] blocks


def test_weight_without_its_scale_is_named(fp8_dir):
    _edit(fp8_dir, drop=[W3 + "_scale_inv"])
    with pytest.raises(CheckpointError, match=f"tensor {W3} is stored as F8_E4M3 without its scale {W3}_scale_inv"):
        load_checkpoint(fp8_dir)


def test_scale_of_the_wrong_shape_is_named(fp8_dir):
    _edit(fp8_dir, add={Q + "_scale_inv": torch.ones(2, 2)})
    with pytest.raises(CheckpointError, match=rf"tensor {Q}_scale_inv: expected shape \[2, 3\] \(\[32, 32\] blocks "
                                              rf"of {Q} \[64, 80\]\), found \[2, 2\]"):
        load_checkpoint(fp8_dir)


def test_scale_without_its_weight_is_named(fp8_dir):
    _edit(fp8_dir, drop=[W3])
    with pytest.raises(CheckpointError, match=rf"fp8 scale tensor\(s\) without their weight: {W3}_scale_inv$"):
        load_checkpoint(fp8_dir)


def test_fp8_weights_without_quantization_config(fp8_dir):
    _edit(fp8_dir, config={"quantization_config": None})
    first = "model.layers.0.block_sparse_moe.experts.0.w1.weight"  # the first quantized name in sort order
    with pytest.raises(CheckpointError, match=f"tensor {first} is fp8-quantized .it has {first}_scale_inv. but "
                                              "config.json has no quantization_config"):
        load_checkpoint(fp8_dir)
    _edit(fp8_dir, drop=[n for n in _tensors(fp8_dir) if n.endswith("_scale_inv")])
    with pytest.raises(CheckpointError, match="is stored as F8_E4M3 but config.json has no quantization_config"):
        load_checkpoint(fp8_dir)


def test_scale_beside_an_unquantized_weight(fp8_dir):
    _edit(fp8_dir, add={"model.embed_tokens.weight_scale_inv": torch.ones(3, 3)})
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight has a scale .* but is stored as F32, not "
                                              "F8_E4M3"):
        load_checkpoint(fp8_dir)


def test_scale_must_be_floating_point(fp8_dir):
    _edit(fp8_dir, add={Q + "_scale_inv": torch.ones(2, 3, dtype=torch.uint8)})
    with pytest.raises(CheckpointError, match=f"tensor {Q}_scale_inv is stored as U8; fp8 scales are floating-point"):
        load_checkpoint(fp8_dir)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors", None])
def test_other_quantizations_are_refused(fp8_dir, method):
    _edit(fp8_dir, config={"quantization_config": {"quant_method": method, "bits": 4}})
    with pytest.raises(CheckpointError, match=f"quant_method {method!r} is not supported "
                                              r"\(supported: 'fp8' block-quantized weights, dequantized at load\)"):
        read_config(fp8_dir)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight_block_size": [128]}, r"weight_block_size must be two positive integers, not \[128\]"),
        ({"weight_block_size": [0, 128]}, "weight_block_size must be two positive integers"),
        ({"activation_scheme": "static"}, "activation_scheme 'static' is not supported"),
        ({"scale_fmt": "ue8m0"}, "scale_fmt 'ue8m0' is not supported"),
        ({"expert_dtype": "fp4"}, "expert_dtype 'fp4' is not supported"),
    ],
)
def test_unsupported_fp8_options_are_named(fp8_dir, change, message):
    qc = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    _edit(fp8_dir, config={"quantization_config": {**qc, **change}})
    with pytest.raises(CheckpointError, match=message):
        read_config(fp8_dir)


def test_block_size_defaults_as_in_transformers():
    """No weight_block_size: [128, 128] (FineGrainedFP8Config's default); null: one scale per matrix."""
    from transformers.utils.quantization_config import FineGrainedFP8Config

    assert fp8_module.fp8_format({"quantization_config": {"quant_method": "fp8"}}).block == (128, 128)
    assert FineGrainedFP8Config.from_dict({"quant_method": "fp8"}).weight_block_size == (128, 128)
    per_matrix = {"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}
    assert fp8_module.fp8_format(per_matrix).block is None
    assert fp8_module.fp8_format({"quantization_config": None}) is None
