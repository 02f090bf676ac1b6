"""Sandbox launcher: runs as `python -I -S -B _launch.py CFG_FD`, stdlib only.

It sets up containment, forks the sample's process and supervises it:

  harness (trusted) --spawn--> launcher --fork--> init: mounts, pivot_root, limits, exec(argv)
                                  |                 (PID 1 of a new PID namespace: when it exits the
                                  |                  kernel kills everything it left behind)
                                  +-- enforces the wall-clock limit and reports how the sample ended

Messages to the harness are JSON lines on the status fd: {"stage": "userns"} (the harness then writes
the uid/gid maps and answers "go" on the sync fd), {"pid": host_pid_of_init}, {"setup_error": "..."},
and a final {"exit": .., "signal": .., "timed_out": .., "cpu_s": .., "maxrss_kb": .., "wall_s": ..}.
All reading of host files (inputs, bind sources) happens before the namespaces exist, as the caller.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import stat
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _linux as L

SANDBOX_ID = 1000  # uid and gid of the sample inside the user namespace
WORK = "/sandbox"  # the sample's cwd and HOME inside the new root (a size-limited tmpfs)

_status_fd = -1


def send(msg: dict) -> None:
    os.write(_status_fd, (json.dumps(msg) + "\n").encode())


def read_fd(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def read_inputs(workdir: str) -> list[tuple[str, bytes, int]]:
    out = []
    for dirpath, _dirs, names in os.walk(workdir):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out.append((os.path.relpath(path, workdir), f.read(), os.stat(path).st_mode & 0o755))
    return out


def set_limits(lim: dict) -> None:
    def setr(which, value):
        soft = hard = int(value)
        if which == resource.RLIMIT_CPU:
            hard = soft + 1  # SIGXCPU at the soft limit, SIGKILL one second later
        resource.setrlimit(which, (soft, hard))

    setr(resource.RLIMIT_CORE, 0)
    setr(resource.RLIMIT_CPU, max(1, int(lim["cpu_s"] + 0.999)))
    setr(resource.RLIMIT_AS, lim["memory_mb"] << 20)
    setr(resource.RLIMIT_FSIZE, lim["fsize_mb"] << 20)
    setr(resource.RLIMIT_NOFILE, lim["nofile"])
    setr(resource.RLIMIT_NPROC, lim["nproc"])


# ---------------------------------------------------------------- namespace root

def _mkfile(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        with open(path, "wb"):
            pass


def _bind_ro(src_fd: int, src: str, target: str) -> None:
    if stat.S_ISDIR(os.fstat(src_fd).st_mode):  # fstat of the O_PATH fd: src itself may be unreachable now
        os.makedirs(target, exist_ok=True)
    else:
        _mkfile(target)
    via = f"/proc/self/fd/{src_fd}"
    try:
        L.mount(via, target, None, L.MS_BIND)  # not recursive: nothing mounted below src becomes visible
    except OSError:
        L.mount(via, target, None, L.MS_BIND | L.MS_REC)  # kernel refuses when src has locked submounts
    flags = L.locked_mount_flags(target) | L.MS_NOSUID
    L.mount(None, target, None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | flags)


def build_root(cfg: dict, bind_fds: list[tuple[int, str]]) -> None:
    root = cfg["root_dir"]
    lim = cfg["limits"]
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)  # our mounts must not propagate to the host
    L.mount("tmpfs", root, "tmpfs", L.MS_NOSUID | L.MS_NODEV, "size=4m,mode=0755")
    for link, dest in cfg["symlinks"]:  # e.g. /bin -> usr/bin on merged-/usr systems
        os.makedirs(os.path.dirname(root + link), exist_ok=True)
        os.symlink(dest, root + link)
    # Scratch tmpfs first, read-only binds after: a bound tree that lives under /tmp (a venv or a
    # checkout there) must stay visible on top of the sample's private /tmp.
    opts = f"uid={SANDBOX_ID},gid={SANDBOX_ID},mode=0755"
    for path, size in ((WORK, lim["disk_mb"]), ("/tmp", lim["disk_mb"]), ("/dev/shm", 16)):
        os.makedirs(root + path, exist_ok=True)
        L.mount("tmpfs", root + path, "tmpfs", L.MS_NOSUID | L.MS_NODEV, f"size={size}m,nr_inodes=4096,{opts}")
    for fd, src in bind_fds:
        _bind_ro(fd, src, root + src)
    for dev in ("null", "zero", "full", "random", "urandom"):
        target = f"{root}/dev/{dev}"
        _mkfile(target)
        L.mount(f"/dev/{dev}", target, None, L.MS_BIND)
    for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2")):
        os.symlink(dest, f"{root}/dev/{name}")
    os.makedirs(root + "/proc", exist_ok=True)
    L.mount("proc", root + "/proc", "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
    for hidden in cfg["hide"]:  # data the sample must not read, inside a bound tree
        target = root + hidden
        if os.path.isdir(target):
            L.mount("tmpfs", target, "tmpfs", L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV, "size=4k,mode=0")
        elif os.path.lexists(target):
            L.mount("/dev/null", target, None, L.MS_BIND)
    os.chdir(root)
    os.mkdir(".oldroot")
    L.pivot_root(".", ".oldroot")
    os.chdir("/")
    L.umount2("/.oldroot", L.MNT_DETACH)
    os.rmdir("/.oldroot")
    L.mount(None, "/", None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV)


def _loopback_up() -> None:
    """Bring up `lo` in the sample's own network namespace (it starts down). Only that private loopback
    exists there: no route to the host's interfaces or its 127.0.0.1."""
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, siocgifflags, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", ifr)[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def init_main(cfg: dict, inputs: list, bind_fds: list[tuple[int, str]]) -> None:
    """Child side: finish containment and exec the sample. Never returns."""
    try:
        ns = cfg["namespaces"]
        if ns:
            build_root(cfg, bind_fds)
            if cfg.get("loopback_tcp"):
                _loopback_up()
            for fd, _src in bind_fds:
                os.close(fd)
            cwd = WORK
            for rel, data, mode in inputs:
                path = os.path.join(WORK, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
                os.chmod(path, mode | 0o600)
        else:
            cwd = cfg["host_workdir"]
            if cfg["drop_to"] is not None:  # root without namespaces: become an unprivileged user
                uid, gid = cfg["drop_to"]
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
        os.chdir(cwd)
        if ns and cfg["landlock"]:
            import _landlock
            _landlock.restrict(read_paths=["/"], write_paths=[WORK, "/tmp", "/dev/shm"],
                               write_files=["/dev/null", "/dev/zero", "/dev/full"],
                               block_tcp=not cfg.get("loopback_tcp"))
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
        if ns:
            L.drop_bounding_set()
        if ns and cfg["seccomp"]:
            import _seccomp
            _seccomp.install(allow_inet=bool(cfg.get("loopback_tcp")))
        set_limits(cfg["limits"])
        os.setsid()  # own session: group signals from the sample reach only its own processes
        L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)  # launcher gone -> sample gone (and its namespace)
        if cfg.get("serve"):
            serve_inline(cfg)
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as e:  # noqa: BLE001 - report any setup failure, never run the sample half-contained
        try:
            send({"setup_error": f"{type(e).__name__}: {e}"})
        finally:
            os._exit(126)


def serve_inline(cfg: dict) -> None:
    """Run the function-call server in this (now contained) process instead of exec'ing an interpreter:
    it saves a Python start per sample. Candidate code then sees the standard library only (-I -S)."""
    L.clear_capabilities()  # no execve follows, so nothing else would drop them
    with open("/proc/self/status") as f:
        if any(int(line.split()[1], 16) for line in f if line.startswith("Cap")):
            raise RuntimeError("capabilities still present")
    os.environ.clear()
    os.environ.update(cfg["env"])
    import _server

    global _status_fd
    os.close(_status_fd)  # the candidate must not be able to forge launcher messages
    os.close(cfg["sync_fd"])
    _status_fd = -1
    try:
        _server.main()
    finally:
        os._exit(0)


# ---------------------------------------------------------------- supervisor

def _descendants(root_pid: int) -> list[int]:
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
                parent[int(name)] = int(stat[stat.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
    out, frontier = [], {root_pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        out.extend(frontier)
    return out


def kill_descendants() -> None:
    """Without a PID namespace: we are a subreaper, so orphans land here; kill until none is left."""
    for _ in range(1000):
        pids = _descendants(os.getpid())
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            if not pids:
                return
        if not pids:
            return
        time.sleep(0.001)


def main() -> None:
    launch(json.loads(read_fd(int(sys.argv[1]))))


def launch(cfg: dict) -> None:
    """Contain, fork and supervise one sample described by `cfg` (this process is its launcher)."""
    global _status_fd
    _status_fd = cfg["status_fd"]
    os.set_inheritable(_status_fd, False)
    os.set_inheritable(cfg["sync_fd"], False)
    L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != cfg["parent_pid"]:
        os._exit(1)
    ns = cfg["namespaces"]
    inputs, bind_fds = [], []
    if ns:
        inputs = read_inputs(cfg["host_workdir"])
        if os.geteuid() == 0:
            os.setgroups([])  # no supplementary root group may follow us into the namespace
        L.unshare(L.CLONE_NEWUSER | L.CLONE_NEWNS | L.CLONE_NEWNET | L.CLONE_NEWPID | L.CLONE_NEWIPC
                  | L.CLONE_NEWUTS)
        send({"stage": "userns"})
        if os.read(cfg["sync_fd"], 2) != b"go":
            raise RuntimeError("harness did not write the id maps")
        # Bind sources are opened now: after the mount namespace exists (a bind must come from a mount
        # in our namespace) and while we still hold the caller's uid (so e.g. a 0700 /root is traversable).
        for src in cfg["binds"]:
            bind_fds.append((os.open(src, os.O_PATH), src))
        # Become the sandbox id now (capabilities in the new namespace are kept): files we create on
        # the new tmpfs must be owned by an id that exists inside the namespace.
        os.setresgid(SANDBOX_ID, SANDBOX_ID, SANDBOX_ID)
        os.setresuid(SANDBOX_ID, SANDBOX_ID, SANDBOX_ID)
    else:
        L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)  # at once: the launcher may be killed during setup
        init_main(cfg, inputs, bind_fds)
    for fd, _src in bind_fds:
        os.close(fd)
    send({"pid": pid})
    pidfd = os.pidfd_open(pid)
    timed_out = not select.select([pidfd], [], [], cfg["limits"]["wall_s"])[0]
    if timed_out:
        os.kill(pid, signal.SIGKILL)  # PID 1 of the namespace: the kernel kills the rest
    _, status, ru = os.wait4(pid, 0)
    wall = time.monotonic() - start
    if not ns:
        kill_descendants()
    send({"exit": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None,
          "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
          "timed_out": timed_out, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss, "wall_s": wall})


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:  # noqa: BLE001
        if _status_fd >= 0:
            send({"setup_error": f"launcher: {type(e).__name__}: {e}"})
        os._exit(125)
