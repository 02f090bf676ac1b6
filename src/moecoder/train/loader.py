"""Training windows over packed token shards, deterministic and resumable.

A split is one token stream (its shards concatenated). Window i is tokens [i*T, i*T + T + 1): windows are
non-overlapping spans of T+1 tokens with stride T, so inputs (first T) and targets (last T) overlap by one.
Each epoch visits every window once in the order of a permutation seeded by (seed, epoch); the stream of windows
runs on across epochs, so a batch may straddle an epoch boundary.

Data parallel: one step consumes a global batch of B*world_size windows from that stream and rank r takes
rows r, r+w, r+2w, ... of it. The position therefore counts global windows: every rank holds the same state,
and a run can resume under a different world size as long as B*world_size stays the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moecoder.train.data import DataError
from moecoder.train.shards import INDEX_FORMAT

_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def read_index(data_dir: Path | str) -> dict:
    """The validated index.json of a tokenised data dir (see moecoder.train.shards)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data dir not found: {data_dir}")
    path = data_dir / "index.json"
    if not path.is_file():
        raise DataError(f"no index.json in {data_dir} (run `moecoder data tokenize` first)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt index {path}: {e}") from None
    problem = _index_problem(index)
    if problem:
        raise DataError(f"corrupt index {path}: {problem}")
    return index


def _index_problem(index) -> str | None:
    if not isinstance(index, dict):
        return "not a JSON object"
    if index.get("format") != INDEX_FORMAT:
        return f"format is {index.get('format')!r}, expected {INDEX_FORMAT!r}"
    if index.get("dtype") not in _DTYPES:
        return f"dtype {index.get('dtype')!r} is not one of {sorted(_DTYPES)}"
    splits = index.get("splits")
    if not isinstance(splits, dict):
        return "no 'splits' mapping"
    for name, s in splits.items():
        shards = s.get("shards") if isinstance(s, dict) else None
        if not isinstance(shards, list) or not all(
            isinstance(sh, dict) and isinstance(sh.get("file"), str) and isinstance(sh.get("tokens"), int)
            and sh["tokens"] >= 0 and "/" not in sh["file"] for sh in shards
        ):
            return f"split {name!r} has a malformed shard list"
        if s.get("num_tokens") != sum(sh["tokens"] for sh in shards):
            return f"split {name!r}: num_tokens does not match its shards"
    return None


class TokenWindows:
    """Batches of (inputs, targets) windows from one split of a tokenised data dir.

    ds = TokenWindows(data_dir, split="train", seq_len=128, seed=0)
    x_BT, y_BT = ds.next_batch(B)     # int64 tensors [B, T]; y is x shifted left by one token
    state = ds.state_dict(); ds.load_state_dict(state)   # exact resume
    """

    def __init__(self, data_dir: Path | str, split: str = "train", seq_len: int = 128, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad data-parallel rank {rank} of world_size {world_size}")
        self.data_dir = Path(data_dir)
        index = read_index(self.data_dir)
        if split not in index["splits"]:
            raise DataError(f"split {split!r} not in {self.data_dir} (have {sorted(index['splits'])})")
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.vocab_size = index.get("vocab_size")
        self.eos_id = index.get("eos_id")
        dtype = np.dtype(_DTYPES[index["dtype"]])

        self._shards: list[np.memmap] = []
        for sh in index["splits"][split]["shards"]:
            path = self.data_dir / sh["file"]
            if not path.is_file():
                raise DataError(f"shard missing: {path}")
            if path.stat().st_size != sh["tokens"] * dtype.itemsize:
                raise DataError(f"shard {path} holds {path.stat().st_size} bytes, index says {sh['tokens']} tokens "
                                f"of {dtype.name}")
            if sh["tokens"]:
                self._shards.append(np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r"))
        # _offsets[i] is the stream position of shard i's first token; the last entry is the stream length.
        self._offsets = np.concatenate([[0], np.cumsum([len(s) for s in self._shards], dtype=np.int64)])
        self.num_tokens = int(self._offsets[-1])
        self.num_windows = (self.num_tokens - 1) // seq_len if self.num_tokens > 0 else 0
        if self.num_windows == 0:
            raise DataError(f"split {split!r} of {self.data_dir} has {self.num_tokens} tokens, "
                            f"fewer than seq_len+1={seq_len + 1}")
        self.epoch = 0
        self.position = 0  # windows of the current epoch already consumed, over all ranks
        self._perm: np.ndarray | None = None
        self._perm_key: tuple[int, int] | None = None

    # --- order ---

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_key != (self.seed, epoch):
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_key = (self.seed, epoch)
        return self._perm

    def _take(self, n: int) -> np.ndarray:
        """The next n window ids of the global stream, rolling over epochs."""
        parts = []
        while n:
            perm = self._permutation(self.epoch)
            k = min(n, self.num_windows - self.position)
            parts.append(perm[self.position:self.position + k])
            self.position += k
            n -= k
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    # --- reading ---

    def _read(self, start: int, n: int, out: np.ndarray) -> None:
        """Copy stream tokens [start, start+n) into out, crossing shard boundaries as needed."""
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        done = 0
        while done < n:
            lo = start + done - int(self._offsets[i])
            k = min(n - done, len(self._shards[i]) - lo)
            out[done:done + k] = self._shards[i][lo:lo + k]
            done += k
            i += 1

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x_BT, y_BT) int64 batch of this rank; advances the shared stream by batch_size*world_size."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        ids = self._take(batch_size * self.world_size)[self.rank::self.world_size]
        T = self.seq_len
        buf = np.empty((batch_size, T + 1), dtype=np.int64)
        for row, w in enumerate(ids):
            self._read(int(w) * T, T + 1, buf[row])
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    # --- resume ---

    def state_dict(self) -> dict:
        """A small JSON-able dict; load_state_dict(state) makes next_batch continue exactly from here."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "split": self.split,
                "seq_len": self.seq_len, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (its seed replaces the constructor's: resuming continues the saved run's order)."""
        try:
            epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"bad loader state {state!r}: needs integer epoch, position and seed") from None
        for key, mine in (("seq_len", self.seq_len), ("num_windows", self.num_windows), ("split", self.split)):
            if key in state and state[key] != mine:
                raise DataError(f"loader state is for {key}={state[key]!r}, this loader has {key}={mine!r}")
        if epoch < 0 or not 0 <= position < self.num_windows:
            raise DataError(f"loader state out of range: epoch={epoch} position={position} "
                            f"(num_windows={self.num_windows})")
        self.epoch, self.position, self.seed = epoch, position, seed
