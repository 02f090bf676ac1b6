"""Learning-rate schedules as pure functions of the optimizer step count.

`lr_at(step)` is the LR used by optimizer step number `step` (0-based). Nothing here holds
state, so the LR cannot drift with gradient accumulation: the loop calls it once per
optimizer step, and a resumed run gets the same LR from the same step number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "wsd")


@dataclass(frozen=True)
class Schedule:
    """Linear warmup to `peak`, then cosine decay to `min_lr` or WSD (warmup-stable-decay).

    WSD holds `peak` until the last `decay_frac` of the run, then decays linearly to `min_lr`.
    """

    peak: float
    min_lr: float
    warmup: int
    total: int
    kind: str = "cosine"
    decay_frac: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; choose one of: {', '.join(SCHEDULES)}")
        if self.total <= 0:
            raise ValueError(f"the schedule needs a positive number of steps, got {self.total}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.min_lr <= self.peak:
            raise ValueError(f"need 0 <= min_lr ({self.min_lr}) <= lr ({self.peak})")
        if not 0.0 < self.decay_frac <= 1.0:
            raise ValueError(f"decay_frac must be in (0, 1], got {self.decay_frac}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.kind == "cosine":
            span = max(self.total - self.warmup, 1)
            progress = min((step - self.warmup) / span, 1.0)
            return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        decay_start = max(self.warmup, self.total - math.ceil(self.decay_frac * self.total))
        if step < decay_start:
            return self.peak
        progress = min((step - decay_start) / max(self.total - decay_start, 1), 1.0)
        return self.peak + (self.min_lr - self.peak) * progress

    def __call__(self, step: int) -> float:
        return self.lr_at(step)
