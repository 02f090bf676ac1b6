"""Training checkpoints: save atomically, keep the last K, verify, resume from the newest good one.

Layout of one checkpoint, `<out>/checkpoints/step_00000120/`:
    model/             Hugging Face folder (config.json + safetensors), via moecoder.checkpoint
    train_state.pt     optimizer, grad scaler, step, RNG states and data-loader state of every rank, configs
    manifest.json      sha256 of every other file; written last, so a folder without a matching
                       manifest is incomplete or corrupt
The folder is built as `.tmp-step_...` and renamed into place, so a kill mid-save leaves no
half-written checkpoint under a real name.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError  # one error type for model and training checkpoints
from ..hashing import sha256_file

MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"
MODEL_DIR = "model"
_STEP_DIR = re.compile(r"^step_(\d{8})$")



def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-named folder, oldest first (valid or not)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def write_manifest(folder: Path, step: int) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"step": step, "files": {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify_checkpoint(folder: str | Path) -> int:
    """Check the manifest against the files; return the step or raise CheckpointError naming the problem."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST} (incomplete save)")
    try:
        manifest = json.loads(mpath.read_text())
        files, step = manifest["files"], int(manifest["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {folder} has an unreadable {MANIFEST}: {e}") from None
    for required in (TRAIN_STATE, f"{MODEL_DIR}/config.json"):
        if required not in files:
            raise CheckpointError(f"checkpoint {folder} manifest does not list {required}")
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {rel}")
        if sha256_file(p) != digest:
            raise CheckpointError(f"checkpoint {folder} is corrupt: sha256 of {rel} does not match the manifest")
    return step


def latest_good_checkpoint(out_dir: str | Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that passes `verify_checkpoint`; bad ones are named via `warn` and skipped."""
    for _, folder in reversed(list_checkpoints(out_dir)):
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as e:
            warn(f"warning: {e}; falling back to an earlier checkpoint")
    return None


# --- RNG ---


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save / load ---


def save_training_checkpoint(
    out_dir: str | Path,
    step: int,
    *,
    model_to_save: torch.nn.Module,
    train_state: dict[str, Any],
    keep: int,
    tokenizer_dir: str | Path | None = None,
    extra_config: dict | None = None,
) -> Path:
    """Write checkpoint `step` atomically (tmp folder, manifest last, rename), then keep the newest `keep`.

    Call on the main rank only; `model_to_save` is a plain (unwrapped, unsharded) module.
    """
    from ..checkpoint import save_checkpoint

    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / (".tmp-" + final.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_checkpoint(model_to_save, tmp / MODEL_DIR, tokenizer_dir=tokenizer_dir, extra_config=extra_config)
    state_tmp = tmp / (TRAIN_STATE + ".tmp")
    torch.save(train_state, state_tmp)
    os.replace(state_tmp, tmp / TRAIN_STATE)
    write_manifest(tmp, step)
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old one
        old = root / (".old-" + final.name)
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _prune(out_dir, keep)
    return final


def _fsync_tree(folder: Path) -> None:
    # Renaming is atomic, but without fsync a power loss could leave the renamed folder's
    # files empty; the manifest check would catch that, this makes it rare.
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _prune(out_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    ckpts = list_checkpoints(out_dir)
    for _, folder in ckpts[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    for stale in checkpoint_root(out_dir).glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_train_state(folder: str | Path) -> dict[str, Any]:
    # weights_only=False: the file is our own (its sha256 was just checked against the manifest) and
    # holds python/numpy RNG states and the data loader's state, which are not plain tensors.
    return torch.load(Path(folder) / TRAIN_STATE, map_location="cpu", weights_only=False)


def load_model_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Load the HF folder of a checkpoint into `model` (plain, unwrapped), strictly and exactly."""
    from ..checkpoint import load_checkpoint

    loaded = load_checkpoint(Path(folder) / MODEL_DIR, dtype=next(model.parameters()).dtype)
    missing, unexpected = model.load_state_dict(loaded.model.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder} does not match the model: missing {missing}, "
                              f"unexpected {unexpected}")
