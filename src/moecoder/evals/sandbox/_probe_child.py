"""Probe helper: runs as `python -I -S -B _probe_child.py`, prints one JSON object (stdlib only).

Each check runs in a forked child so a half-applied restriction never leaks into the next check.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _linux as L


def in_child(fn) -> tuple[bool, str]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            detail = fn() or ""
            os.write(w, ("ok:" + detail).encode())
        except BaseException as e:  # noqa: BLE001
            os.write(w, f"no:{type(e).__name__}: {e}".encode())
        os._exit(0)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return msg.startswith("ok:"), msg[3:]


def check_seccomp() -> str:
    import _seccomp

    _seccomp.install()
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raise RuntimeError("AF_INET socket still allowed")
    except OSError as e:
        if e.errno != errno.EAFNOSUPPORT:
            raise
    try:
        L.unshare(L.CLONE_NEWUSER)
        raise RuntimeError("unshare still allowed")
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
    socket.socketpair()  # AF_UNIX must keep working
    return ""


def main() -> None:
    import _landlock

    report: dict = {}
    flags = {"user_ns": 0, "mount_ns": L.CLONE_NEWNS, "net_ns": L.CLONE_NEWNET, "pid_ns": L.CLONE_NEWPID,
             "ipc_ns": L.CLONE_NEWIPC, "uts_ns": L.CLONE_NEWUTS}
    for name, flag in flags.items():
        ok, detail = in_child(lambda flag=flag: L.unshare(L.CLONE_NEWUSER | flag))
        report[name] = ok
        if not ok:
            report.setdefault("problems", []).append(f"{name}: {detail}")
    report["landlock_abi"] = _landlock.abi_version()
    report["seccomp"], detail = in_child(check_seccomp)
    if not report["seccomp"]:
        report.setdefault("problems", []).append(f"seccomp: {detail}")
    report["subreaper"], _ = in_child(lambda: L.prctl(L.PR_SET_CHILD_SUBREAPER, 1) and "")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
