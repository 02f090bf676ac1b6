"""Attack corpus: each hostile sample gets the right outcome and leaves no trace on the host.

These need the namespace tier (user/PID/net/mount namespaces); on a host without them the fixture fails
with SandboxRefused naming what is missing. A few process-level attacks also run at the PROCESS tier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import textwrap
import time
import uuid

import pytest

from moecoder.evals.sandbox import IsolationTier, Sandbox, SandboxLimits, probe

PY = sys.executable


@pytest.fixture(scope="module")
def sb() -> Sandbox:
    return Sandbox(min_tier=IsolationTier.NAMESPACES, opt_in=True)


@pytest.fixture(scope="module")
def sb_process() -> Sandbox:
    """Forced down to the PROCESS tier (no namespaces), to test the subreaper and rlimit paths."""
    report = dataclasses.replace(probe(), tier=IsolationTier.PROCESS, landlock=False, seccomp=False)
    return Sandbox(min_tier=IsolationTier.PROCESS, opt_in=True, report=report)


def run_py(sandbox: Sandbox, code: str, **limits) -> object:
    lim = SandboxLimits(**{"wall_s": 5, "cpu_s": 5, **limits})
    return sandbox.run([PY, "main.py"], files={"main.py": textwrap.dedent(code)}, limits=lim)


def procs_with(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


def test_plain_run_reports_output_and_exit_code(sb):
    res = run_py(sb, "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)")
    assert (res.returncode, res.stdout, res.stderr) == (3, b"out\n", b"err\n")
    assert not (res.timed_out or res.memory_exceeded or res.output_truncated)
    assert res.tier == sb.tier.name


def run_sh(sandbox: Sandbox, script: str, **limits) -> object:
    """PROCESS-tier samples are shell scripts: as root that tier runs them as nobody, who may not be able
    to reach the harness's Python (e.g. under a 0700 /root)."""
    lim = SandboxLimits(**{"wall_s": 5, "cpu_s": 5, **limits})
    return sandbox.run(["/bin/sh", "main.sh"], files={"main.sh": textwrap.dedent(script)}, limits=lim)


def test_infinite_loop_times_out(sb):
    t0 = time.monotonic()
    res = run_py(sb, "while True: pass", wall_s=1.5, cpu_s=10)
    assert res.timed_out and res.returncode != 0
    assert time.monotonic() - t0 < 6


def test_process_tier_infinite_loop_times_out(sb_process):
    t0 = time.monotonic()
    res = run_sh(sb_process, "while :; do :; done", wall_s=1.5, cpu_s=10)
    assert res.timed_out and res.returncode != 0 and res.tier == "PROCESS"
    assert time.monotonic() - t0 < 6


def test_process_tier_fsize_and_daemon(sb_process):
    marker = f"daemon-{uuid.uuid4().hex}"
    res = run_sh(sb_process, f"""
    setsid /bin/sh -c 'exec sleep 60 {marker}' </dev/null >/dev/null 2>&1 &
    head -c 67108864 /dev/zero > big.bin
    echo "wrote everything"
    """, fsize_mb=4)
    assert b"wrote everything" in res.stdout  # the shell survives; head was stopped by SIGXFSZ
    assert res.stderr  # "File size limit exceeded"
    time.sleep(0.2)
    assert procs_with(marker) == []


def test_cpu_limit_stops_busy_threads(sb):
    res = run_py(sb, "while True: pass", wall_s=10, cpu_s=1)
    assert res.timed_out and res.signal in (signal.SIGXCPU, signal.SIGKILL)


def test_fork_bomb_is_contained(sb):
    marker = f"bomb-{uuid.uuid4().hex}"
    code = """
    import os, sys
    n = 0
    while True:
        try:
            os.fork()
            n += 1
        except OSError:
            pass
    """
    sb_res = sb.run([PY, "main.py", marker], files={"main.py": textwrap.dedent(code)},
                    limits=SandboxLimits(wall_s=2, cpu_s=5, nproc=32))
    assert sb_res.timed_out
    time.sleep(0.2)
    assert procs_with(marker) == []


def test_memory_blowup_is_reported(sb):
    res = run_py(sb, "x = bytearray(3 << 30)", memory_mb=256)
    assert res.memory_exceeded and res.returncode != 0 and not res.timed_out


def test_disk_fill_hits_the_file_size_limit(sb):
    res = run_py(sb, """
    with open("big.bin", "wb") as f:
        for _ in range(64):
            f.write(b"x" * (1 << 20))
    print("wrote everything")
    """, fsize_mb=4)
    assert res.returncode != 0 and b"wrote everything" not in res.stdout
    assert res.signal == signal.SIGXFSZ or b"File too large" in res.stderr


def test_many_small_files_hit_the_work_dir_quota(sb):
    res = run_py(sb, """
    import os
    for i in range(100000):
        with open(f"f{i}", "wb") as f:
            f.write(b"x" * 65536)
    print("wrote everything")
    """, fsize_mb=4, disk_mb=8)
    assert res.returncode != 0 and b"wrote everything" not in res.stdout
    assert b"No space left" in res.stderr or b"OSError" in res.stderr


@contextlib.contextmanager
def _host_listener():
    """A TCP listener on the host's 127.0.0.1 (accept times out after 0.5 s); yields (socket, port)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    try:
        yield listener, listener.getsockname()[1]
    finally:
        listener.close()


def test_no_network_loopback_listener_sees_nothing(sb):
    with _host_listener() as (listener, port):
        res = run_py(sb, f"""
        import socket
        for family, addr in ((socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_INET6, ("::1", {port}))):
            try:
                s = socket.socket(family, socket.SOCK_STREAM)
                s.settimeout(1)
                s.connect(addr)
                print("CONNECTED")
            except OSError as e:
                print("refused", e)
        """)
        assert b"CONNECTED" not in res.stdout and res.stdout.count(b"refused") == 2
        with pytest.raises(socket.timeout):
            listener.accept()


def test_loopback_tcp_sandbox_reaches_only_its_private_loopback():
    """loopback_tcp (for gloo in the training-loop workflow): TCP works inside the sample's own network
    namespace, while a listener on the host's 127.0.0.1 stays unreachable and sees nothing."""
    sb_tcp = Sandbox(min_tier=IsolationTier.NAMESPACES, opt_in=True, loopback_tcp=True)
    with _host_listener() as (listener, port):
        res = run_py(sb_tcp, f"""
        import socket
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
        c = socket.create_connection(srv.getsockname(), timeout=2); a, _ = srv.accept(); c.sendall(b"ok")
        print("private", a.recv(2).decode())
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=1)
            print("HOST CONNECTED")
        except OSError as e:
            print("host refused", e)
        """)
        assert b"private ok" in res.stdout and b"host refused" in res.stdout, res.stderr
        assert b"HOST CONNECTED" not in res.stdout
        with pytest.raises(socket.timeout):
            listener.accept()


def test_writes_outside_the_work_dir_do_not_reach_the_host(sb, tmp_path):
    os.chmod(tmp_path, 0o777)  # even a world-writable host dir must stay untouched
    targets = [str(tmp_path / "owned.txt"), f"/tmp/moecoder-attack-{uuid.uuid4().hex}",
               os.path.join(os.path.dirname(sys.prefix), f"attack-{uuid.uuid4().hex}")]
    res = run_py(sb, f"""
    import os
    for p in {targets!r} + ["/usr/attack", os.path.join(os.__file__ + ".attack")]:
        try:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w") as f:
                f.write("pwned")
            print("wrote", p)
        except OSError as e:
            print("denied", p, e.errno)
    with open("inside.txt", "w") as f:  # the work dir itself is writable
        f.write("ok")
    print("inside ok")
    """)
    assert b"inside ok" in res.stdout
    for p in targets:
        assert not os.path.exists(p), p
    assert not os.path.exists(os.__file__ + ".attack")


@pytest.mark.parametrize("how", ["os.kill(os.getppid(), 9)", "os.kill(-1, 9)", "os.killpg(0, 9)",
                                 "os.kill(1, 9)"])
def test_killing_the_parent_does_not_reach_the_harness(sb, how):
    res = run_py(sb, f"import os\ntry:\n    {how}\nexcept OSError as e:\n    print('denied', e)\nprint('alive')")
    assert res.returncode is not None  # the supervisor reported: the launcher and this process survived
    os.kill(os.getpid(), 0)


def test_double_forked_daemon_is_killed(sb):
    marker = f"daemon-{uuid.uuid4().hex}"
    res = run_py(sb, f"""
    import os, sys
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{marker}"])
        os._exit(0)
    os.wait()
    print("parent done")
    """)
    assert res.returncode == 0 and b"parent done" in res.stdout
    time.sleep(0.2)
    assert procs_with(marker) == []


def test_huge_binary_output_is_capped(sb):
    res = run_py(sb, """
    import os
    chunk = bytes(range(128, 256)) * 8192
    while True:
        os.write(1, chunk)
        os.write(2, chunk)
    """, output_bytes=1 << 16, wall_s=10)
    assert res.output_truncated
    assert len(res.stdout) <= 1 << 16 and len(res.stderr) <= 1 << 16
    assert res.stdout.startswith(bytes(range(128, 256)))


def test_environment_secrets_are_absent(sb, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    monkeypatch.setenv("HF_TOKEN", "hf-secret-value")
    res = run_py(sb, "import os; print(sorted(os.environ.items()))")
    assert b"secret-value" not in res.stdout
    assert b"OPENAI_API_KEY" not in res.stdout and b"HF_TOKEN" not in res.stdout


def test_benchmark_data_is_unreadable(sb):
    from moecoder.evals.tasks.functional import humaneval_data_path

    paths = [str(humaneval_data_path()), "/work/shared/data/HumanEvalPlus.jsonl.gz", "/work/shared/data/mbpp.jsonl",
             os.path.abspath(__file__)]
    res = run_py(sb, f"""
    for p in {paths!r}:
        try:
            open(p, "rb").read(10)
            print("READ", p)
        except OSError as e:
            print("denied", p)
    """)
    assert b"READ" not in res.stdout and res.stdout.count(b"denied") == len(paths)


def test_no_capabilities_and_unprivileged_inside(sb):
    res = run_py(sb, """
    import os, ctypes
    status = open("/proc/self/status").read()
    print([l.split()[1] for l in status.splitlines() if l.startswith("CapEff")][0], os.getuid())
    libc = ctypes.CDLL(None, use_errno=True)
    print("umount", libc.umount2(b"/proc", 2), "unshare", libc.unshare(0x10000000))
    """)
    caps, uid = res.stdout.split(b"\n")[0].split()
    assert int(caps, 16) == 0 and uid != b"0"
    assert b"umount -1 unshare -1" in res.stdout
