"""Workflow 1: a custom PyTorch training loop (gradient accumulation, mixed precision, DDP).

The review found this answer syntactically perfect but only 70% logically correct: the LR schedule
advanced per micro-batch instead of per optimizer step. The checks below drive the candidate's
`train()` on CPU (DDP world size 1 on gloo) and separate that bug from the other usual ones.
"""

from __future__ import annotations

import math
from typing import Any

from moecoder.evals.tasks.workflows.common import (
    data_dir,
    decide,
    make_prompts,
    run_harness,
    single_file,
    syntax_verdict,
)
from moecoder.evals.types import Prompt, Status, Verdict

MAIN_FILE = "train_loop.py"
# Scenario sizes: 24 micro-batches in windows of 4 -> 6 optimizer steps; 10 in windows of 4 -> 2 full + 1 partial.
PARAMS = {"n_micro": 24, "accum": 4, "partial_n_micro": 10, "lr": 2e-2, "warmup": 2, "decay_steps": 6}
GRAD_RTOL = 1e-4


def scheduled_lr(k: int, p: dict[str, Any] = PARAMS) -> float:
    """The learning rate optimizer step k must use (same lambda the harness gives LambdaLR)."""
    return p["lr"] * min(1.0, (k + 1) / p["warmup"]) * max(0.1, 1.0 - k / p["decay_steps"])


class TrainingLoopTask:
    """Custom training loop with gradient accumulation, mixed precision and DistributedDataParallel."""

    task_id = "workflow/training-loop"
    suite = "workflow"
    kind = "Code generation"
    CHECKS = ("loss_decreases", "optimizer_steps", "scheduler_steps_per_optimizer_step", "lr_schedule_values",
              "grad_equals_big_batch", "partial_window", "mixed_precision", "ddp_sync_once_per_step")

    def __init__(self) -> None:
        self.root = data_dir("training_loop")

    def prompts(self) -> dict[str, Prompt]:
        return make_prompts(self.task_id, (self.root / "prompt.md").read_text())

    def evaluate(self, code: str | dict[str, str], sandbox: Any = None) -> Verdict:
        files = single_file(code, MAIN_FILE)
        early = syntax_verdict(files, len(self.CHECKS), [MAIN_FILE])
        if early is not None:
            return early
        files["_wf_harness.py"] = (self.root / "harness.py").read_text()
        # DDP on gloo (world size 1) needs TCP: allowed on the sample's private loopback only.
        out = run_harness(sandbox, files, "_wf_harness.py", {"params": PARAMS}, wall_s=120.0, memory_mb=4096,
                          loopback_tcp=True)
        base = Verdict(Status.FAIL, 0, len(self.CHECKS), syntax_ok=True, files_compiled=len(files) - 1,
                       files_total=len(files) - 1)
        bad = out.failure_status()
        if bad is not None:
            base.status, base.detail = bad, out.error_line()
            return base
        r = out.report or {}
        base.measurements.update(r)
        if "import_error" in r:
            base.detail = "train_loop.py failed to import: " + r["import_error"].strip().splitlines()[-1]
            return base
        return decide(self.rules(r), base)

    @staticmethod
    def rules(r: dict[str, Any]) -> list[tuple[str, Any]]:
        m, full, part = r.get("main", {}), r.get("full_window", {}), r.get("partial_window", {})
        p = PARAMS
        steps = math.ceil(p["n_micro"] / p["accum"])
        return [
            ("loss_decreases", lambda: m["loss_after"] < 0.8 * m["loss_before"]),
            ("optimizer_steps", lambda: m["optimizer_steps"] == steps),
            ("scheduler_steps_per_optimizer_step", lambda: m["sched_calls"] == m["optimizer_steps"] == steps),
            ("lr_schedule_values", lambda: len(m["lrs"]) == steps and all(
                math.isclose(lr, scheduled_lr(k), rel_tol=1e-6) for k, lr in enumerate(m["lrs"]))),
            ("grad_equals_big_batch", lambda: full["optimizer_steps"] == 1
             and full["grad_rel_errors"][0] < GRAD_RTOL),
            ("partial_window", lambda: part["optimizer_steps"] == math.ceil(p["partial_n_micro"] / p["accum"])
             and len(part["grad_rel_errors"]) == part["optimizer_steps"]
             and max(part["grad_rel_errors"]) < GRAD_RTOL),
            ("mixed_precision", lambda: m["forwards"] == p["n_micro"] and m["autocast_forwards"] == m["forwards"]),
            ("ddp_sync_once_per_step", lambda: m["ddp_wraps"] == 1 and m["synced_backwards"] == steps),
        ]

    def reference(self) -> dict[str, str]:
        from moecoder.evals.tasks.workflows.common import read_tree

        return read_tree(self.root / "reference")

    def flawed(self) -> dict[str, dict[str, str]]:
        """Flawed solutions by name, each reproducing a failure the review reports or a common neighbour."""
        from moecoder.evals.tasks.workflows.common import read_tree

        return {d.name: read_tree(d) for d in sorted((self.root / "flawed").iterdir()) if d.is_dir()}
