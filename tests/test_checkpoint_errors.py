"""Bad checkpoint folders give one CheckpointError that names the problem; saving is atomic."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moecoder.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint, to_hf_config
from moecoder.checkpoint import hf as hf_module
from moecoder.config import get_preset
from moecoder.model import Transformer


def _cfg():
    # Mixtral renormalises top-k weights and has no dense layers (ffn_dim == expert size).
    return get_preset("debug").replace(norm_topk=True, ffn_dim=64)


def _model(seed=0):
    model = Transformer(_cfg())
    model.init_weights(seed=seed)
    return model


@pytest.fixture
def ckpt(tmp_path):
    """A valid debug-sized mixtral checkpoint folder."""
    return save_checkpoint(_model(), tmp_path / "ckpt")


def _tensors(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        return {k: f.get_tensor(k).clone() for k in names}


def _edit_config(folder, **changes):
    d = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    (folder / "config.json").write_text(json.dumps(d))


def test_valid_checkpoint_loads(ckpt):
    assert load_checkpoint(ckpt).config == _cfg()
    assert read_config(ckpt) == _cfg()


def test_mixtral_without_renormalisation_saves_with_a_warning_and_reloads_exactly(tmp_path):
    model = Transformer(get_preset("debug").replace(norm_topk=False))  # mixtral-typed, no top-k renormalisation
    model.init_weights(seed=0)
    with pytest.warns(UserWarning, match="norm_topk=False"):
        save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.config.norm_topk
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens).logits, model(tokens).logits)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_missing_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        read_config(ckpt)


def test_config_json_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt)


def test_unsupported_model_type_lists_supported(ckpt):
    _edit_config(ckpt, model_type="llama")
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'; supported: mixtral, .*olmoe"):
        load_checkpoint(ckpt)


def test_missing_config_fields_are_named(ckpt):
    _edit_config(ckpt, hidden_size=None, num_local_experts=None)
    with pytest.raises(CheckpointError, match="missing required field.*hidden_size, num_local_experts"):
        read_config(ckpt)


def test_quantized_checkpoint_rejected(ckpt):
    # fp8 block-quantized checkpoints load (tests/test_fp8_checkpoints.py); other quantizations are refused.
    _edit_config(ckpt, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(CheckpointError, match="quant_method 'gptq' is not supported .*supported: 'fp8'"):
        read_config(ckpt)


def test_inconsistent_config_values(ckpt):
    _edit_config(ckpt, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match="invalid mixtral model: n_heads=4 must be a multiple of n_kv_heads=3"):
        read_config(ckpt)


def test_missing_tensor_is_named(ckpt):
    t = _tensors(ckpt)
    del t["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.layers.1.block_sparse_moe.experts.2.w3"):
        load_checkpoint(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    t = _tensors(ckpt)
    t["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): model.layers.0.mlp.extra.weight"):
        load_checkpoint(ckpt)


def test_shape_mismatch_names_tensor_and_shapes(ckpt):
    t = _tensors(ckpt)
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj.weight: expected shape \[32, 64\], found \[16, 64\]"):
        load_checkpoint(ckpt)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(ckpt)


def test_corrupt_safetensors_header(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # clobber the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(ckpt)


def test_no_weight_files(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_checkpoint(ckpt)


def test_index_names_missing_shard(tmp_path):
    folder = save_checkpoint(_model(), tmp_path / "ckpt", max_shard_bytes=100_000)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"shard file.* do not exist: {shards[-1].name}"):
        load_checkpoint(folder)


def test_cannot_save_what_the_family_cannot_express():
    cfg = _cfg().replace(qk_norm="head")  # mixtral has no qk-norm
    with pytest.raises(CheckpointError, match="a mixtral checkpoint cannot express qk_norm='head'"):
        to_hf_config(cfg)


def test_failed_save_leaves_existing_checkpoint_and_no_temp(ckpt, monkeypatch):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    model = _model(seed=1)

    def boom(folder, *a, **k):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hf_module, "_write_shards", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, ckpt)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]


def test_save_replaces_existing_and_copies_tokenizer(ckpt, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {}}')
    (tok / "tokenizer_config.json").write_text("{}")
    model = _model(seed=1)
    save_checkpoint(model, ckpt, tokenizer_dir=tok, extra_config={"eos_token_id": [5, 6], "bos_token_id": 4})
    loaded = load_checkpoint(ckpt)
    assert torch.equal(loaded.model.embed.weight, model.embed.weight)
    assert (ckpt / "tokenizer.json").read_text() == '{"model": {}}'
    assert loaded.eos_token_ids == [5, 6] and loaded.bos_token_id == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tok"]


def test_tokenizer_dir_without_tokenizer(tmp_path):
    model = _model()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        save_checkpoint(model, tmp_path / "ckpt", tokenizer_dir=tmp_path)
    assert not (tmp_path / "ckpt").exists()


def test_index_pointing_at_wrong_shard(tmp_path):
    folder = save_checkpoint(_model(), tmp_path / "ckpt", max_shard_bytes=100_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{shards[1]} does not contain tensor {name}"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"model_type": "olmoe", "num_experts": 4, "clip_qkv": 8.0}, "olmoe with clip_qkv=8.0 is not supported"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "unsupported rope type 'dynamic'"),
    ],
)
def test_unsupported_options_are_named(ckpt, change, message):
    _edit_config(ckpt, **change)
    with pytest.raises(CheckpointError, match=message):
        read_config(ckpt)
