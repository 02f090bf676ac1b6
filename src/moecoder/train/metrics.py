"""Training metrics: one JSON line per record, optional TensorBoard, a live progress line.

Only rank 0 writes. On resume, records past the resumed step are dropped so a run killed
after logging (but before checkpointing) a step does not log that step twice.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}")
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill; the rest is good
    return out


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


def tensorboard_scalars(record: dict) -> dict[str, float]:
    """A metrics record's numbers as TensorBoard tags: eval_* under eval/, the rest under train/
    (per-layer token counts are lists: not scalars, left to metrics.jsonl)."""
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"] = float(v)
    return out


class MetricsLogger:
    """Writes metrics.jsonl (+ TensorBoard when installed) under `run_dir` and prints progress."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, total_steps: int, resume_step: int = 0,
                 progress_every: int = 1, stream=None):
        self.enabled = enabled
        self.total = total_steps
        self.progress_every = max(progress_every, 1)
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._start_time = time.perf_counter()
        self._start_step = resume_step
        self._file = None
        self._tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / METRICS_FILE
        if resume_step:
            _truncate_after(path, resume_step)
        elif path.exists():
            path.unlink()  # a fresh run starts a fresh log
        self._file = open(path, "a")  # noqa: SIM115  (held open for the run; closed by close())
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            # purge_step: on resume, TensorBoard hides the events a killed run wrote past the checkpoint.
            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, value in tensorboard_scalars(record).items():
                self._tb.add_scalar(tag, value, record["step"])
            self._tb.flush()

    def progress(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled or (step % self.progress_every and step != self.total):
            return
        done = step - self._start_step
        elapsed = time.perf_counter() - self._start_time
        eta = elapsed / done * (self.total - step) if done else float("nan")
        line = (f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.3e}  "
                f"{tokens_per_s:,.0f} tok/s  eta {_fmt_time(eta)}")
        if self.tty:
            self.stream.write("\r" + line.ljust(90) + ("\n" if step == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            if self.tty:
                self.stream.write("\n")
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
