"""Find out, once per process, how strongly this host can isolate untrusted code.

Tiers are ordered; each includes everything below it:
  PROCESS     own session, rlimits (CPU, AS, FSIZE, NOFILE, NPROC, CORE=0), wall-clock kill of the whole tree
              (subreaper), scrubbed env, private work dir, an unprivileged uid when we are root.
              No filesystem or network isolation.
  NAMESPACES  + user/PID/net/mount/IPC/UTS namespaces: a minimal read-only root (system dirs and the
              Python install only), benchmark data hidden, a size-limited tmpfs work dir, no network,
              no capabilities, the tree dies with its PID 1.
  HARDENED    + Landlock (writes only in the work dir, no TCP, no signals out) and a seccomp deny list
              (mount, ptrace, namespaces, bpf, keyrings, io_uring, non-AF_UNIX sockets).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource  # noqa: F401  (its import failing means no rlimits: tier NONE)
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path

HERE = Path(__file__).resolve().parent


class IsolationTier(IntEnum):
    NONE = 0
    PROCESS = 1
    NAMESPACES = 2
    HARDENED = 3


@dataclass
class ProbeReport:
    tier: IsolationTier
    user_ns: bool = False
    mount_ns: bool = False
    net_ns: bool = False
    pid_ns: bool = False
    ipc_ns: bool = False
    uts_ns: bool = False
    landlock: bool = False
    landlock_abi: int = 0
    seccomp: bool = False
    subreaper: bool = False
    rlimits: bool = False
    bwrap: str | None = None  # path of a working bubblewrap, reported only (the launcher does not need it)
    launch_ok: bool = False  # an end-to-end run at the reported tier (NAMESPACES or above) worked
    euid: int = -1
    kernel: str = ""
    arch: str = ""
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tier"] = self.tier.name
        return d


def _bwrap() -> str | None:
    path = shutil.which("bwrap")
    if not path:
        return None
    try:
        ok = subprocess.run([path, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
                            capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return path if ok else None


def _try_launch(report: ProbeReport, tier: IsolationTier) -> str | None:
    """Run a trivial program at `tier`; return None on success, else the problem."""
    from moecoder.evals.sandbox.limits import SandboxLimits
    from moecoder.evals.sandbox.runner import Sandbox

    trial = ProbeReport(**{**asdict(report), "tier": tier})
    # Below the namespace tier a root harness runs samples as nobody, who may not reach our Python.
    argv = [sys.executable, "-I", "-S", "-c", "print(6 * 7)"] if tier >= IsolationTier.NAMESPACES else [
        "/bin/sh", "-c", "echo 42"]
    try:
        sb = Sandbox(min_tier=tier, opt_in=True, report=trial)
        res = sb.run(argv, limits=SandboxLimits(wall_s=20, cpu_s=10))
    except Exception as e:  # noqa: BLE001 - any failure means this tier is not usable here
        return f"{tier.name} launch: {type(e).__name__}: {e}"
    if res.returncode != 0 or res.stdout.strip() != b"42":
        return f"{tier.name} launch: exit {res.returncode}, stderr {res.stderr[-300:]!r}"
    return None


@functools.lru_cache(maxsize=1)
def probe() -> ProbeReport:
    """Probe the host (cached for the life of the process)."""
    report = ProbeReport(tier=IsolationTier.NONE, euid=os.geteuid(), kernel=platform.release(),
                         arch=platform.machine(), rlimits=True)
    if sys.platform != "linux":
        report.problems.append(f"platform {sys.platform}: only Linux is supported")
        return report
    try:
        out = subprocess.run([sys.executable, "-I", "-S", "-B", str(HERE / "_probe_child.py")],
                             capture_output=True, timeout=30, env={"LANG": "C.UTF-8"}, check=False)
        child = json.loads(out.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        report.problems.append(f"probe helper failed: {e}")
        return report
    report.problems += child.pop("problems", [])
    for key in ("user_ns", "mount_ns", "net_ns", "pid_ns", "ipc_ns", "uts_ns", "seccomp", "subreaper", "landlock_abi"):
        setattr(report, key, child.get(key, getattr(report, key)))
    report.landlock = report.landlock_abi >= 1
    report.bwrap = _bwrap()
    report.tier = IsolationTier.PROCESS if report.subreaper else IsolationTier.NONE
    if report.subreaper and all((report.user_ns, report.mount_ns, report.net_ns, report.pid_ns, report.ipc_ns,
                                 report.uts_ns)):
        candidates = [IsolationTier.NAMESPACES]
        if report.landlock and report.seccomp:
            candidates.insert(0, IsolationTier.HARDENED)
        for tier in candidates:
            problem = _try_launch(report, tier)
            if problem is None:
                report.tier, report.launch_ok = tier, True
                break
            report.problems.append(problem)
            if tier is IsolationTier.HARDENED:  # fall back to namespaces without the extra layers
                report.landlock = report.seccomp = False
    if report.tier is IsolationTier.PROCESS:
        problem = _try_launch(report, IsolationTier.PROCESS)
        if problem is not None:
            report.problems.append(problem)
            report.tier = IsolationTier.NONE
    return report
