"""Reports from run directories: Markdown tables shaped like the review's, and HTML with plots.

Tables are built once as (title, header, rows) and rendered to either format, so the Markdown
and the HTML can never disagree. Plots are matplotlib PNGs embedded as base64 (one HTML file
that can be mailed around).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecoder.evals.metrics import summarize
from moecoder.evals.runner import load_records, load_run

# The review's published table (REVIEW-FACTS.md): pass@1 / resolved rates and $ per 1M output tokens.
REVIEW_MODELS = [
    ("MiniMax M2.7", {"humaneval": 0.823, "mbpp": 0.781, "swebench-lite": 0.332}, 2.50),
    ("GPT-4o", {"humaneval": 0.902, "mbpp": 0.873, "swebench-lite": 0.485}, 15.00),
    ("Claude 3.5 Sonnet", {"humaneval": 0.895, "mbpp": 0.850, "swebench-lite": 0.450}, 15.00),
    ("DeepSeek Coder V2", {"humaneval": 0.850, "mbpp": 0.805, "swebench-lite": 0.380}, 0.50),
]

SUITE_COLUMNS = [("humaneval", "HumanEval pass@1"), ("humaneval+", "HumanEval+ pass@1"), ("mbpp", "MBPP pass@1"),
                 ("swebench-lite", "SWE-bench Lite")]


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class RunSummary:
    run_dir: Path
    meta: dict[str, Any]
    records: list[dict[str, Any]]
    overall: dict[str, Any]
    by_task: dict[str, dict[str, Any]]
    swebench: dict[str, Any] | None

    @property
    def model(self) -> str:
        return self.meta["identity"]["model"]

    @property
    def suite(self) -> str:
        return self.meta["identity"]["suite"]


def load_summary(run_dir: str | Path) -> RunSummary:
    """Read one run directory and aggregate it."""
    run_dir = Path(run_dir)
    meta = load_run(run_dir)
    records = load_records(run_dir)
    n = meta.get("samples_per_task", 1)
    ks = sorted({1, n} | ({10} if n >= 10 else set()))
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["task_id"]].append(r)
    swe = run_dir / "swebench.json"
    return RunSummary(
        run_dir, meta, records, summarize(records, ks), {t: summarize(v, ks) for t, v in groups.items()},
        json.loads(swe.read_text()) if swe.exists() else None,
    )


# --- formatting ---


def pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def pct_ci(x: float | None, ci: tuple[float, float] | None) -> str:
    return "—" if x is None else f"{pct(x)} [{ci[0] * 100:.1f}–{ci[1] * 100:.1f}]"


def secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} s"


def usd(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"${x:.{digits}f}"


# --- tables ---


def workflow_table(s: RunSummary) -> Table:
    """The review's workflow table: per task, type, syntax accuracy, logical correctness, latency."""
    kinds = {r["task_id"]: r["kind"] for r in s.records}
    rows = [
        [t, kinds[t], pct(a["syntax_accuracy"]), pct(a["logical_correctness"]), secs(a["latency_mean_s"])]
        for t, a in sorted(s.by_task.items())
    ]
    return Table(f"Workflows — {s.model}", ["Workflow", "Task type", "Syntax accuracy", "Logical correctness",
                                             "Avg response latency"], rows)


def suite_cell(s: RunSummary) -> str:
    if s.suite == "swebench-lite" and not (s.swebench or {}).get("graded"):
        return (s.swebench or {}).get("reason", "not graded")
    return pct(s.overall.get("pass@1"))


def model_table(runs: list[RunSummary], review: bool = False) -> Table:
    """The review's model table: one row per model, one column per benchmark, $ / 1M output tokens.
    With `review`, the review's published rows follow, labelled as such, for comparison."""
    present = {r.suite for r in runs}
    cols = [(suite, name) for suite, name in SUITE_COLUMNS if suite != "humaneval+" or suite in present]
    by_model: dict[str, dict[str, RunSummary]] = defaultdict(dict)
    for r in runs:
        by_model[r.model][r.suite] = r  # the later run of the same model and suite wins
    rows = []
    for model, suites in by_model.items():
        cost = sum(x.overall["cost_usd"] for x in suites.values() if x.overall["cost_usd"] is not None)
        out = sum(x.overall["output_tokens"] for x in suites.values() if x.overall["cost_usd"] is not None)
        per_1m = f"{cost / out * 1e6:.2f}" if out else "—"
        rows.append([model] + [suite_cell(suites[s]) if s in suites else "—" for s, _ in cols] + [per_1m])
    if review:
        rows += [[f"{name} (review, published)"] + [pct(figs.get(s)) for s, _ in cols] + [f"{usd_1m:.2f}"]
                 for name, figs, usd_1m in REVIEW_MODELS]
    return Table("Models", ["Model"] + [name for _, name in cols] + ["$ / 1M output tokens"], rows,
                 "$ / 1M output tokens is measured: run cost / output tokens (prices from the price table, "
                 "or $/hour x time for local models).")


def detail_table(runs: list[RunSummary]) -> Table:
    header = ["Run", "Model", "Suite", "Tasks", "Samples", "pass@k", "Pass rate [95% CI]", "Syntax accuracy [CI]",
              "Logical correctness [CI]", "Latency p50 / p95", "TTFT p50", "Output tokens", "Cost", "$ / solved task",
              "Statuses"]
    rows = []
    for s in runs:
        a = s.overall
        ks = ", ".join(f"{k}={pct(v)}" for k, v in a.items() if k.startswith("pass@")) or "—"
        rows.append([
            s.run_dir.name, s.model, s.suite, str(a["tasks"]), str(a["samples"]),
            ks, pct_ci(a["pass_rate"], a["pass_rate_ci"]),
            pct_ci(a["syntax_accuracy"], a["syntax_accuracy_ci"]),
            pct_ci(a["logical_correctness"], a["logical_correctness_ci"]),
            f"{secs(a['latency_p50_s'])} / {secs(a['latency_p95_s'])}", secs(a["ttft_p50_s"]),
            f"{a['output_tokens']}{' (estimated)' if a['tokens_estimated'] else ''}",
            usd(a["cost_usd"]), usd(a["usd_per_solved_task"]),
            ", ".join(f"{k} {v}" for k, v in a["status_counts"].items()),
        ])
    return Table("Details", header, rows, "Samples with status infra/skipped are excluded from accuracy figures. "
                 "pass@k: unbiased estimator (Chen et al.) averaged over tasks; pass rate: passing samples / "
                 "scored samples. CIs: Wilson for proportions, seeded percentile bootstrap for logical correctness.")


def tables(runs: list[RunSummary], review: bool = False) -> list[Table]:
    out = [model_table(runs, review)]
    out += [workflow_table(s) for s in runs if s.suite == "workflows"]
    out.append(detail_table(runs))
    return out


def to_markdown(ts: list[Table], title: str) -> str:
    lines = [f"# {title}", ""]
    for t in ts:
        lines += [f"## {t.title}", "", "| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
        lines += ([""] + [t.note] if t.note else []) + [""]
    return "\n".join(lines)


def _meta_lines(runs: list[RunSummary]) -> list[str]:
    out = []
    for s in runs:
        m = s.meta
        out.append(f"{s.run_dir.name}: state {m.get('state')}, template {m.get('template_id')}, sampling "
                   f"{json.dumps(m.get('sampling'), sort_keys=True)}, sandbox {m.get('sandbox_tier')}, "
                   f"dataset sha256 {m.get('dataset_sha256') or m.get('task_ids_sha256')}")
    return out


def markdown_report(runs: list[RunSummary], title: str = "moecoder evaluation", review: bool = False) -> str:
    """The full Markdown report for one or more runs."""
    return to_markdown(tables(runs, review), title) + "\n## Runs\n\n" + "\n".join(f"- {x}" for x in _meta_lines(runs)) + "\n"


# --- HTML with plots ---


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plots(runs: list[RunSummary], review: bool = False) -> dict[str, str]:
    """Base64 PNGs: pass rates with CI bars, latency distributions, cost vs accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s.model}\n{s.suite}" for s in runs]
    out = {}
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(runs)), 3.2))
    for j, (key, name) in enumerate([("pass_rate", "pass rate"), ("syntax_accuracy", "syntax accuracy"),
                                     ("logical_correctness", "logical correctness")]):
        vals = [s.overall[key] or 0.0 for s in runs]
        cis = [s.overall[f"{key}_ci"] or (v, v) for s, v in zip(runs, vals)]
        # Clamp: rounding can put a bound a hair on the wrong side of the value (matplotlib rejects that).
        err = [[max(0.0, v - lo) for v, (lo, _) in zip(vals, cis)], [max(0.0, hi - v) for v, (_, hi) in zip(vals, cis)]]
        ax.bar([i + 0.27 * (j - 1) for i in range(len(runs))], vals, 0.27, yerr=err, capsize=3, label=name)
    ax.set_xticks(range(len(runs)), labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate (95% CI)")
    ax.legend(fontsize=7)
    out["Pass rates with 95% confidence intervals"] = _png(fig)

    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(runs)), 3.2))
    data = [[r["latency_s"] for r in s.records if r.get("latency_s") is not None] or [0.0] for s in runs]
    ax.boxplot(data)
    ax.set_xticks(range(1, len(runs) + 1), labels, fontsize=7)
    ax.set_ylabel("latency per sample (s)")
    out["Latency distributions"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for s, lab in zip(runs, labels):
        x, y = s.overall["usd_per_1m_output_tokens"], s.overall.get("pass@1")
        graded = s.suite != "swebench-lite" or (s.swebench or {}).get("graded")
        if x is not None and y is not None and graded:
            ax.scatter([x], [y])
            ax.annotate(lab.replace("\n", " / "), (x, y), fontsize=7)
    suites = {s.suite for s in runs}
    for name, figs, usd_1m in REVIEW_MODELS if review else []:
        for suite in sorted(suites & figs.keys()):
            ax.scatter([usd_1m], [figs[suite]], marker="x", color="grey")
            ax.annotate(f"{name} / {suite} (review)", (usd_1m, figs[suite]), fontsize=6, color="grey")
    ax.set_xlabel("$ / 1M output tokens (measured)")
    ax.set_ylabel("pass@1")
    out["Cost vs accuracy"] = _png(fig)
    return out


def html_report(runs: list[RunSummary], title: str = "moecoder evaluation", review: bool = False) -> str:
    """A self-contained HTML page: the same tables as the Markdown report, then the plots."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
             ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
              "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}</style>"),
             f"</head><body><h1>{e(title)}</h1>"]
    for t in tables(runs, review):
        parts.append(f"<h2>{e(t.title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows]
        parts.append("</table>" + (f"<p>{e(t.note)}</p>" if t.note else ""))
    for name, b64 in plots(runs, review).items():
        parts.append(f"<h2>{e(name)}</h2><img alt='{e(name)}' src='data:image/png;base64,{b64}'>")
    parts.append("<h2>Runs</h2><ul>" + "".join(f"<li>{e(x)}</li>" for x in _meta_lines(runs)) + "</ul>")
    parts.append("</body></html>\n")
    return "".join(parts)
