"""Sandboxed execution of untrusted code: probe the host, run programs, call functions over a pipe.

    from moecoder.evals.sandbox import probe, Sandbox, SandboxLimits, IsolationTier, SandboxRefused
    report = probe()                  # cached per process; report.tier, report.to_dict() for results files
    sb = Sandbox(min_tier=IsolationTier.NAMESPACES, opt_in=args.allow_code_execution)  # may raise SandboxRefused
    res = sb.run([sb.python, "main.py"], files={"main.py": src}, limits=SandboxLimits(wall_s=10))
    with sb.call_session(code, "entry_point", limits) as s:   # s.loaded, s.load_result
        r = s.call([1, 2])            # CallResult(ok, value, error, kind); also s.call_many([...])

`sb.python` is the interpreter path valid inside the sandbox. Call sessions run the candidate with the
standard library only. RunResult/CallResult fields are data produced by untrusted code: decide verdicts
from them in the trusted process. SandboxError means the sandbox itself failed (an infrastructure error).
"""

from moecoder.evals.sandbox.limits import SandboxLimits
from moecoder.evals.sandbox.probe import IsolationTier, ProbeReport, probe
from moecoder.evals.sandbox.rpc import CallResult
from moecoder.evals.sandbox.runner import RunResult, Sandbox, SandboxError, SandboxRefused

__all__ = ["CallResult", "IsolationTier", "ProbeReport", "RunResult", "Sandbox", "SandboxError", "SandboxLimits",
           "SandboxRefused", "probe"]
