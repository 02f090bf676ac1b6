"""Corpus build: collect Python sources (or JSONL text), de-duplicate, filter, split, record licences.

`build_corpus(sources, out_dir)` writes, atomically:
    manifest.jsonl   one row per kept document: {path, sha256, bytes, licence, distribution, split}
                     (distribution: the installed package a file came from, "cpython" for the stdlib, else null)
    train.jsonl      {"text", "source"} per train document     (and val.jsonl likewise)
    stats.json       files seen/kept, dropped by reason, bytes per split, licence counts, options

Documents are visited in the order of sha256(relative path), not alphabetically, so a --max-bytes cap
yields a sample spread over every package rather than the packages whose names sort first.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

SPLITS = ("train", "val")
STDLIB_LICENCE = "PSF-2.0"
UNKNOWN_LICENCE = "unknown"
# Directories under the stdlib root that hold third-party code, never the stdlib itself.
_NOT_STDLIB_DIRS = frozenset({"site-packages", "dist-packages"})
_SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv"})


class DataError(ValueError):
    """Bad or missing training data (sources, corpus, shards, index); the message is one line for the user."""


@dataclass
class BuildOptions:
    min_file_bytes: int = 32  # drop near-empty files (__init__.py stubs)
    max_file_bytes: int = 1_000_000  # drop generated/vendored giants
    val_permille: int = 10  # documents with sha256 % 1000 < val_permille go to the val split
    max_files: int | None = None  # stop after this many kept documents
    max_bytes: int | None = None  # stop once this many bytes are kept (may overshoot by one document)


@dataclass
class _Item:
    """One candidate document: a file, or one line of a JSONL file."""

    order_key: str  # sha256 of the path relative to its source: the visiting order
    path: str  # what the manifest records
    licence: str
    distribution: str | None
    file: Path
    line_offset: int | None = None  # byte offset of the JSONL line; None for a source file


def default_sources() -> list[Path]:
    """The running interpreter's standard library and site-packages (purelib)."""
    paths = sysconfig.get_paths()
    out = [Path(paths["stdlib"]), Path(paths["purelib"])]
    return [p for p in out if p.is_dir()]


def split_of(sha256_hex: str, val_permille: int) -> str:
    """Deterministic split by content hash: the same text lands in the same split on every machine."""
    return "val" if int(sha256_hex, 16) % 1000 < val_permille else "train"


# --- licences ---


def _licence_from_metadata(meta) -> str | None:
    """One licence string from a distribution's metadata: License-Expression, else a short License, else classifiers."""
    expr = meta.get("License-Expression")
    if expr and expr.strip():
        return expr.strip()
    lic = meta.get("License")
    # Some packages paste the whole licence text into License; only a one-line value names a licence.
    if lic and lic.strip() and "\n" not in lic.strip() and len(lic.strip()) <= 80 and lic.strip().upper() != "UNKNOWN":
        return lic.strip()
    classifiers = [c.split("::")[-1].strip() for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
    classifiers = [c for c in classifiers if c and c != "OSI Approved"]
    if classifiers:
        return " OR ".join(sorted(set(classifiers)))
    return None


class LicenceIndex:
    """Maps a source file to the licence its installed distribution declares (via importlib.metadata RECORDs)."""

    def __init__(self, search_paths: list[Path]):
        import importlib.metadata as md

        self._by_file: dict[str, tuple[str, str]] = {}
        seen_dists: set[str] = set()
        for dist in md.distributions(path=[str(p) for p in search_paths]):
            name = dist.metadata.get("Name") or "?"
            key = f"{name}@{dist.locate_file('')}"
            if key in seen_dists:
                continue
            seen_dists.add(key)
            licence = _licence_from_metadata(dist.metadata) or UNKNOWN_LICENCE
            for f in dist.files or ():
                if f.suffix == ".py":
                    self._by_file.setdefault(os.path.realpath(dist.locate_file(f)), (name, licence))
        stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
        self._stdlib = stdlib + os.sep

    def lookup(self, path: Path) -> tuple[str, str | None]:
        """(licence, distribution name) of a file; ("unknown", None) when no installed package claims it."""
        real = os.path.realpath(path)
        hit = self._by_file.get(real)
        if hit is not None:
            return hit[1], hit[0]
        if real.startswith(self._stdlib) and not (set(Path(real).parts) & _NOT_STDLIB_DIRS):
            return STDLIB_LICENCE, "cpython"
        return UNKNOWN_LICENCE, None


# --- candidate enumeration ---


def _walk_py(root: Path, skip_dirs: frozenset[str]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                p = Path(dirpath) / name
                if p.is_file():
                    yield p


def _hash_str(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()


def _enumerate(sources: list[Path], licences: LicenceIndex) -> list[_Item]:
    items: list[_Item] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    for src in sources:
        if src.is_dir():
            skip = _SKIP_DIRS | (_NOT_STDLIB_DIRS if src.resolve() == stdlib else frozenset())
            for p in _walk_py(src, skip):
                rel = p.relative_to(src).as_posix()
                items.append(_Item(_hash_str(f"{src.name}/{rel}"), str(p), *licences.lookup(p), p))
        elif src.is_file() and src.suffix == ".jsonl":
            offset = 0
            with open(src, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        items.append(_Item(_hash_str(f"{src.name}:{lineno}"), f"{src}:{lineno}", UNKNOWN_LICENCE,
                                           None, src, offset))
                    offset += len(line)
        elif not src.exists():
            raise DataError(f"source not found: {src}")
        else:
            raise DataError(f"source is neither a directory nor a .jsonl file: {src}")
    # Ties (same relative path in two sources) keep source order: sort is stable.
    items.sort(key=lambda it: it.order_key)
    return items


def _read(item: _Item, max_file_bytes: int) -> tuple[bytes | None, str | None, str]:
    """(raw bytes, drop reason, licence) for one candidate; the licence may come from a JSONL record."""
    if item.line_offset is None:
        try:
            size = item.file.stat().st_size
            if size > max_file_bytes:
                return None, "too_large", item.licence
            return item.file.read_bytes(), None, item.licence
        except OSError:
            return None, "unreadable", item.licence
    with open(item.file, "rb") as f:
        f.seek(item.line_offset)
        line = f.readline()
    try:
        rec = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "bad_record", item.licence
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        return None, "bad_record", item.licence
    lic = rec.get("licence", rec.get("license"))
    lic = lic if isinstance(lic, str) and lic else item.licence
    try:
        return rec["text"].encode("utf-8"), None, lic
    except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
        return None, "not_utf8", lic


# --- atomic output ---


class _AtomicText:
    """A text file written under a temporary name and moved into place only on commit()."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        self.f = open(self.tmp, "w", encoding="utf-8", newline="\n")  # noqa: SIM115  (closed by commit/abort)

    def write_json(self, obj) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj) -> None:
    """Write `obj` as pretty JSON via a temporary file and os.replace, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- build ---


def build_corpus(sources: list[Path] | None, out_dir: Path, options: BuildOptions | None = None,
                 progress: bool = False) -> dict:
    """Build the corpus from `sources` (dirs of *.py and/or .jsonl files; None: stdlib + site-packages).

    Returns the stats dict that is also written to out_dir/stats.json.
    """
    opts = options or BuildOptions()
    if opts.min_file_bytes < 0 or opts.max_file_bytes < opts.min_file_bytes:
        raise DataError(f"bad size filter: min_file_bytes={opts.min_file_bytes} max_file_bytes={opts.max_file_bytes}")
    if not 0 <= opts.val_permille <= 1000:
        raise DataError(f"val_permille must be in [0, 1000], got {opts.val_permille}")
    t0 = time.perf_counter()
    srcs = [Path(s) for s in sources] if sources else default_sources()
    if not srcs:
        raise DataError("no sources given and no stdlib/site-packages found")
    licences = LicenceIndex(_licence_search_paths(srcs))
    items = _enumerate(srcs, licences)

    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {"manifest": _AtomicText(out_dir / "manifest.jsonl")}
    writers.update({s: _AtomicText(out_dir / f"{s}.jsonl") for s in SPLITS})
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    licence_files: Counter[str] = Counter()
    licence_bytes: Counter[str] = Counter()
    split_files: Counter[str] = Counter()
    split_bytes: Counter[str] = Counter()
    kept = kept_bytes = visited = 0
    stopped_by = None
    bar = _progress_bar(len(items)) if progress else None
    try:
        for item in items:
            if opts.max_files is not None and kept >= opts.max_files:
                stopped_by = "max_files"
                break
            if opts.max_bytes is not None and kept_bytes >= opts.max_bytes:
                stopped_by = "max_bytes"
                break
            visited += 1
            if bar is not None:
                bar.advance(1, kept_bytes)
            raw, reason, lic = _read(item, opts.max_file_bytes)
            if reason is None:
                reason = _filter(raw, opts)
            if reason is not None:
                dropped[reason] += 1
                continue
            digest = hashlib.sha256(raw).hexdigest()
            if digest in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(digest)
            split = split_of(digest, opts.val_permille)
            n = len(raw)
            writers["manifest"].write_json({"path": item.path, "sha256": digest, "bytes": n, "licence": lic,
                                            "distribution": item.distribution, "split": split})
            writers[split].write_json({"text": raw.decode("utf-8"), "source": item.path})
            kept += 1
            kept_bytes += n
            split_files[split] += 1
            split_bytes[split] += n
            licence_files[lic] += 1
            licence_bytes[lic] += n
        for w in writers.values():
            w.commit()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if bar is not None:
            bar.close()

    stats = {
        "sources": [str(s) for s in srcs],
        "options": asdict(opts),
        "files_seen": len(items),
        "files_visited": visited,
        "files_kept": kept,
        "bytes_kept": kept_bytes,
        "stopped_by": stopped_by,
        "dropped": dict(sorted(dropped.items())),
        "splits": {s: {"files": split_files[s], "bytes": split_bytes[s]} for s in SPLITS},
        "licences": {k: {"files": licence_files[k], "bytes": licence_bytes[k]} for k in sorted(licence_files)},
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(out_dir / "stats.json", stats)
    return stats


def _licence_search_paths(srcs: list[Path]) -> list[Path]:
    """Folders whose installed distributions can own a source file: those above or below a source.

    Reading every RECORD on sys.path costs seconds; distributions elsewhere cannot claim these files anyway.
    """
    resolved = [s.resolve() for s in srcs]
    out = []
    for p in dict.fromkeys([*map(Path, sys.path), *srcs, *(s.parent for s in srcs)]):
        r = p.resolve()
        if r.is_dir() and any(s.is_relative_to(r) or r.is_relative_to(s) for s in resolved):
            out.append(p)
    return out


def _filter(raw: bytes, opts: BuildOptions) -> str | None:
    if len(raw) < opts.min_file_bytes:
        return "too_small"
    if len(raw) > opts.max_file_bytes:
        return "too_large"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8"
    return None


def split_file(corpus_dir: Path, split: str = "train") -> Path:
    """corpus_dir/<split>.jsonl, with a clear error when the corpus or the split is missing."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise DataError(f"corpus dir not found: {corpus_dir}")
    path = corpus_dir / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"no {split}.jsonl in {corpus_dir} (run `moecoder data build` first)")
    return path


def iter_texts(path: Path) -> Iterator[str]:
    """Yield the texts of a corpus split file (see split_file), in file order."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"corrupt corpus line {path}:{lineno}") from None


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


class _progress_bar:
    """A rich progress bar over candidate files, showing kept bytes; kept out of the loop body for readability."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("corpus"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[mb]} MB kept"),
                           TimeElapsedColumn(), transient=False)
        self._task = self._p.add_task("files", total=total, mb="0.0")
        self._p.start()

    def advance(self, n: int, kept_bytes: int) -> None:
        self._p.update(self._task, advance=n, mb=f"{kept_bytes / 1e6:.1f}")

    def close(self) -> None:
        self._p.stop()
