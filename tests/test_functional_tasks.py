"""HumanEval / HumanEval+ / MBPP: loaders, trusted-side checks, calibration, and cheating attempts."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from moecoder.evals.sandbox import IsolationTier, Sandbox
from moecoder.evals.tasks import functional as F
from moecoder.evals.tasks.reference import FLOOR_S
from moecoder.evals.types import Status

DATA = Path(os.environ.get("MOECODER_SHARED_DATA", "/work/shared/data"))


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Calibration is computed fresh here, so the tests never depend on a cache left by earlier runs."""
    old = os.environ.get("MOECODER_CACHE_DIR")
    os.environ["MOECODER_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("MOECODER_CACHE_DIR", None)
    else:
        os.environ["MOECODER_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def sb() -> Sandbox:
    return Sandbox(min_tier=IsolationTier.NAMESPACES, opt_in=True)


@pytest.fixture(scope="module")
def humaneval() -> dict[str, F.FunctionTask]:
    return {t.task_id: t for t in F.load_humaneval()}


def body(task: F.FunctionTask, lines: str) -> str:
    """A full module: the task's prompt with `lines` as the function body."""
    return task.prompt + "".join(f"    {line}\n" for line in lines.splitlines())


# ---------------------------------------------------------------- HumanEval

def test_all_164_canonical_solutions_pass(humaneval, sb):
    tasks = list(humaneval.values())
    assert len(tasks) == 164 and len({t.task_id for t in tasks}) == 164
    t0 = time.monotonic()
    verdicts = F.evaluate_many(tasks, [t.reference_program for t in tasks], sb, workers=2)
    failed = {t.task_id: (v.status.value, v.detail) for t, v in zip(tasks, verdicts) if not v.passed}
    assert failed == {}
    assert all(v.measurements["isolation_tier"] == sb.tier.name for v in verdicts)
    print(f"164 canonical HumanEval solutions in {time.monotonic() - t0:.1f}s")


@pytest.mark.parametrize("task_id,lines", [
    ("HumanEval/0", "return None"),
    ("HumanEval/2", "return number % 1.0 + 1e-3"),
    ("HumanEval/13", "import math\nreturn math.gcd(a, b) + 1"),
    ("HumanEval/55", "a, b = 0, 1\nfor _ in range(n + 1):\n    a, b = b, a + b\nreturn a"),
    ("HumanEval/23", "return len(string) - 1"),
    ("HumanEval/33", "return None"),  # its check also calls the function by name
])
def test_known_wrong_solutions_fail(humaneval, sb, task_id, lines):
    v = humaneval[task_id].evaluate(body(humaneval[task_id], lines), sb)
    assert v.status is Status.FAIL, v


def test_completion_without_signature_gets_the_prompt(humaneval, sb):
    task = humaneval["HumanEval/23"]
    v = task.evaluate("    return len(string)\n", sb)
    assert v.passed and v.measurements["prompt_prepended"]


def test_syntax_error_is_reported(humaneval, sb):
    v = humaneval["HumanEval/23"].evaluate("def strlen(string:\n    return 1\n", sb)
    assert v.status is Status.SYNTAX and not v.syntax_ok


CHEATS = {
    "exit_before_tests": "import os\nos._exit(0)",
    "sys_exit_before_tests": "import sys\nsys.exit(0)",
    "infinite_loop_in_call": "while True:\n    pass",
    "memory_blowup": "x = bytearray(1 << 34)\nreturn x",
    "always_equal_object": "class E:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\nreturn E()",
    "int_subclass": "class I(int):\n    def __eq__(self, o): return True\nreturn I(0)",
    "frame_walking": ("import sys\nf = sys._getframe()\nwhile f is not None:\n"
                      "    if 'check' in f.f_globals or 'candidate' in f.f_locals:\n        return 'found'\n"
                      "    f = f.f_back\nreturn None"),
    "patch_builtins": ("import builtins\nbuiltins.AssertionError = type('X', (BaseException,), {})\n"
                       "builtins.len = lambda *a: 0\nreturn None"),
    "settrace_jump": ("import sys\ndef tr(frame, event, arg):\n    if event == 'line' and frame.f_code.co_name == 'check':\n"
                      "        frame.f_lineno = frame.f_code.co_firstlineno + 100\n    return tr\n"
                      "sys.settrace(tr)\nsys._getframe().f_back and sys._getframe().f_back.f_trace\nreturn None"),
    "read_the_benchmark_data": (
        f"import gzip, json\nfor p in [{str(F.humaneval_data_path())!r}, {str(DATA / 'HumanEvalPlus.jsonl.gz')!r}]:\n"
        "    try:\n        for line in gzip.open(p, 'rt'):\n            r = json.loads(line)\n"
        "            if r['task_id'] == 'HumanEval/23':\n                exec(r['prompt'] + r['canonical_solution'])\n"
        "                return len(string)\n    except OSError:\n        pass\nreturn -1"),
    "kill_the_harness": "import os\nfor p in (os.getppid(), -1, 0):\n    try:\n        os.kill(p, 9)\n    except OSError:\n        pass\nreturn -1",
}
# Everything else is FAIL. (kill_the_harness: the server is PID 1 of its namespace, which ignores signals
# sent from inside it, so it survives and returns -1.)
# patch_builtins also breaks the in-sandbox server's own code, so it may end as a crash.
EXPECTED = {"exit_before_tests": {Status.CRASH}, "infinite_loop_in_call": {Status.TIMEOUT},
            "memory_blowup": {Status.MEMORY}, "patch_builtins": {Status.FAIL, Status.CRASH}}


@pytest.mark.parametrize("name", sorted(CHEATS))
def test_cheating_candidates_do_not_pass(humaneval, sb, name):
    task = humaneval["HumanEval/23"]  # strlen(string) -> int
    lines = CHEATS[name]
    if name.endswith("before_tests"):  # module level, before any test runs
        code = f"{lines}\n" + body(task, "return len(string)")
    else:
        code = body(task, lines)
    t0 = time.monotonic()
    v = task.evaluate(code, sb)
    assert not v.passed, v
    assert v.status in EXPECTED.get(name, {Status.FAIL}), v
    assert time.monotonic() - t0 < task.time_limit_s() + 15
    os.kill(os.getpid(), 0)  # the harness is alive


def test_time_limit_comes_from_the_calibration(humaneval, tmp_path, monkeypatch):
    task = humaneval["HumanEval/0"]
    ref = task.reference_result()
    assert ref["ok"] and ref["seconds"] >= 0
    assert task.time_limit_s() >= FLOOR_S
    cache = task.reference.cache_path
    assert cache.is_file()  # cached on disk for the next run
    # A new loader instance reads the cache instead of rerunning references.
    doctored = json.loads(cache.read_text())
    doctored["results"]["HumanEval/0"]["seconds"] = 10.0
    cache.write_text(json.dumps(doctored))
    fresh = F.load_humaneval()[0]
    assert fresh.time_limit_s() == pytest.approx(FLOOR_S + 40.0 + 0.008)


def test_prompts_have_both_styles(humaneval):
    p = humaneval["HumanEval/0"].prompts()
    assert p["completion"].text == humaneval["HumanEval/0"].prompt and p["completion"].stop
    assert p["instruction"].messages[0]["role"] == "user" and "has_close_elements" in p["instruction"].text
    assert p["completion"].template_id == "humaneval-completion@1"


# ---------------------------------------------------------------- HumanEval+

@pytest.fixture(scope="module")
def plus_subset() -> dict[str, F.FunctionTask]:
    tasks = F.load_humaneval_plus(DATA / "HumanEvalPlus.jsonl.gz")
    assert len(tasks) == 164 and all(t.inputs for t in tasks)
    keep = [t for t in tasks if t.task_id in ("HumanEval/2", "HumanEval/13", "HumanEval/32", "HumanEval/53")]
    F._attach_reference(keep, "humaneval+subset", "test")  # compute references for these four only
    return {t.task_id: t for t in keep}


def test_humaneval_plus_canonical_pass_and_wrong_fail(plus_subset, sb):
    for task in plus_subset.values():
        v = task.evaluate(task.reference_program, sb)
        assert v.passed and v.checks_total == len(task.inputs), (task.task_id, v)
    task = plus_subset["HumanEval/53"]  # add(x, y): passes the 5 base-style tests but not the extra inputs
    v = task.evaluate(body(task, "return x + y if x < 1000 else 0"), sb)
    assert v.status is Status.FAIL and 0 < v.checks_passed < v.checks_total


def test_humaneval_plus_float_tolerance(plus_subset, sb):
    task = plus_subset["HumanEval/2"]  # truncate_number: float outputs, atol 1e-6 by EvalPlus's rule
    close = task.evaluate(body(task, "return number % 1.0 + 1e-9"), sb)
    far = task.evaluate(body(task, "return number % 1.0 + 1e-4"), sb)
    assert close.passed and far.status is Status.FAIL


def test_outputs_match_rule():
    assert F._outputs_match(1.0, 1.0 + 1e-8, 0.0, "f", [])
    assert not F._outputs_match(1.0, 1.1, 0.0, "f", [])
    assert F._outputs_match([1.0, 2.0], [1.0, 2.0 + 1e-8], 0.0, "f", [])
    assert not F._outputs_match((1.0, 2.0), [1.0, 2.0], 0.0, "f", [])  # types differ
    assert not F._outputs_match(1, 1.0000001, 0.0, "f", [])  # int vs float: only exact equality
    assert F._outputs_match(2.0, 123.0, 1e-4, "find_zero", [[-4.0, 1.0]]) is False
    assert F._outputs_match(2.0, 123.0, 1e-4, "find_zero", [[-4.0, 2.0]])  # any root is accepted


def test_humaneval_plus_checksum_is_enforced(tmp_path):
    bad = tmp_path / "HumanEvalPlus.jsonl.gz"
    with gzip.open(DATA / "HumanEvalPlus.jsonl.gz", "rt") as src, gzip.open(bad, "wt") as dst:
        dst.write(src.readline())
    with pytest.raises(F.DataChecksumError, match="does not match the published"):
        F.load_humaneval_plus(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        F.load_humaneval_plus(tmp_path / "missing.jsonl.gz")


# ---------------------------------------------------------------- MBPP

@pytest.fixture(scope="module")
def mbpp() -> dict[str, F.FunctionTask]:
    tasks = {t.task_id: t for t in F.load_mbpp(DATA / "mbpp.jsonl")}
    used = [tasks[i] for i in ("Mbpp/11", "Mbpp/40", "Mbpp/88", "Mbpp/17", "Mbpp/100")]
    F._attach_reference(used, "mbpp-subset", "test")  # calibrate only what these tests evaluate
    return tasks


def test_mbpp_loads_the_test_split(mbpp):
    skipped = F.MBPP_SKIPPED["mbpp"]
    assert len(mbpp) + len(skipped) == 500 and set(skipped) == {"Mbpp/367"}
    task = mbpp["Mbpp/11"]
    assert task.entry_point == "remove_Occ" and len(task.asserts) == 3
    assert "remove_Occ" in task.prompts()["instruction"].text


@pytest.mark.parametrize("task_id", ["Mbpp/11", "Mbpp/40", "Mbpp/88", "Mbpp/17", "Mbpp/100"])
def test_mbpp_reference_passes(mbpp, sb, task_id):
    task = mbpp[task_id]
    v = task.evaluate(task.reference_program, sb)
    assert v.passed and v.checks_passed == v.checks_total == len(task.asserts), v


def test_mbpp_completion_prompt_is_the_original_format_and_its_answer_stands_alone(mbpp, sb):
    """[BEGIN] ... [DONE]: the prompt is prose, so the program is the continuation alone, cut at [DONE] or
    where a base model goes on to write tests."""
    task = mbpp["Mbpp/11"]
    p = task.prompts()["completion"]
    assert p.text.endswith("[BEGIN]\n") and task.asserts[0] in p.text and p.code_prefix == ""
    program = p.program(task.reference_program + "\n[DONE]\nYou are an expert ...")
    assert program == task.reference_program + "\n"
    assert p.program(task.reference_program + "\n" + task.asserts[0] + "\n") == task.reference_program
    assert task.evaluate(program, sb).passed
    # HumanEval's completion prompt is code: its continuation extends it.
    he = F.load_humaneval()[0].prompts()["completion"]
    assert he.code_prefix is None and he.program("    return True\n\ndef x():\n") == he.text + "    return True\n"


def test_mbpp_wrong_solution_and_cheats_fail(mbpp, sb):
    task = mbpp["Mbpp/11"]
    v = task.evaluate("def remove_Occ(s, ch):\n    return s[1:-1]\n", sb)
    assert v.status is Status.FAIL and v.checks_passed < v.checks_total
    v = task.evaluate("class E(str):\n    def __eq__(s, o): return True\ndef remove_Occ(s, ch):\n    return E(s)\n", sb)
    assert v.status is Status.FAIL and v.checks_passed == 0
    v = task.evaluate("import sys\nsys.exit(0)\n", sb)
    assert not v.passed


def test_mbpp_sanitized_from_a_user_file(tmp_path, sb):
    rec = {"source_file": "x", "task_id": 12, "prompt": "Sort a matrix by row sums.",
           "code": "def sort_matrix(M):\n    return sorted(M, key=sum)",
           "test_imports": [], "test_list": ["assert sort_matrix([[1, 2], [0]]) == [[0], [1, 2]]"]}
    path = tmp_path / "sanitized-mbpp.json"
    path.write_text(json.dumps([rec, {**rec, "task_id": 600}]))
    tasks = F.load_mbpp(path, subset="sanitized")
    assert [t.task_id for t in tasks] == ["Mbpp/12"] and tasks[0].suite == "mbpp-sanitized"
    assert tasks[0].evaluate(rec["code"], sb).passed
    with pytest.raises(ValueError, match="subset"):
        F.load_mbpp(path, subset="plus")


def test_mbpp_checksum_is_enforced(tmp_path):
    copy = tmp_path / "mbpp.jsonl"
    shutil.copy(DATA / "mbpp.jsonl", copy)
    with copy.open("a") as f:
        f.write("\n")
    with pytest.raises(F.DataChecksumError):
        F.load_mbpp(copy)
