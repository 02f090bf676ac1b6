"""Training data pipeline: corpus build, tokenizer training, packed shards, TokenWindows loader.

One tiny corpus (~150 KB of generated Python) is built per module; everything runs on CPU in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moecoder.cli import app
from moecoder.train.data import BuildOptions, DataError, build_corpus
from moecoder.train.loader import TokenWindows, read_index
from moecoder.train.shards import tokenize_corpus

EOS = "<|endoftext|>"
WORDS = ["alpha", "beta", "gamma", "delta", "count", "items", "value", "result", "parse", "token", "node", "tree"]


def _py_file(rng: random.Random, i: int) -> str:
    """A plausible, unique Python module of ~1-2 KB."""
    lines = [f'"""Module {i}: helpers for {rng.choice(WORDS)} handling."""', "", "import os", ""]
    for j in range(rng.randint(3, 6)):
        a, b = rng.sample(WORDS, 2)
        lines += [f"def {a}_{b}_{i}_{j}({a}, {b}=None):",
                  f'    """Return the {a} of {b} — café ünïcode {j}."""',
                  f"    for k in range({rng.randint(1, 99)}):",
                  f"        {a} = {a} + k * {rng.randint(2, 9)}",
                  f"    if {b} is None:",
                  f"        return {a}",
                  f"    return [{a}, {b}, os.sep]", ""]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> dict:
    """Source tree with known duplicates, too-small, too-large, non-UTF-8 files, and a JSONL source."""
    root = tmp_path_factory.mktemp("src")
    code = root / "code"
    (code / "pkg" / "sub").mkdir(parents=True)
    (code / "pkg" / "__pycache__").mkdir()
    rng = random.Random(0)
    texts = [_py_file(rng, i) for i in range(90)]
    for i, t in enumerate(texts):
        (code / ("pkg" if i % 2 else "pkg/sub") / f"m{i:03d}.py").write_text(t, encoding="utf-8")
    (code / "pkg" / "dup_of_m001.py").write_text(texts[1], encoding="utf-8")  # exact duplicate
    (code / "pkg" / "tiny.py").write_text("x = 1\n")  # too small
    (code / "pkg" / "huge.py").write_text("# pad\n" * 5000)  # 30 KB: too large
    (code / "pkg" / "latin1.py").write_bytes("# caf\xe9 is latin-1 here\n".encode("latin-1") * 10)  # not UTF-8
    (code / "pkg" / "notes.txt").write_text("not python " * 50)  # ignored: not *.py
    (code / "pkg" / "__pycache__" / "m.py").write_text(texts[0] + "# cached\n")  # ignored: __pycache__
    jsonl = root / "extra.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i in range(10):
            f.write(json.dumps({"text": _py_file(rng, 1000 + i), "licence": "CC0-1.0"}) + "\n")
        f.write(json.dumps({"text": texts[2]}) + "\n")  # duplicate of a file
        f.write('{"text": 12}\n')  # bad record
        f.write("{not json\n")  # bad record
        f.write('{"text": "lone surrogate \\ud800 here and padding padding padding"}\n')  # not UTF-8-encodable
    return {"code": code, "jsonl": jsonl, "texts": texts}


OPTS = {"min_file_bytes": 64, "max_file_bytes": 20_000, "val_permille": 200}


@pytest.fixture(scope="module")
def pipeline(src, tmp_path_factory) -> dict:
    """corpus -> tokenizer -> shards, through the CLI."""
    out = tmp_path_factory.mktemp("pipe")
    runner = CliRunner()

    def run(*args):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, (res.output, res.exception)
        return res

    run("data", "build", "--source", src["code"], "--source", src["jsonl"], "--out", out / "corpus",
        "--min-file-bytes", 64, "--max-file-bytes", 20_000, "--val-permille", 200, "--no-progress")
    run("tokenizer", "train", "--data", out / "corpus", "--out", out / "tok", "--vocab-size", 400, "--no-progress")
    run("data", "tokenize", "--data", out / "corpus", "--tokenizer", out / "tok", "--out", out / "tokens",
        "--shard-tokens", 7000, "--workers", 1, "--no-progress")
    return {"corpus": out / "corpus", "tok": out / "tok", "tokens": out / "tokens", "root": out}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- corpus build ---


def test_build_dedup_filters_stats_and_outputs(src, pipeline):
    corpus = pipeline["corpus"]
    stats = json.loads((corpus / "stats.json").read_text())
    assert stats["dropped"] == {"duplicate": 2, "too_small": 1, "too_large": 1, "not_utf8": 2, "bad_record": 2}
    # 90 generated + dup + tiny + huge + latin1 files, 14 JSONL lines; notes.txt and __pycache__ are not candidates.
    assert stats["files_seen"] == 94 + 14
    assert stats["files_kept"] == 90 + 10
    manifest = _jsonl(corpus / "manifest.jsonl")
    assert len(manifest) == stats["files_kept"]
    assert len({r["sha256"] for r in manifest}) == len(manifest)
    assert sum(r["bytes"] for r in manifest) == stats["bytes_kept"]
    by_sha = {r["sha256"]: r for r in manifest}
    for split in ("train", "val"):
        docs = _jsonl(corpus / f"{split}.jsonl")
        assert len(docs) == stats["splits"][split]["files"] > 0
        for d in docs:
            raw = d["text"].encode("utf-8")
            row = by_sha[hashlib.sha256(raw).hexdigest()]
            assert row["split"] == split and row["bytes"] == len(raw) and row["path"] == d["source"]
    kept_texts = {d["text"] for s in ("train", "val") for d in _jsonl(corpus / f"{s}.jsonl")}
    assert kept_texts >= set(src["texts"])
    assert stats["licences"]["CC0-1.0"]["files"] == 10  # licence carried by the JSONL records
    assert not [p for p in corpus.iterdir() if ".tmp" in p.name]


def test_split_is_by_content_hash_and_reproducible(src, pipeline, tmp_path):
    for row in _jsonl(pipeline["corpus"] / "manifest.jsonl"):
        assert row["split"] == ("val" if int(row["sha256"], 16) % 1000 < 200 else "train")
    # Sources given in the other order: same documents, same splits, same bytes.
    build_corpus([src["jsonl"], src["code"]], tmp_path / "again", BuildOptions(**OPTS))
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (pipeline["corpus"] / name).read_bytes()


def test_build_caps(src, tmp_path):
    s = build_corpus([src["code"]], tmp_path / "a", BuildOptions(**OPTS, max_files=7))
    assert s["files_kept"] == 7 and s["stopped_by"] == "max_files"
    s = build_corpus([src["code"]], tmp_path / "b", BuildOptions(**OPTS, max_bytes=10_000))
    sizes = [r["bytes"] for r in _jsonl(tmp_path / "b" / "manifest.jsonl")]
    assert s["stopped_by"] == "max_bytes" and sum(sizes) >= 10_000 and sum(sizes) - sizes[-1] < 10_000


def _fake_dist(site: Path, name: str, meta_lines: list[str]) -> Path:
    pkg = site / name
    pkg.mkdir(parents=True)
    (pkg / "core.py").write_text(f"# {name}\n" + "def f():\n    return 42\n" * 5)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("\n".join(["Metadata-Version: 2.4", f"Name: {name}", "Version: 1.0", *meta_lines])
                                   + "\n")
    (info / "RECORD").write_text(f"{name}/core.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    return pkg


def test_licences_from_distribution_metadata(tmp_path):
    import json as json_pkg

    import typer

    site = tmp_path / "site"
    expr = _fake_dist(site, "exprpkg", ["License-Expression: BSD-3-Clause", "License: ignored when expression"])
    clas = _fake_dist(site, "claspkg", ["License: " + "long licence text " * 10,  # not a licence name
                                        "Classifier: License :: OSI Approved :: MIT License"])
    srcs = [expr, clas, Path(typer.__file__).parent, Path(json_pkg.__file__).parent]
    build_corpus(srcs, tmp_path / "out", BuildOptions(min_file_bytes=1))
    lic = {}
    for row in _jsonl(tmp_path / "out" / "manifest.jsonl"):
        lic.setdefault(Path(row["path"]).parent.name, set()).add(row["licence"])
    assert lic["exprpkg"] == {"BSD-3-Clause"}
    assert lic["claspkg"] == {"MIT License"}
    assert lic["typer"] == {"MIT"}  # a real site-packages distribution
    assert lic["json"] == {"PSF-2.0"}  # the standard library
    dists = {Path(r["path"]).parent.name: r["distribution"] for r in _jsonl(tmp_path / "out" / "manifest.jsonl")}
    assert dists["exprpkg"] == "exprpkg" and dists["typer"] == "typer" and dists["json"] == "cpython"
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["licences"]["PSF-2.0"]["files"] == len(list(Path(json_pkg.__file__).parent.glob("*.py")))


# --- tokenizer ---


def test_tokenizer_roundtrip_and_hf_load(pipeline):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = Tokenizer.from_file(str(pipeline["tok"] / "tokenizer.json"))
    assert tok.get_vocab_size() == 400
    text = 'def café(x):\n\treturn  x ** 2  # ünïcode → 漢字 🙂\n\n\n'
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned
    hf = AutoTokenizer.from_pretrained(str(pipeline["tok"]))
    assert hf(text)["input_ids"] == ids
    assert hf.decode(ids) == text
    eos = tok.token_to_id(EOS)
    assert hf.eos_token == hf.bos_token == hf.pad_token == EOS
    assert hf.eos_token_id == hf.pad_token_id == eos
    assert tok.encode(f"a{EOS}b").ids[1] == eos  # the special token is atomic


def test_tokenizer_errors(pipeline, tmp_path):
    from moecoder.train.tok_train import train_tokenizer

    with pytest.raises(DataError, match="vocab size must be at least"):
        train_tokenizer(pipeline["corpus"], tmp_path / "t", vocab_size=100)
    with pytest.raises(DataError, match="corpus dir not found"):
        train_tokenizer(tmp_path / "nope", tmp_path / "t", vocab_size=300)


# --- shards ---


def test_shards_content_and_worker_determinism(pipeline):
    from tokenizers import Tokenizer

    index = read_index(pipeline["tokens"])
    tok = Tokenizer.from_file(str(pipeline["tok"] / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    assert index["dtype"] == "uint16" and index["eos_id"] == eos and index["vocab_size"] == 400
    assert index["tokenizer_sha256"] == hashlib.sha256((pipeline["tok"] / "tokenizer.json").read_bytes()).hexdigest()
    for split in ("train", "val"):
        info = index["splits"][split]
        shards = [np.fromfile(pipeline["tokens"] / s["file"], dtype="<u2") for s in info["shards"]]
        assert [len(s) for s in shards] == [s["tokens"] for s in info["shards"]]
        assert all(len(s) == 7000 for s in shards[:-1]) and 0 < len(shards[-1]) <= 7000
        expected = []
        for d in _jsonl(pipeline["corpus"] / f"{split}.jsonl"):
            expected += tok.encode(d["text"], add_special_tokens=False).ids + [eos]
        assert np.concatenate(shards).tolist() == expected
    assert len(index["splits"]["train"]["shards"]) >= 3

    out2 = pipeline["root"] / "tokens_w2"
    index2 = tokenize_corpus(pipeline["corpus"], pipeline["tok"], out2, workers=2, shard_tokens=7000)
    for split in ("train", "val"):
        assert index2["splits"][split] == index["splits"][split]
        for s in index["splits"][split]["shards"]:
            assert (out2 / s["file"]).read_bytes() == (pipeline["tokens"] / s["file"]).read_bytes()
    # Re-tokenising into the same folder with bigger shards leaves no stale shard behind.
    tokenize_corpus(pipeline["corpus"], pipeline["tok"], out2, workers=1, shard_tokens=10**9)
    assert sorted(p.name for p in out2.glob("*.bin")) == ["train_00000.bin", "val_00000.bin"]


# --- loader ---


def _stream(tokens_dir: Path, split: str) -> np.ndarray:
    index = read_index(tokens_dir)
    return np.concatenate([np.fromfile(tokens_dir / s["file"], dtype="<u2") for s in index["splits"][split]["shards"]])


def test_loader_epoch_covers_every_window_once(pipeline):
    T = 50
    stream = _stream(pipeline["tokens"], "train")
    ds = TokenWindows(pipeline["tokens"], split="train", seq_len=T, seed=3)
    assert ds.num_tokens == len(stream) and ds.num_windows == (len(stream) - 1) // T
    x, y = ds.next_batch(ds.num_windows)  # exactly one epoch
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (ds.num_windows, T)
    assert torch.equal(x[:, 1:], y[:, :-1])
    got = torch.cat([x, y[:, -1:]], 1).numpy()
    want = np.stack([stream[i * T:i * T + T + 1] for i in range(ds.num_windows)]).astype(np.int64)
    assert not np.array_equal(got, want)  # shuffled
    assert np.array_equal(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])])
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["position"] == 0


def test_loader_determinism_and_exact_resume(pipeline):
    def batches(ds, n, b):
        return [ds.next_batch(b) for _ in range(n)]

    a = TokenWindows(pipeline["tokens"], seq_len=16, seed=0)
    b = TokenWindows(pipeline["tokens"], seq_len=16, seed=0)
    c = TokenWindows(pipeline["tokens"], seq_len=16, seed=1)
    ra, rb, rc = batches(a, 3, 8), batches(b, 3, 8), batches(c, 3, 8)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(ra, rb))
    assert not torch.equal(ra[0][0], rc[0][0])

    # Resume mid-epoch and across the epoch boundary: a batch of 7 never divides num_windows evenly here.
    ds = TokenWindows(pipeline["tokens"], seq_len=16, seed=0)
    steps = ds.num_windows // 7 + 3
    for _ in range(steps - 5):
        ds.next_batch(7)
    state = json.loads(json.dumps(ds.state_dict()))
    ref = batches(ds, 10, 7)
    assert ds.state_dict()["epoch"] == 1
    resumed = TokenWindows(pipeline["tokens"], seq_len=16, seed=123)  # the state's seed wins
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(ref, batches(resumed, 10, 7)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(DataError, match="seq_len"):
        TokenWindows(pipeline["tokens"], seq_len=32).load_state_dict(state)


def test_rank_batches_union_equals_single_process_batch(pipeline):
    w, B = 3, 4
    single = TokenWindows(pipeline["tokens"], seq_len=24, seed=7)
    ranks = [TokenWindows(pipeline["tokens"], seq_len=24, seed=7, rank=r, world_size=w) for r in range(w)]
    for _ in range(single.num_windows // (B * w) + 2):  # runs past an epoch boundary
        xg, yg = single.next_batch(B * w)
        parts = [ds.next_batch(B) for ds in ranks]
        for r, (x, y) in enumerate(parts):
            assert torch.equal(x, xg[r::w]) and torch.equal(y, yg[r::w])
        assert all(ds.state_dict() == single.state_dict() for ds in ranks)


# --- errors ---


def test_clear_errors_for_missing_or_corrupt_data(pipeline, tmp_path):
    with pytest.raises(DataError, match="data dir not found"):
        TokenWindows(tmp_path / "missing")
    with pytest.raises(DataError, match="no index.json"):
        TokenWindows(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.json").write_text("{ truncated")
    with pytest.raises(DataError, match="corrupt index"):
        TokenWindows(bad)
    (bad / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="corrupt index.*format"):
        TokenWindows(bad)
    # A truncated shard is caught before any batch is served.
    index = read_index(pipeline["tokens"])
    (bad / "index.json").write_text(json.dumps(index))
    for s in index["splits"]["train"]["shards"] + index["splits"]["val"]["shards"]:
        (bad / s["file"]).write_bytes((pipeline["tokens"] / s["file"]).read_bytes())
    with open(bad / index["splits"]["train"]["shards"][0]["file"], "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="shard .* holds 100 bytes"):
        TokenWindows(bad)
    with pytest.raises(DataError, match="split 'test' not in"):
        TokenWindows(pipeline["tokens"], split="test")
    with pytest.raises(DataError, match="fewer than seq_len"):
        TokenWindows(pipeline["tokens"], split="val", seq_len=10**7)
    with pytest.raises(DataError, match="no train.jsonl"):
        tokenize_corpus(tmp_path, pipeline["tok"], tmp_path / "t")


def test_cli_reports_bad_input_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    res = subprocess.run([sys.executable, "-m", "moecoder", "data", "build", "--source", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: source not found: {tmp_path / 'nope'}"
