"""Function-call server that runs INSIDE the sandbox (stdlib only; untrusted side).

Frames are a 4-byte big-endian length plus JSON. The first request carries the candidate's code; each
later one names a function and its tagged arguments; each reply is {"ok": true, "value": tagged} or
{"ok": false, "error": "Type: message"}. The candidate runs in this process and could forge replies:
the harness therefore treats every reply as untrusted data and holds all tests and expected values.
"""

from __future__ import annotations

import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _codec


def main() -> None:
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the candidate's own prints go nowhere; only frames use the protocol fds
        os.dup2(devnull, fd)

    def recv():
        head = _read_exact(rfd, 4)
        if head is None:
            return None
        body = _read_exact(rfd, struct.unpack(">I", head)[0])
        return None if body is None else _codec.loads(body)

    def send(msg) -> None:
        body = _codec.dumps(msg)
        _write_all(wfd, struct.pack(">I", len(body)) + body)

    hello = recv()
    namespace = {"__name__": "__candidate__", "__builtins__": __builtins__}
    try:
        exec(compile(hello["code"], "<candidate>", "exec"), namespace)  # noqa: S102 - this is the sandbox
    except BaseException as e:  # noqa: BLE001
        send({"ok": False, "error": _describe(e)})
        return
    send({"ok": True})
    while (req := recv()) is not None:
        fn = namespace.get(req["name"])
        big = req.get("digest_over")
        if "batch" in req:  # several calls in one round trip; each item succeeds or fails on its own
            body = _codec.dumps({"ok": True, "results": [_call(fn, req["name"], args, big) for args in req["batch"]]})
        else:
            body = _codec.dumps(_call(fn, req["name"], req["args"], big))
        _write_all(wfd, struct.pack(">I", len(body)) + body)


def _call(fn, name: str, args: list, digest_over) -> dict:
    try:
        if not callable(fn):
            raise NameError(f"name {name!r} is not defined as a function")  # noqa: TRY004 - as Python would
        value = fn(*args)
        _codec.to_tagged(value)  # an unsupported return type is the candidate's error
        if digest_over is not None:  # large results travel as a digest of their canonical encoding
            canon = _codec.canonical(value)
            if len(canon) > digest_over:
                return {"ok": True, "digest": _codec.hashlib.sha256(canon).hexdigest(), "size": len(canon)}
        return {"ok": True, "value": value}
    except BaseException as e:  # noqa: BLE001
        return {"ok": False, "error": _describe(e)}


def _describe(e: BaseException) -> str:
    try:
        msg = str(e)[:300]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        msg = "<unprintable>"
    return f"{type(e).__name__}: {msg}"


def _read_exact(fd: int, n: int):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


if __name__ == "__main__":
    main()
