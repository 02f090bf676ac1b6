"""Sandbox API: opt-in and tier refusal, the probe report, the boundary codec and call sessions."""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import math

import pytest

from moecoder.evals.sandbox import IsolationTier, Sandbox, SandboxLimits, SandboxRefused, probe
from moecoder.evals.sandbox._codec import CodecError, digest, dumps, loads

# ---------------------------------------------------------------- refusal and probe

def test_refuses_without_opt_in():
    with pytest.raises(SandboxRefused, match="opt-in"):
        Sandbox(min_tier=IsolationTier.NONE, opt_in=False)


def test_refuses_below_the_minimum_tier():
    weak = dataclasses.replace(probe(), tier=IsolationTier.PROCESS)
    with pytest.raises(SandboxRefused, match="PROCESS is below the required NAMESPACES"):
        Sandbox(min_tier=IsolationTier.NAMESPACES, opt_in=True, report=weak)
    assert Sandbox(min_tier=IsolationTier.PROCESS, opt_in=True, report=weak).tier is IsolationTier.PROCESS


def test_probe_report_is_consistent_and_serialisable():
    report = probe()
    d = json.loads(json.dumps(report.to_dict()))
    assert d["tier"] == report.tier.name
    assert IsolationTier.NONE < IsolationTier.PROCESS < IsolationTier.NAMESPACES < IsolationTier.HARDENED
    if report.tier >= IsolationTier.NAMESPACES:
        assert report.launch_ok and all((report.user_ns, report.mount_ns, report.net_ns, report.pid_ns))
    if report.tier is IsolationTier.HARDENED:
        assert report.landlock and report.seccomp
    if report.tier < IsolationTier.NAMESPACES:
        assert report.problems  # says why


def test_limits_reject_nonsense():
    with pytest.raises(ValueError, match="wall_s"):
        SandboxLimits(wall_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=8)


def test_run_rejects_escaping_file_names():
    sb = Sandbox(min_tier=IsolationTier.NAMESPACES, opt_in=True)
    for bad in ("../x.py", "/etc/x.py"):
        with pytest.raises(ValueError, match="relative"):
            sb.run(["python3", "x.py"], files={bad: "pass"})


# ---------------------------------------------------------------- codec

@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, pytest.param(3 ** 5000, id="bigint"), pytest.param(-(5 ** 9000), id="-bigint"), 1.5, float("inf"), "héllo\x00", "", [], (), set(), {},
    [1, (2, "a"), {3: [4.5, None]}], {(1, 2): frozenset({1, 2})}, {"k": {"s", "t"}}, b"\xff\x00", 1 + 2j,
])
def test_codec_round_trips_exact_types(value):
    out = loads(dumps(value))
    assert out == value and type(out) is type(value)
    if isinstance(value, (list, tuple)):
        assert [type(x) for x in out] == [type(x) for x in value]


def test_codec_nan_round_trips():
    assert math.isnan(loads(dumps(float("nan"))))


def test_codec_keeps_bool_int_float_apart():
    assert [type(x) for x in loads(dumps([True, 1, 1.0]))] == [bool, int, float]


class AlwaysEqual:
    def __eq__(self, other):
        return True


class SneakyInt(int):
    def __eq__(self, other):
        return True


class SneakyStr(str):
    pass


class Color(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize("value", [AlwaysEqual(), SneakyInt(3), SneakyStr("a"), Color.RED, [1, SneakyInt(2)],
                                   {"k": AlwaysEqual()}, object(), lambda: 1, collections.deque([1])])
def test_codec_refuses_anything_but_exact_builtins(value):
    with pytest.raises(CodecError):
        dumps(value)


def test_codec_sends_dict_like_stdlib_types_as_plain_dicts():
    out = loads(dumps(collections.Counter("abca")))
    assert type(out) is dict and out == {"a": 2, "b": 1, "c": 1}


@pytest.mark.parametrize("raw", [
    b'{"x": 1}', b'{"l": 1}', b'{"l": [], "t": []}', b'{"s": [{"l": []}]}', b'{"d": [[1]]}',
    b'{"d": [[{"l": []}, 1]]}', b'not json', b'[1, 2]', b'{"ix": 5}', b'{"c": ["a", 1]}',
    b'{"l": [' * 200 + b']}' * 200,
])
def test_codec_rejects_malformed_messages(raw):
    with pytest.raises(CodecError):
        loads(raw)


def test_digest_is_order_independent_and_type_exact():
    assert digest({3, 1, 2}) == digest({1, 2, 3})
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})
    assert digest([1, 2]) != digest((1, 2)) != digest([1.0, 2])


# ---------------------------------------------------------------- call sessions

CODE = """
import collections
calls = []
def add(a, b):
    calls.append(a)
    return a + b
def boom(x):
    raise ValueError(f"bad {x}")
def cheat():
    class Eq:
        def __eq__(self, o): return True
    return Eq()
def count():
    return len(calls)
def spin():
    while True:
        pass
def die():
    import os; os._exit(3)
"""


@pytest.fixture(scope="module")
def sb() -> Sandbox:
    return Sandbox(min_tier=IsolationTier.NAMESPACES, opt_in=True)


def test_call_session_round_trip_and_errors(sb):
    with sb.call_session(CODE, "add", SandboxLimits(wall_s=20)) as s:
        assert s.loaded
        assert s.call([1, 2]).value == 3
        res = s.call([[1], (2,)])
        assert not res.ok and res.kind == "error" and res.error.startswith("TypeError")
        res = s.call(["x"], name="boom")
        assert (res.ok, res.kind, res.error) == (False, "error", "ValueError: bad x")
        res = s.call([], name="cheat")
        assert not res.ok and "cannot cross" in res.error
        assert s.call([], name="count").value == 2  # module state persists across calls
        batch = s.call_many([[1, 1], [2, 2], ["a", 1]])
        assert [r.value for r in batch[:2]] == [2, 4] and batch[2].kind == "error"
        assert not s.call([], name="nope").ok


def test_call_session_timeout_kills_the_interpreter(sb):
    with sb.call_session(CODE, "spin", SandboxLimits(wall_s=20)) as s:
        res = s.call([], timeout=0.5)
        assert res.kind == "timeout"
        assert s.call([1, 2], name="add").kind == "timeout"  # the session is dead from then on


def test_call_session_crash_and_load_failures(sb):
    with sb.call_session(CODE, "die", SandboxLimits(wall_s=20)) as s:
        res = s.call([])
        assert res.kind == "crash" and "exit 3" in res.error
    with sb.call_session("raise SystemExit(0)", "f", SandboxLimits(wall_s=20)) as s:
        assert not s.loaded and s.load_result.kind == "load"
    with sb.call_session("import os\nos._exit(0)", "f", SandboxLimits(wall_s=20)) as s:
        assert not s.loaded and s.load_result.kind == "crash"


def test_call_session_digest_for_large_results(sb):
    with sb.call_session("def f(n): return 'x' * n", "f", SandboxLimits(wall_s=20)) as s:
        small, big = s.call_many([[10], [100000]], digest_over=1000)
        assert small.value == "x" * 10 and small.digest is None
        assert big.value is None and big.digest == digest("x" * 100000)


def test_call_rejects_unsendable_arguments(sb):
    with sb.call_session(CODE, "add", SandboxLimits(wall_s=20)) as s, pytest.raises(ValueError, match="cannot be sent"):
        s.call([object(), 1])


def test_call_server_runs_without_capabilities_or_launcher_fds(sb):
    code = ("import os\ndef probe():\n    caps = [l.split() for l in open('/proc/self/status') if l.startswith('Cap')]\n"
            "    return {k: int(v, 16) for k, v in caps}, os.getuid(), sorted(os.environ)\n")
    with sb.call_session(code, "probe", SandboxLimits(wall_s=20)) as s:
        caps, uid, env = s.call([]).value
    assert set(caps.values()) == {0} and uid != 0
    assert "OPENAI_API_KEY" not in env and "HOME" in env


def test_run_passes_stdin_and_nested_files(sb):
    files = {"pkg/__init__.py": "VALUE = 'nested'", "main.py": "import sys, pkg\nprint(pkg.VALUE, len(sys.stdin.read()))"}
    res = sb.run([sb.python, "main.py"], files=files, stdin=b"x" * 300_000, limits=SandboxLimits(wall_s=20))
    assert res.returncode == 0 and res.stdout == b"nested 300000\n"


def test_sandbox_recovers_when_the_zygote_dies(sb):
    from moecoder.evals.sandbox.runner import _Zygote

    zygote = _Zygote.get()
    zygote.proc.kill()
    zygote.proc.wait()
    res = sb.run([sb.python, "-c", "print(5)"], limits=SandboxLimits(wall_s=20))
    assert res.stdout == b"5\n" and _Zygote.get() is not zygote
