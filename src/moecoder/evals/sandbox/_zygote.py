"""Zygote: a small pre-started process that forks one launcher per sample (stdlib only).

Starting a Python interpreter per sample costs more than the containment itself; this process pays it
once. It is started with an empty environment, imports only the sandbox's own stdlib-only modules and
holds no task data, so a fork of it carries nothing a sample should not see. Requests arrive on a
SOCK_SEQPACKET socket: one JSON launcher config plus the fds [stdin, stdout, stderr, status, sync];
the reply is {"pid": launcher_pid}. EOF on the socket (the harness is gone) ends the zygote.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _codec  # noqa: F401  (warm imports, shared by every fork)
import _landlock  # noqa: F401
import _launch
import _seccomp  # noqa: F401
import _server  # noqa: F401


def serve(sock: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # launchers are reaped by the kernel
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 8)
        except ConnectionError:
            return
        if not msg:
            return
        pid = os.fork()
        if pid == 0:
            sock.close()
            _child(json.loads(msg), fds)
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps({"pid": pid}).encode())


def _child(cfg: dict, fds: list[int]) -> None:
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the launcher waits for its own child
        os.setsid()
        stdin, stdout, stderr, status, sync = fds
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
            os.close(fd)
        cfg.update(status_fd=status, sync_fd=sync, parent_pid=os.getppid())
        _launch.launch(cfg)
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(status, (json.dumps({"setup_error": f"launcher: {type(e).__name__}: {e}"}) + "\n").encode())
        except OSError:
            pass
    finally:
        os._exit(0)


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
