"""Sandboxed execution of untrusted code: probe the host, run programs, call functions over a pipe."""

from moecoder.evals.sandbox.limits import SandboxLimits
from moecoder.evals.sandbox.probe import IsolationTier, ProbeReport, probe
from moecoder.evals.sandbox.runner import RunResult, Sandbox, SandboxError, SandboxRefused

__all__ = ["IsolationTier", "ProbeReport", "RunResult", "Sandbox", "SandboxError", "SandboxLimits",
           "SandboxRefused", "probe"]
