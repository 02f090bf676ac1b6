"""Metrics: unbiased pass@k, confidence intervals, percentiles, and per-group aggregates of samples.

Sample records are the dicts the runner writes to samples.jsonl. Samples with status `infra`
(generation failed after retries) or `skipped` (not graded, e.g. SWE-bench without Docker) are
not the model's answers, so they are left out of every accuracy figure and counted separately.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

NOT_SCORED = {"infra", "skipped"}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021) unbiased estimator: 1 - C(n-c, k) / C(n, k), for n samples with c correct."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # The product form avoids huge binomials: C(n-c,k)/C(n,k) = prod_{i=n-c+1..n} (1 - k/i).
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def wilson_ci(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default). n == 0 gives (0, 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 (or 1) the exact bound is 0 (or 1); floating point leaves a ~1e-17 residue otherwise.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def bootstrap_mean_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0):
    """Percentile-bootstrap interval for a mean; seeded, so a report is reproducible byte for byte."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    if x.size == 1 or np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    a = (1 - level) / 2
    return (float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy's default); None for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def sample_score(r: dict[str, Any]) -> float:
    """Logical correctness of one sample: fraction of its checks passed (pass/fail when it has none)."""
    if r.get("checks_total"):
        return r["checks_passed"] / r["checks_total"]
    return 1.0 if r["status"] == "pass" else 0.0


def summarize(records: Iterable[dict[str, Any]], ks: Sequence[int] = (1, 10)) -> dict[str, Any]:
    """Aggregate figures for one group of samples (a suite, a workflow, a task kind)."""
    records = list(records)
    scored = [r for r in records if r["status"] not in NOT_SCORED]
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in scored:
        by_task[r["task_id"]].append(r)
    n_per_task = [len(v) for v in by_task.values()]
    passes = sum(r["status"] == "pass" for r in scored)
    syntax = sum(bool(r["syntax_ok"]) for r in scored)
    scores = [sample_score(r) for r in scored]

    pass_k: dict[str, float] = {}
    for k in ks:
        if n_per_task and min(n_per_task) >= k:
            vals = [pass_at_k(len(v), sum(r["status"] == "pass" for r in v), k) for v in by_task.values()]
            pass_k[f"pass@{k}"] = float(np.mean(vals))

    answered = [r for r in records if r["status"] != "infra" and r.get("latency_s") is not None]
    lat = [r["latency_s"] for r in answered]
    ttft = [r["ttft_s"] for r in answered if r.get("ttft_s") is not None]
    out_tok = sum(r.get("output_tokens") or 0 for r in records)
    in_tok = sum(r.get("input_tokens") or 0 for r in records)
    costs = [r.get("cost_usd") for r in records]
    cost = None if not records or any(c is None for c in costs) else float(sum(costs))
    solved = sum(any(r["status"] == "pass" for r in v) for v in by_task.values())
    return {
        "tasks": len({r["task_id"] for r in records}),
        "samples": len(records),
        "scored": len(scored),
        "status_counts": dict(sorted(Counter(r["status"] for r in records).items())),
        "pass_rate": passes / len(scored) if scored else None,
        "pass_rate_ci": wilson_ci(passes, len(scored)) if scored else None,
        **pass_k,
        "syntax_accuracy": syntax / len(scored) if scored else None,
        "syntax_accuracy_ci": wilson_ci(syntax, len(scored)) if scored else None,
        "logical_correctness": float(np.mean(scores)) if scores else None,
        "logical_correctness_ci": bootstrap_mean_ci(scores) if scores else None,
        "latency_mean_s": float(np.mean(lat)) if lat else None,
        "latency_p50_s": percentile(lat, 50),
        "latency_p95_s": percentile(lat, 95),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "tokens_estimated": any(r.get("tokens_estimated") for r in records),
        "cost_usd": cost,
        "usd_per_1m_output_tokens": cost / out_tok * 1e6 if cost is not None and out_tok else None,
        "solved_tasks": solved,
        "usd_per_solved_task": cost / solved if cost is not None and solved else None,
    }
