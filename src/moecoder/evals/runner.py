"""Resumable evaluation runs: generate -> extract -> evaluate, one JSONL line per finished sample.

A run directory holds:
  run.json       metadata (versions, dataset sha256, template, sampling, sandbox tier, host, state)
  samples.jsonl  one record per finished sample, appended and flushed as it finishes
  spend.jsonl    one line per paid request (the spending cap survives restarts)
  cache/gen/     generations by key; cache/verdict/ verdicts by (task, code) -- content-addressed

A sample's key hashes the backend, model, template, sampling parameters, the rendered prompt and
the sample index, so re-running the same command skips everything already finished and a
changed setting can never reuse a stale answer. Samples that ended `infra` are retried.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moecoder.evals.backends.base import Backend, Generation, Sampling
from moecoder.evals.extract import UnsafePath, extract_code, extract_files, parses
from moecoder.evals.prices import PriceTable, local_cost
from moecoder.evals.templates import Template
from moecoder.evals.types import Prompt, Status, Task, Verdict
from moecoder.hashing import sha256_file


class RunError(ValueError):
    """The run cannot start or continue as asked (one-line message for the CLI)."""


@dataclass
class RunConfig:
    suite: str
    out_dir: Path
    template: Template
    sampling: Sampling = field(default_factory=Sampling)
    samples: int = 1  # samples per task (pass@k needs k <= samples)
    limit: int | None = None  # first N tasks only
    concurrency: int = 4
    max_usd: float | None = None  # spending cap; None = no cap
    usd_per_hour: float | None = None  # local backends: cost = time x this
    generate_only: bool = False  # stage 1 only: fill the generation cache, execute nothing
    data_path: str | None = None
    sandbox_tier: str | None = None


@dataclass
class RunResult:
    state: str  # "complete" | "generated" | "stopped: spending cap" | "interrupted"
    new_samples: int
    cached_generations: int
    requests: int
    spent_usd: float
    records: list[dict[str, Any]]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode())


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSONL file; a torn last line (the process died mid-write) is ignored."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def load_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Finished samples of a run; when a key appears twice (a retried infra sample, a SWE-bench
    grade), the later line wins."""
    latest: dict[str, dict[str, Any]] = {}
    for r in read_jsonl(Path(run_dir) / "samples.jsonl"):
        latest.pop(r["key"], None)  # re-insert so the order follows the latest write
        latest[r["key"]] = r
    return list(latest.values())


def load_run(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir) / "run.json"
    if not p.exists():
        raise RunError(f"{run_dir} is not a run directory (no run.json)")
    return json.loads(p.read_text())


@dataclass
class _Item:
    task: Task
    index: int
    prompt: Prompt
    task_hash: str
    key: str


class Runner:
    """Runs one suite on one backend into `config.out_dir`; safe to re-run to resume."""

    def __init__(
        self,
        config: RunConfig,
        backend: Backend,
        tasks: Sequence[Task],
        sandbox: Any = None,
        prices: PriceTable | None = None,
        finalize: Callable[[Path, list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.cfg = config
        self.backend = backend
        self.tasks = list(tasks)[: config.limit] if config.limit is not None else list(tasks)
        self.sandbox = sandbox
        self.finalize = finalize  # batch grading after generation (SWE-bench)
        self.on_record = on_record  # progress display
        self.dir = Path(config.out_dir)
        self.price = None
        if not backend.priced_by_time:
            self.price = (prices or PriceTable.load()).get(backend.model)
        self.usd_per_hour = config.usd_per_hour
        if self.usd_per_hour is None and backend.priced_by_time and prices is not None:
            self.usd_per_hour = prices.usd_per_hour
        if config.max_usd is not None and self.price is None and self.usd_per_hour is None:
            raise RunError(
                f"--max-usd needs a price for model {backend.model!r}: add it to a prices file (--prices)"
                + (" or pass --usd-per-hour" if backend.priced_by_time else "")
            )
        if config.samples < 1 or config.concurrency < 1:
            raise RunError("--samples and --concurrency must be at least 1")

    # --- keys and costs ---

    def _identity(self) -> dict[str, Any]:
        """What makes two runs comparable; a run directory only ever holds one identity."""
        return {
            "suite": self.cfg.suite,
            "backend": self.backend.name,
            "model": self.backend.model,
            "template": self.cfg.template.id,
            "sampling": self.cfg.sampling.to_dict(),
        }

    def _items(self) -> list[_Item]:
        ident = self._identity()
        items = []
        for task in self.tasks:
            prompt = self.cfg.template.render(task)
            task_hash = _hash({"suite": task.suite, "task_id": task.task_id, "text": prompt.text,
                               "messages": prompt.messages, "stop": prompt.stop, "template": prompt.template_id})
            for i in range(self.cfg.samples):
                items.append(_Item(task, i, prompt, task_hash, _hash({**ident, "task": task_hash, "sample": i})))
        return items

    def _sampling(self, it: _Item) -> Sampling:
        # Each sample of a task gets its own seed, or n seeded samples would be one sample n times.
        s = self.cfg.sampling
        return s if s.seed is None else replace(s, seed=s.seed + it.index)

    def _cost(self, gen: Generation) -> float | None:
        if gen.error:
            return 0.0  # failed requests are not billed
        if self.backend.priced_by_time:
            return local_cost(gen.latency_s, self.usd_per_hour) if self.usd_per_hour is not None else None
        return self.price.cost(gen.input_tokens, gen.output_tokens) if self.price else None

    # --- the run ---

    def run(self) -> RunResult:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "cache" / "gen").mkdir(parents=True, exist_ok=True)
        (self.dir / "cache" / "verdict").mkdir(parents=True, exist_ok=True)
        items = self._items()
        meta = self._start_metadata(items)
        for log in ("samples.jsonl", "spend.jsonl"):
            _end_with_newline(self.dir / log)
        done = {r["key"] for r in load_records(self.dir) if r["status"] != Status.INFRA.value}
        pending = [it for it in items if it.key not in done]
        spent = sum(e["usd"] for e in read_jsonl(self.dir / "spend.jsonl"))
        state = "generated" if self.cfg.generate_only else "complete"
        stats = {"new": 0, "cached": 0, "requests": 0}

        # Cached generations need no request: finish them first, without touching the backend.
        fresh: list[_Item] = []
        for it in pending:
            gen = self._cached_generation(it)
            if gen is None:
                fresh.append(it)
            else:
                stats["cached"] += 1
                if not self.cfg.generate_only:
                    self._finish(it, gen)
                    stats["new"] += 1

        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="gen")
        inflight: dict[Future, _Item] = {}
        queue = list(reversed(fresh))

        def top_up() -> bool:
            """Submit requests up to the concurrency bound unless the cap is reached; False when capped."""
            if self.cfg.max_usd is not None and spent >= self.cfg.max_usd:
                return False
            while queue and len(inflight) < self.cfg.concurrency:
                it = queue.pop()
                inflight[pool.submit(self.backend.generate, it.prompt, self._sampling(it))] = it
            return True

        def collect(it: _Item, fut: Future) -> Generation:
            """Account for one finished request: spend ledger, generation cache."""
            nonlocal spent
            gen = fut.result()  # BackendError (bad key, ...) propagates and stops the run
            stats["requests"] += 1
            cost = self._cost(gen)
            if cost:
                spent += cost
                self._append(self.dir / "spend.jsonl", {"key": it.key, "usd": cost})
            if not gen.error:
                write_json_atomic(self._gen_path(it), gen.to_dict())
            return gen

        try:
            while queue or inflight:
                if not top_up() and queue:
                    state = "stopped: spending cap"
                if not inflight:
                    break
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                judge: list[tuple[_Item, Generation]] = []
                for fut in finished:
                    it = inflight.pop(fut)
                    gen = collect(it, fut)
                    if not self.cfg.generate_only or gen.error:
                        judge.append((it, gen))
                # Keep the backend busy while this thread runs the (possibly slow) sandboxed checks.
                if not top_up() and queue:
                    state = "stopped: spending cap"
                for it, gen in judge:
                    self._finish(it, gen)
                    stats["new"] += 1
        except KeyboardInterrupt:
            # Requests already sent are paid for: wait for them (bounded by the backend's timeout and
            # retries; a second Ctrl-C abandons them) and cache the answers for the resumed run.
            state = "interrupted"
            queue.clear()
            for fut, it in list(inflight.items()):
                if fut.cancel():
                    continue
                with contextlib.suppress(Exception):  # best effort while stopping; the run resumes anyway
                    collect(it, fut)
            raise
        except Exception as e:
            state = f"failed: {e}"
            raise
        finally:
            pool.shutdown(wait=not state.startswith(("interrupted", "failed")), cancel_futures=True)
            records = load_records(self.dir)
            if self.finalize is not None and state == "complete":
                records = self.finalize(self.dir, records)
            meta.update(state=state, finished_at=_now(), spent_usd=spent)
            write_json_atomic(self.dir / "run.json", meta)
        return RunResult(state, stats["new"], stats["cached"], stats["requests"], spent, records)

    def _start_metadata(self, items: list[_Item]) -> dict[str, Any]:
        path = self.dir / "run.json"
        ident = self._identity()
        old: dict[str, Any] = {}
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("identity") != ident:
                diff = sorted(k for k in ident if old.get("identity", {}).get(k) != ident[k])
                raise RunError(f"{self.dir} holds a run with other settings ({', '.join(diff)}); choose another --out")
        meta = {
            "identity": ident,
            "backend": self.backend.describe(),
            "template_id": self.cfg.template.id,
            "sampling": self.cfg.sampling.to_dict(),
            "samples_per_task": self.cfg.samples,
            "limit": self.cfg.limit,
            "tasks": len(self.tasks),
            "task_ids_sha256": _hash([it.task_hash for it in items]),
            "dataset_path": self.cfg.data_path,
            "dataset_sha256": sha256_file(self.cfg.data_path) if self.cfg.data_path else None,
            "sandbox_tier": self.cfg.sandbox_tier,
            "concurrency": self.cfg.concurrency,
            "max_usd": self.cfg.max_usd,
            "usd_per_hour": self.usd_per_hour,
            "price_per_1m_output": self.price.output_per_1m if self.price else None,
            "price_per_1m_input": self.price.input_per_1m if self.price else None,
            "versions": _versions(),
            "host": {"node": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()},
            "started_at": old.get("started_at", _now()),
            "invocations": old.get("invocations", 0) + 1,  # > 1: the run was resumed
            "state": "running",
        }
        write_json_atomic(path, meta)
        return meta

    def _gen_path(self, it: _Item) -> Path:
        return self.dir / "cache" / "gen" / f"{it.key}.json"

    def _cached_generation(self, it: _Item) -> Generation | None:
        p = self._gen_path(it)
        if not p.exists():
            return None
        try:
            return Generation.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None  # unreadable cache entry: generate again

    def _append(self, path: Path, obj: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # --- evaluate one generation ---

    def _finish(self, it: _Item, gen: Generation) -> None:
        extracted, verdict = self._judge(it, gen)
        rec = {
            "key": it.key,
            "task_id": it.task.task_id,
            "suite": it.task.suite,
            "kind": it.task.kind,
            "sample": it.index,
            "model": self.backend.model,
            "template_id": it.prompt.template_id,
            **{k: v for k, v in verdict.to_dict().items()},
            "latency_s": None if gen.error else gen.latency_s,
            "ttft_s": gen.ttft_s,
            "input_tokens": gen.input_tokens,
            "output_tokens": gen.output_tokens,
            "tokens_estimated": gen.tokens_estimated,
            "attempts": gen.attempts,
            "cost_usd": self._cost(gen),
            "error": gen.error,
            "raw": gen.text,
            "extracted": extracted,
        }
        self._append(self.dir / "samples.jsonl", rec)
        if self.on_record is not None:
            self.on_record(rec)

    def _judge(self, it: _Item, gen: Generation) -> tuple[Any, Verdict]:
        if gen.error:
            return None, Verdict(Status.INFRA, syntax_ok=False, detail=gen.error[:300])
        answer, text = self.cfg.template.answer, gen.text
        if answer == "continuation":  # the prompt says what its continuation makes; code is taken as it is
            answer, text = it.prompt.continues, it.prompt.program(gen.text)
            answer = "program" if answer == "code" else answer
        extracted: Any
        if answer == "program":
            extracted = text
        elif answer == "files":
            try:
                extracted = extract_files(text) or None
            except UnsafePath as e:
                return None, Verdict(Status.EXTRACT, syntax_ok=False, detail=str(e))
        elif answer == "diff":
            from moecoder.evals.swebench import extract_patch

            extracted = extract_patch(text)
        else:
            extracted = extract_code(text, getattr(it.task, "entry_point", None))
        if not extracted:
            return None, Verdict(Status.EXTRACT, syntax_ok=False, detail="no code found in the answer")
        if isinstance(extracted, str) and answer != "diff" and not parses(extracted):
            return extracted, Verdict(Status.SYNTAX, syntax_ok=False, detail="extracted code does not parse")
        vkey = _hash({"task": it.task_hash, "code": extracted})
        vpath = self.dir / "cache" / "verdict" / f"{vkey}.json"
        if vpath.exists():
            d = json.loads(vpath.read_text())
            return extracted, Verdict(**{**d, "status": Status(d["status"])})
        verdict = it.task.evaluate(extracted, self.sandbox)
        write_json_atomic(vpath, verdict.to_dict())
        return extracted, verdict


def _end_with_newline(path: Path) -> None:
    """A process killed mid-append leaves a torn last line; start the next append on a fresh line
    so only the torn record is lost (read_jsonl skips it), not the next one too."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("moecoder", "httpx", "torch", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
