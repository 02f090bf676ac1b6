"""Resource limits for one sandboxed sample."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SandboxLimits:
    """Per-sample limits. `wall_s` kills the whole process tree; the rest are rlimits (per process)
    except `disk_mb` (size of the writable work dir and of /tmp when namespaces are available) and
    `output_bytes` (cap on each of stdout and stderr; the sample is stopped when it writes more)."""

    wall_s: float = 10.0
    cpu_s: float = 10.0
    memory_mb: int = 512  # RLIMIT_AS, so it bounds virtual address space, not RSS
    fsize_mb: int = 16
    nofile: int = 64
    nproc: int = 64  # counted per user namespace, so concurrent samples do not share the budget
    disk_mb: int = 64
    output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {value!r}")
        if self.memory_mb < 64:
            raise ValueError(f"SandboxLimits.memory_mb must be at least 64 (a Python interpreter needs it), "
                             f"got {self.memory_mb}")

    def to_dict(self) -> dict:
        return asdict(self)
