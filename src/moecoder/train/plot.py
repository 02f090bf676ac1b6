"""`moecoder plot RUN_DIR`: loss and learning-rate curves of a run as RUN_DIR/loss.png."""

from __future__ import annotations

import os
from pathlib import Path

from .metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot train loss (and eval loss where recorded) with the LR on a second axis; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training records to plot")
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(steps, [r["loss"] for r in records], label="train loss", color="tab:blue", linewidth=1)
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss",
                color="tab:orange", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax_lr = ax.twinx()
    ax_lr.plot(steps, [r["lr"] for r in records], label="lr", color="tab:green", linestyle="--", linewidth=1)
    ax_lr.set_ylabel("learning rate")
    lines = ax.get_lines() + ax_lr.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    ax.set_title(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "loss.png"
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
