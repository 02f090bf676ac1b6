"""Call functions of untrusted code that lives in a sandboxed interpreter.

The trusted side (tests, expected values) stays in this process; each call crosses a pipe as tagged
JSON (see _codec.py) and comes back as plain data or an error. The session has one wall-clock budget
(`limits.wall_s`, enforced by the launcher for the whole interpreter) and each call has its own timeout.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import struct
import time
from dataclasses import dataclass
from typing import Any, Self

from moecoder.evals.sandbox._codec import CodecError, dumps, loads
from moecoder.evals.sandbox.limits import SandboxLimits

__all__ = ["CallResult", "CallSession", "CodecError", "dumps", "loads"]


@dataclass
class CallResult:
    ok: bool
    value: Any = None  # plain data (exact builtin types) when ok
    error: str | None = None
    # Why it failed: "error" (the function raised or returned an unsupported type), "timeout", "memory",
    # "crash" (the interpreter died or broke the protocol), "load" (the module itself failed).
    kind: str = "ok"
    digest: str | None = None  # set instead of `value` when the call asked for digests of large results


class CallSession:
    """Context manager: `with sb.call_session(code, "f", limits) as s: s.call([1, 2])`.

    `.loaded` tells whether the module ran; `.call` never raises for anything the candidate does."""

    def __init__(self, sandbox, code: str, entry_point: str, limits: SandboxLimits) -> None:
        self.sandbox, self.code, self.entry_point, self.limits = sandbox, code, entry_point, limits
        self.load_result: CallResult | None = None
        self._dead: CallResult | None = None
        self._base: str | None = None
        self._proc = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Self:
        from moecoder.evals.sandbox.runner import Launched

        sb = self.sandbox
        argv = [sb.python, "-I", "-B", sb.helper_path("_server.py")]
        self._base, cfg = sb._prepare(argv, None, self.limits, None, serve=True)
        try:
            self._proc = Launched(sb, cfg, self.limits, stdin=True, stderr=False)
            self._proc.pump_status(lambda: self._proc.init_pid is not None or self._proc.setup_errors, 30.0)
            self._proc.raise_setup_error()
            self.load_result = self._request({"code": self.code}, self.limits.wall_s)
            if self.load_result.ok:
                self.load_result = CallResult(ok=True, kind="ok")
            elif self.load_result.kind == "error":
                self.load_result.kind = "load"
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def loaded(self) -> bool:
        return bool(self.load_result and self.load_result.ok)

    def close(self) -> None:
        if self._proc is not None:
            self._proc.close()
            self._proc = None
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    # ------------------------------------------------------------------ calls
    def call(self, args: list, timeout: float | None = None, name: str | None = None) -> CallResult:
        """Call `name` (default: the entry point) with positional `args`; `timeout` defaults to the
        session's wall limit. After a timeout or crash the session is dead and every call says so."""
        if not self.loaded:
            return self.load_result or CallResult(ok=False, error="session not started", kind="crash")
        try:
            msg = {"name": name or self.entry_point, "args": list(args)}
            dumps(msg)  # validate here: an unencodable argument is the caller's bug, not the candidate's
        except CodecError as e:
            raise ValueError(f"argument cannot be sent to the sandbox: {e}") from None
        return self._request(msg, timeout if timeout is not None else self.limits.wall_s)

    def call_many(self, args_list: list[list], timeout: float | None = None, name: str | None = None,
                  digest_over: int | None = None) -> list[CallResult]:
        """Several calls in one round trip (one timeout for all). On timeout or crash every item gets
        that result, since which call hung cannot be known."""
        if not self.loaded:
            return [self.load_result or CallResult(ok=False, error="session not started", kind="crash")] * len(args_list)
        msg = {"name": name or self.entry_point, "batch": [list(a) for a in args_list]}
        if digest_over is not None:  # results whose canonical encoding is larger come back as sha256 only
            msg["digest_over"] = int(digest_over)
        try:
            dumps(msg)
        except CodecError as e:
            raise ValueError(f"argument cannot be sent to the sandbox: {e}") from None
        res = self._request(msg, timeout if timeout is not None else self.limits.wall_s, batch=True)
        if isinstance(res, CallResult):
            return [res] * len(args_list)
        return res

    def _request(self, msg: dict, timeout: float, batch: bool = False):
        if self._dead is not None:
            return self._dead
        body = dumps(msg)
        try:
            _write_all(self._proc.proc.stdin.fileno(), struct.pack(">I", len(body)) + body)
            reply = self._read_frame(time.monotonic() + timeout)
        except _Timeout:
            return self._die(CallResult(ok=False, error=f"call exceeded {timeout:.2f}s", kind="timeout"))
        except (BrokenPipeError, EOFError):
            return self._die(self._why_dead())
        except CodecError as e:
            return self._die(CallResult(ok=False, error=f"protocol violation: {e}", kind="crash"))
        if batch:
            items = reply.get("results") if type(reply) is dict else None
            if type(items) is not list or len(items) != len(msg["batch"]):
                return self._die(CallResult(ok=False, error="protocol violation: malformed batch", kind="crash"))
            results = [_to_result(item) for item in items]
            bad = next((r for r in results if r.kind == "crash"), None)
            return self._die(bad) if bad else results
        result = _to_result(reply)
        return self._die(result) if result.kind == "crash" else result

    def _read_frame(self, deadline: float):
        head = self._read_exact(4, deadline)
        size = struct.unpack(">I", head)[0]
        if size > self.limits.output_bytes:
            raise CodecError(f"reply of {size} bytes exceeds the {self.limits.output_bytes}-byte cap")
        return loads(self._read_exact(size, deadline))

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd = self._proc.proc.stdout.fileno()
        buf = bytearray()
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise _Timeout
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _why_dead(self) -> CallResult:
        """The interpreter went away: ask the launcher how (CPU limit, wall limit, signal, exit)."""
        self._proc.pump_status(lambda: self._proc.final is not None, 5.0)
        final = self._proc.final or {}
        sig = final.get("signal")
        if final.get("timed_out") or sig == signal.SIGXCPU:
            return CallResult(ok=False, error="time limit exceeded", kind="timeout")
        how = f"signal {sig}" if sig else f"exit {final.get('exit')}"
        return CallResult(ok=False, error=f"interpreter died ({how})", kind="crash")

    def _die(self, result: CallResult) -> CallResult:
        self._dead = result
        if self._proc is not None:
            self._proc.kill()
        return result


def _to_result(reply) -> CallResult:
    if type(reply) is not dict or type(reply.get("ok")) is not bool:
        return CallResult(ok=False, error="protocol violation: malformed reply", kind="crash")
    if reply["ok"]:
        dig = reply.get("digest")
        if dig is not None:
            return CallResult(ok=True, digest=dig) if type(dig) is str else CallResult(
                ok=False, error="protocol violation: bad digest", kind="crash")
        return CallResult(ok=True, value=reply.get("value"))
    error = reply.get("error")
    error = error[:500] if type(error) is str else "unknown error"
    return CallResult(ok=False, error=error, kind="memory" if error.startswith("MemoryError") else "error")


class _Timeout(Exception):
    pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
