"""Tokenise a built corpus into packed token shards: raw little-endian .bin files plus index.json.

Every document is followed by the eos id, so a split is one stream `doc eos doc eos ...` cut into shards of
`shard_tokens` tokens (the last shorter). Workers tokenise batches of documents in spawned processes; the parent
writes their results in input order, so the shards are byte-identical for any worker count.

index.json:
    {"format": "moecoder-tokens-v1", "dtype": "uint16", "vocab_size", "eos_id", "tokenizer_sha256",
     "splits": {"train": {"shards": [{"file", "tokens"}], "num_tokens", "num_docs"}, "val": {...}},
     "total_tokens"}
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moecoder.train.data import SPLITS, DataError, count_lines, iter_texts, write_json_atomic

INDEX_FORMAT = "moecoder-tokens-v1"
DOCS_PER_TASK = 64  # documents per worker task: large enough to amortise pickling, small enough to balance

_worker_tok = None  # the tokenizer of one worker process, loaded once by _init_worker


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def _init_worker(tokenizer_file: str) -> None:
    global _worker_tok
    # One process per core already; tokenizers' own thread pool would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _worker_tok = Tokenizer.from_file(tokenizer_file)


def _encode_docs(args: tuple[list[str], int, str]) -> tuple[bytes, int]:
    """Worker task: _encode with this process's tokenizer."""
    return _encode(_worker_tok, *args)


def _encode(tok, texts: list[str], eos_id: int, dtype: str) -> tuple[bytes, int]:
    """Tokenise a batch of documents, each followed by eos; returns (packed little-endian bytes, token count)."""
    encs = tok.encode_batch(texts, add_special_tokens=False)
    parts = []
    for e in encs:
        parts.append(np.asarray(e.ids, dtype=dtype))
        parts.append(np.asarray([eos_id], dtype=dtype))
    arr = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return arr.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes(), int(arr.size)


def _batches(path: Path, n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in iter_texts(path):
        batch.append(text)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriter:
    """Appends token bytes to a split's stream, cutting a new shard every shard_tokens tokens."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, itemsize: int):
        self.out_dir, self.split, self.shard_tokens, self.itemsize = out_dir, split, shard_tokens, itemsize
        self.shards: list[dict] = []
        self._f = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._tmp = self.out_dir / f".{name}.tmp{os.getpid()}"
        self._f = open(self._tmp, "wb")  # noqa: SIM115  (spans many write() calls; closed by _close/abort)
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def _close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, self.out_dir / self.shards[-1]["file"])
            self._f = None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            if self._f is None or self._in_shard == self.shard_tokens:
                self._close()
                self._open()
            take = min(self.shard_tokens - self._in_shard, len(view) // self.itemsize)
            self._f.write(view[: take * self.itemsize])
            view = view[take * self.itemsize:]
            self._in_shard += take
            self.shards[-1]["tokens"] += take

    def finish(self) -> list[dict]:
        self._close()
        return self.shards

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._tmp.unlink(missing_ok=True)


def tokenize_corpus(corpus_dir: Path, tokenizer_dir: Path, out_dir: Path, workers: int = 1,
                    shard_tokens: int = 1 << 26, progress: bool = False) -> dict:
    """Tokenise every split of corpus_dir into out_dir; returns the index dict (also written to out_dir/index.json)."""
    from moecoder.hashing import sha256_file
    from moecoder.train.tok_train import eos_id_of, load_tokenizer

    corpus_dir, tokenizer_dir, out_dir = Path(corpus_dir), Path(tokenizer_dir), Path(out_dir)
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not corpus_dir.is_dir():
        raise DataError(f"corpus dir not found: {corpus_dir}")
    splits = [s for s in SPLITS if (corpus_dir / f"{s}.jsonl").is_file()]
    if "train" not in splits:
        raise DataError(f"no train.jsonl in {corpus_dir} (run `moecoder data build` first)")
    tok = load_tokenizer(tokenizer_dir)
    eos_id, vocab_size = eos_id_of(tok), tok.get_vocab_size()
    dtype = dtype_for_vocab(vocab_size)
    tok_file = str(tokenizer_dir / "tokenizer.json")

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    n_docs = {s: count_lines(corpus_dir / f"{s}.jsonl") for s in splits}
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tok_file,)) if workers > 1 else None
    bar = _Progress(sum(n_docs.values())) if progress else None
    index_splits = {}
    try:
        for split in splits:
            writer = _ShardWriter(out_dir, split, shard_tokens, dtype.itemsize)
            try:
                total = 0
                batches = _batches(corpus_dir / f"{split}.jsonl", DOCS_PER_TASK)
                for data, n_tok, n_batch in _run(pool, tok, workers, batches, eos_id, dtype.str):
                    writer.write(data)
                    total += n_tok
                    if bar is not None:
                        bar.advance(n_batch, n_tok)
                shards = writer.finish()
            except BaseException:
                writer.abort()
                raise
            index_splits[split] = {"shards": shards, "num_tokens": total, "num_docs": n_docs[split]}
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()

    # A self-contained data dir: the tokenizer travels with the tokens it produced.
    tok_copy = out_dir / "tokenizer"
    tok_copy.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            tmp = tok_copy / f".{name}.tmp{os.getpid()}"
            shutil.copyfile(tokenizer_dir / name, tmp)
            os.replace(tmp, tok_copy / name)
    index = {
        "format": INDEX_FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer_sha256": sha256_file(tokenizer_dir / "tokenizer.json"),
        "splits": index_splits,
        "total_tokens": sum(s["num_tokens"] for s in index_splits.values()),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(out_dir / "index.json", index)
    _remove_stale_shards(out_dir, index_splits)
    return index


def _remove_stale_shards(out_dir: Path, index_splits: dict) -> None:
    """Delete shards a previous, larger run left behind, so the folder holds exactly what index.json lists."""
    listed = {sh["file"] for s in index_splits.values() for sh in s["shards"]}
    for split in SPLITS:
        for p in out_dir.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9].bin"):
            if p.name not in listed:
                p.unlink()


def _run(pool, tok, workers: int, batches: Iterator[list[str]], eos_id: int, dtype: str):
    """Yield (bytes, n_tokens, n_docs) per batch in input order, keeping at most 2*workers batches in flight."""
    if pool is None:
        for b in batches:
            data, n = _encode(tok, b, eos_id, dtype)
            yield data, n, len(b)
        return
    pending: deque = deque()
    for b in batches:
        pending.append((pool.apply_async(_encode_docs, ((b, eos_id, dtype),)), len(b)))
        if len(pending) >= 2 * workers:
            res, nb = pending.popleft()
            yield *res.get(), nb
    while pending:
        res, nb = pending.popleft()
        yield *res.get(), nb


class _Progress:
    """rich progress: documents tokenised out of the total, and tokens written."""

    def __init__(self, total_docs: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("tokenise files"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[tokens]:,} tokens"), TimeElapsedColumn())
        self._task = self._p.add_task("docs", total=total_docs, tokens=0)
        self._tokens = 0
        self._p.start()

    def advance(self, docs: int, tokens: int) -> None:
        self._tokens += tokens
        self._p.update(self._task, advance=docs, tokens=self._tokens)

    def close(self) -> None:
        self._p.stop()
