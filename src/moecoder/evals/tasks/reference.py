"""Run reference (canonical) solutions in a plain subprocess: time limits and HumanEval+ expected outputs.

Reference code and tests are trusted dataset content, so this is an ordinary subprocess, not the sandbox;
it still runs apart from the harness so a slow or crashing reference cannot take the harness down.
Results are cached per suite, data checksum and host, because timings are a property of this machine.

Time limit of a task = FLOOR_S + FACTOR * reference seconds + PER_CALL_S * calls (EvalPlus uses a floor
of 1 s and a factor of 4; the floor here is larger because the sandbox also starts an interpreter).

Run as `python -m moecoder.evals.tasks.reference OUT_JSON < jobs.json` (internal).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FLOOR_S = 2.0
FACTOR = 4.0
PER_CALL_S = 0.002
JOB_TIMEOUT_S = 120.0
CACHE_VERSION = 2
DIGEST_OVER = 1 << 16  # outputs whose canonical encoding is larger are compared by sha256


def cache_dir() -> Path:
    return Path(os.environ.get("MOECODER_CACHE_DIR", Path.home() / ".cache" / "moecoder")) / "evals"


def time_limit(seconds: float, n_calls: int) -> float:
    return FLOOR_S + FACTOR * seconds + PER_CALL_S * n_calls


class SuiteReference:
    """Reference results for one suite, computed once (lazily, thread-safe) and cached on disk.

    Each job is {"task_id", "mode": "check"|"outputs"|"asserts", "program", ...}; see `_run_job`."""

    def __init__(self, suite: str, data_sha256: str, jobs: list[dict]) -> None:
        self.suite, self.data_sha256, self.jobs = suite, data_sha256, jobs
        self._results: dict[str, dict] | None = None
        self._lock = threading.Lock()

    @property
    def cache_path(self) -> Path:
        host = hashlib.sha256(f"{platform.node()}|{sys.version}".encode()).hexdigest()[:10]
        return cache_dir() / f"reference-{self.suite}-{self.data_sha256[:16]}-{host}.json"

    def get(self, task_id: str) -> dict:
        with self._lock:
            if self._results is None:
                self._results = self._load_or_compute()
        return self._results[task_id]

    def _load_or_compute(self) -> dict[str, dict]:
        path = self.cache_path
        want = {j["task_id"] for j in self.jobs}
        try:
            cached = json.loads(path.read_text())
            if cached.get("version") == CACHE_VERSION and want <= cached["results"].keys():
                return cached["results"]
        except (OSError, ValueError, KeyError):
            pass
        results = run_jobs(self.jobs)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "suite": self.suite, "results": results}, f)
        os.replace(tmp, path)
        return results


def run_jobs(jobs: list[dict], workers: int = 2) -> dict[str, dict]:
    """Run jobs in `workers` plain subprocesses; returns {task_id: result}."""
    chunks = [jobs[i::workers] for i in range(workers) if jobs[i::workers]]

    def run_chunk(chunk: list[dict]) -> dict[str, dict]:
        with tempfile.TemporaryDirectory(prefix="moecoder-ref-") as tmp:
            out = os.path.join(tmp, "out.json")
            proc = subprocess.run([sys.executable, "-m", "moecoder.evals.tasks.reference", out],
                                  input=json.dumps(chunk).encode(), capture_output=True, cwd=tmp,
                                  timeout=JOB_TIMEOUT_S * len(chunk) + 60, check=False)
            if not os.path.exists(out):
                raise RuntimeError(f"reference runner failed (exit {proc.returncode}): {proc.stderr[-500:]!r}")
            with open(out) as f:
                return json.load(f)

    results: dict[str, dict] = {}
    with ThreadPoolExecutor(len(chunks)) as pool:
        for part in pool.map(run_chunk, chunks):
            results.update(part)
    return results


# ---------------------------------------------------------------- subprocess side

class _JobTimeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _JobTimeout()


def _run_job(job: dict) -> dict:
    from moecoder.evals.sandbox._codec import CodecError, to_tagged

    ns: dict = {"__name__": "__reference__"}
    exec(compile(job["program"], f"<reference {job['task_id']}>", "exec"), ns)  # noqa: S102 - trusted data
    mode = job["mode"]
    t0 = time.perf_counter()
    if mode == "check":  # HumanEval: the dataset's check(candidate) against the canonical function
        exec(compile(job["test"], "<test>", "exec"), ns)  # noqa: S102
        ns["check"](ns[job["entry_point"]])
        return {"ok": True, "seconds": time.perf_counter() - t0}
    if mode == "asserts":  # MBPP: each assert line in the module's namespace
        exec(job.get("setup", ""), ns)  # noqa: S102
        for line in job["asserts"]:
            exec(line, ns)  # noqa: S102
        return {"ok": True, "seconds": time.perf_counter() - t0}
    if mode == "outputs":  # HumanEval+: expected output per input (tagged), or the error it raised
        import copy

        from moecoder.evals.sandbox._codec import canonical

        fn = ns[job["entry_point"]]
        expected, seconds = [], 0.0
        for args in job["inputs"]:
            try:
                args = copy.deepcopy(args)
                t1 = time.perf_counter()
                out = fn(*args)
                canon = canonical(out)  # timed too: the sandbox side encodes every output the same way
                seconds += time.perf_counter() - t1
                if len(canon) > DIGEST_OVER:
                    expected.append({"h": hashlib.sha256(canon).hexdigest()})
                else:
                    expected.append({"v": to_tagged(out)})
            except (Exception, CodecError) as e:  # noqa: BLE001
                expected.append({"e": f"{type(e).__name__}: {str(e)[:200]}"})
        return {"ok": True, "seconds": seconds, "expected": expected}
    raise ValueError(f"unknown reference mode {mode!r}")


def _main(out_path: str) -> None:
    jobs = json.loads(sys.stdin.buffer.read())
    sys.setrecursionlimit(10000)
    signal.signal(signal.SIGALRM, _on_alarm)
    results = {}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # reference code may print
        _run_all(jobs, results)
    with open(out_path, "w") as f:
        json.dump(results, f)


def _run_all(jobs: list[dict], results: dict) -> None:
    for job in jobs:
        signal.setitimer(signal.ITIMER_REAL, JOB_TIMEOUT_S)
        try:
            results[job["task_id"]] = _run_job(job)
        except _JobTimeout:
            results[job["task_id"]] = {"ok": False, "seconds": JOB_TIMEOUT_S, "error": "reference timed out"}
        except BaseException as e:  # noqa: BLE001
            results[job["task_id"]] = {"ok": False, "seconds": 0.0, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


if __name__ == "__main__":
    _main(sys.argv[1])
