"""Load and save Hugging Face checkpoint folders (config.json + safetensors).

Loading builds the Transformer on the `meta` device and fills it tensor by tensor from the
safetensors files, so host memory peaks near the size of the weights, not twice it:
tensors used as they are stored come as zero-copy views of the memory-mapped file; tensors
that need a dtype conversion, another device, or assembly from per-expert pieces are read with
pread(2) into their destination, so the file's pages never sit in this process beside the copy.
FP8 block-quantized weights (see fp8.py) are dequantized into their destination a few block rows at
a time, read the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..model import Transformer
from ..model.rope import rope_frequencies
from .config_hf import from_hf_config, to_hf_config
from .formats import IGNORED, TABLES, CheckpointError, Piece, fused_table, plan
from .fp8 import SCALE_SUFFIX, Fp8Format, check_quantized, dequantize_into, fp8_format, scale_name

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class LoadedCheckpoint:
    model: Transformer  # eval mode, weights loaded
    config: ModelConfig
    hf_config: dict[str, Any]
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return d


def _hf_config(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    return folder, _read_json(folder / "config.json")


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint folder, from its config.json alone (no weights read)."""
    return from_hf_config(_hf_config(path)[1])


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _special_tokens(folder: Path, hf: dict[str, Any]) -> tuple[list[int], int | None]:
    """eos ids from config.json then generation_config.json (which often lists more); bos likewise."""
    gen = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").exists() else {}
    eos = []
    for i in _token_ids(hf.get("eos_token_id")) + _token_ids(gen.get("eos_token_id")):
        if i not in eos:
            eos.append(i)
    bos = hf.get("bos_token_id", gen.get("bos_token_id"))
    return eos, None if bos is None else int(bos)


def _weight_files(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> file holding it."""
    if (folder / INDEX).exists():
        weight_map = _read_json(folder / INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{folder / INDEX} has no weight_map")
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{folder / INDEX} names shard file(s) that do not exist: {', '.join(missing)}")
        return {name: folder / f for name, f in weight_map.items()}
    if not (folder / SINGLE).is_file():
        raise CheckpointError(f"{folder} has neither {SINGLE} nor {INDEX}")
    with _open(folder / SINGLE) as f:
        names = f.keys()  # a safe_open handle is not iterable
    return dict.fromkeys(names, folder / SINGLE)


def _open(path: Path, backend: str = "mmap"):
    try:
        return safe_open(path, framework="pt", backend=backend)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


class _Reader:
    """Open safetensors files lazily, one mmap and one pread handle per file."""

    def __init__(self):
        self.handles: dict[tuple[Path, str], Any] = {}

    def get(self, path: Path, name: str, backend: str) -> torch.Tensor:
        key = (path, backend)
        if key not in self.handles:
            self.handles[key] = _open(path, backend)
        try:
            return self.handles[key].get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None

    def slice(self, path: Path, name: str, backend: str = "mmap"):
        key = (path, backend)
        if key not in self.handles:
            self.handles[key] = _open(path, backend)
        try:
            return self.handles[key].get_slice(name)
        except SafetensorError:
            raise CheckpointError(f"{path} does not contain tensor {name} listed in {INDEX}") from None

    def shape(self, path: Path, name: str) -> tuple[int, ...]:
        return tuple(self.slice(path, name).get_shape())

    def info(self, path: Path, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name such as 'BF16' or 'F8_E4M3'), from the header alone."""
        s = self.slice(path, name)
        return tuple(s.get_shape()), s.get_dtype()


def _expected_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        shapes.pop("lm_head.weight")  # the same tensor as embed.weight
    return shapes


def _extra_layers(cfg: ModelConfig, hf: dict[str, Any]) -> re.Pattern | None:
    """DeepSeek-V3 checkpoints store their multi-token-prediction modules as layers n_layers.. (unused here)."""
    n = hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0
    if cfg.model_type != "deepseek_v3" or not n:
        return None
    return re.compile(rf"^model\.layers\.({'|'.join(str(cfg.n_layers + i) for i in range(n))})\.")


def _split_scales(files: dict[str, Path], fmt: Fp8Format | None) -> tuple[dict[str, Path], set[str]]:
    """(the checkpoint's tensors less the fp8 scales, the names of the weights that have a scale)."""
    scaled = {n.removesuffix(SCALE_SUFFIX) for n in files if n.endswith(SCALE_SUFFIX)}
    orphans = sorted(scale_name(w) for w in scaled if w not in files)
    if orphans:
        raise CheckpointError(f"fp8 scale tensor(s) without their weight: {_names(orphans)}")
    if scaled and fmt is None:
        w = min(scaled)
        raise CheckpointError(f"tensor {w} is fp8-quantized (it has {scale_name(w)}) but config.json has no "
                              "quantization_config")
    return {n: f for n, f in files.items() if not n.endswith(SCALE_SUFFIX)}, scaled


def _check_names(plans: dict[str, list[Piece]], files: dict[str, Path], tied: bool,
                 skip: re.Pattern | None = None) -> None:
    wanted = {p.name for pieces in plans.values() for p in pieces}
    missing = sorted(wanted - set(files))
    tolerated = {"lm_head.weight"} if tied else set()  # some tied checkpoints store both copies
    unexpected = sorted(n for n in set(files) - wanted - tolerated
                        if not IGNORED.search(n) and not (skip and skip.search(n)))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s): {_names(unexpected)}")
        raise CheckpointError("checkpoint does not match its config.json: " + "; ".join(parts))


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> LoadedCheckpoint:
    """Load a Hugging Face checkpoint folder of a supported model type into a moecoder Transformer.

    Accepts a single model.safetensors or shards with model.safetensors.index.json, experts
    stored per expert (released checkpoints) or fused (transformers 5), and fp8 block-quantized
    checkpoints (DeepSeek-V3/R1, MiniMax-M2 as released), dequantized to `dtype` as they are read.
    Every tensor is checked by name and shape (fp8 ones also against their scale); any mismatch
    raises one CheckpointError naming the tensors.
    """
    folder, hf = _hf_config(path)
    cfg = from_hf_config(hf)
    fmt = fp8_format(hf)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(cfg)
    files = _weight_files(folder)
    weights, scaled = _split_scales(files, fmt)
    fused = any(n.endswith(".experts.gate_up_proj") for n in weights)
    table = fused_table(TABLES[cfg.model_type]) if fused else TABLES[cfg.model_type]
    shapes = _expected_shapes(model)
    plans = plan(table, shapes)
    _check_names(plans, weights, cfg.tie_embeddings, _extra_layers(cfg, hf))

    reader = _Reader()
    state: dict[str, torch.Tensor] = {}
    for name, pieces in plans.items():
        for p in pieces:
            found, stored = reader.info(files[p.name], p.name)
            if found != p.shape:
                raise CheckpointError(f"tensor {p.name}: expected shape {list(p.shape)}, found {list(found)}")
            scale = reader.info(files[scale_name(p.name)], scale_name(p.name)) if p.name in scaled else None
            check_quantized(fmt, p.name, found, stored, scale)
        # The selection-only routing bias stays fp32, as transformers keeps it: bf16 rounding would move choices.
        want = torch.float32 if name.endswith("router.bias") else dtype
        state[name] = _assemble(reader, files, pieces, shapes[name], want, device, scaled, fmt)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    # Non-persistent buffers are not in the checkpoint: recompute them off the meta device.
    model.inv_freq = rope_frequencies(cfg)[0].to(device)
    eos, bos = _special_tokens(folder, hf)
    return LoadedCheckpoint(model.eval(), cfg, hf, eos, bos)


def _assemble(reader: _Reader, files, pieces: list[Piece], shape, dtype, device,
              scaled: set[str], fmt: Fp8Format | None) -> torch.Tensor:
    if len(pieces) == 1 and pieces[0].index == () and pieces[0].name not in scaled:
        p = pieces[0]
        t = reader.get(files[p.name], p.name, "mmap")
        if t.dtype == dtype and device.type == "cpu":
            return t  # zero-copy view of the mapped file (copy-on-write if modified)
        del t
        return reader.get(files[p.name], p.name, "pread").to(device=device, dtype=dtype)
    out = torch.empty(shape, dtype=dtype, device=device)  # stacked experts, filled piece by piece
    for p in pieces:
        if p.name in scaled:  # fp8: dequantized block rows at a time, read with pread
            scale = reader.get(files[scale_name(p.name)], scale_name(p.name), "pread")
            dequantize_into(out[p.index], reader.slice(files[p.name], p.name, "pread"), scale, fmt)
        else:
            out[p.index].copy_(reader.get(files[p.name], p.name, "pread"))
    return out


def save_checkpoint(
    model: Transformer,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 2**30,
    tokenizer_dir: str | os.PathLike | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a Hugging Face folder of its cfg.model_type, loadable by transformers.

    Tensors use the released per-expert naming (what transformers itself writes), in shards of
    at most max_shard_bytes with an index when more than one is needed. The folder is written
    beside `path` and renamed into place, so readers never see a half-written checkpoint.
    extra_config entries (e.g. eos_token_id) are merged into config.json.
    """
    cfg: ModelConfig = model.cfg
    hf = to_hf_config(cfg)
    hf.update(extra_config or {})
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        state = model.state_dict()
        shapes = _expected_shapes(model)
        plans = plan(TABLES[cfg.model_type], shapes)
        pieces = [(state[name], p) for name, ps in plans.items() for p in ps]
        dtype = state["embed.weight"].dtype
        hf["dtype"] = str(dtype).removeprefix("torch.")
        _write_shards(tmp, pieces, max_shard_bytes)
        with open(tmp / "config.json", "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp)
        _fsync_files(tmp)  # the rename must not publish files whose data is still only in the page cache
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_shards(folder: Path, pieces: list[tuple[torch.Tensor, Piece]], max_shard_bytes: int) -> None:
    shards: list[list[tuple[torch.Tensor, Piece]]] = [[]]
    size = 0
    for t, p in pieces:
        n = t[p.index].numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((t, p))
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(_materialise(shards[0]), folder / SINGLE, metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = _materialise(shard)
        save_file(tensors, folder / fname, metadata=meta)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: fname for name in tensors})
    with open(folder / INDEX, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _materialise(shard: list[tuple[torch.Tensor, Piece]]) -> dict[str, torch.Tensor]:
    out = {}
    for t, p in shard:
        t = t.detach().to("cpu")
        # safetensors refuses tensors that share storage, so expert slices are copied (one shard at a time).
        out[p.name] = t[p.index].clone() if p.index else t.contiguous()
    return out


def _copy_tokenizer(src: Path, dst: Path) -> None:
    if not (src / "tokenizer.json").is_file():
        raise CheckpointError(f"tokenizer_dir {src} has no tokenizer.json")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _fsync_files(folder: Path) -> None:
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename tmp to target; an existing target is moved aside first and removed after."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
