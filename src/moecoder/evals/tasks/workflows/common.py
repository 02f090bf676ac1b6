"""What the three workflow tasks share: prompts from data files, syntax verdicts, sandbox runs, reports.

A workflow's hidden checks run in a harness process next to the candidate's code. The harness only
*measures* (losses, counts, rows) and prints one report line; the trusted parent side decides which
checks passed, so a check's rule never lives in the process the candidate controls.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from moecoder.evals.types import Prompt, Status, Verdict

REPORT_MARKER = "@@WORKFLOW-REPORT"


def data_dir(workflow: str) -> Path:
    """Folder holding a workflow's prompt, harness, reference and flawed solutions."""
    return Path(str(resources.files("moecoder.evals.tasks.workflows") / "data" / workflow))


def read_tree(root: Path) -> dict[str, str]:
    """All text files under `root`, keyed by their path relative to it (posix separators)."""
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in {".py", ".md", ".txt", ".json"} and "__pycache__" not in p.parts
    }


def single_file(code: str | dict[str, str], main: str) -> dict[str, str]:
    """Files of a single-file task. A lone Python file under another name is taken as the main file:
    the contract is about the code, and the file name is the extractor's guess as much as the model's."""
    if isinstance(code, str):
        return {main: code}
    files = dict(code)
    py = [p for p in files if p.endswith(".py")]
    if main not in files and len(py) == 1:
        files[main] = files.pop(py[0])
    return files


def make_prompts(task_id: str, text: str) -> dict[str, Prompt]:
    """Workflows are instruction tasks; the completion style sends the same text unchallenged, and the
    continuation alone is the answer, read as files like an instruction answer."""
    messages = [{"role": "user", "content": text}]
    return {
        "instruction": Prompt(task_id, text, messages, template_id=f"{task_id}-instruction@1"),
        "completion": Prompt(task_id, text, messages, template_id=f"{task_id}-completion@2", code_prefix="",
                             continues="files"),
    }


def compile_files(code: dict[str, str]) -> tuple[int, str]:
    """How many files compile(), and the first error as one line."""
    ok, first_error = 0, ""
    for path, source in sorted(code.items()):
        try:
            compile(source, path, "exec")
            ok += 1
        except (SyntaxError, ValueError) as e:  # ValueError: source with NUL bytes
            first_error = first_error or f"{path}: {type(e).__name__}: {e}"
    return ok, first_error


def syntax_verdict(code: dict[str, str], checks_total: int, required: list[str]) -> Verdict | None:
    """A SYNTAX/EXTRACT verdict when the answer cannot run at all, else None (go on and run checks)."""
    py = {p: s for p, s in code.items() if p.endswith(".py")}
    if not py:
        return Verdict(Status.EXTRACT, 0, checks_total, syntax_ok=False, detail="no Python files in the answer")
    ok, err = compile_files(py)
    if ok < len(py):
        return Verdict(Status.SYNTAX, 0, checks_total, syntax_ok=False, files_compiled=ok, files_total=len(py),
                       detail=err)
    missing = [r for r in required if r not in code]
    if missing:
        return Verdict(Status.FAIL, 0, checks_total, syntax_ok=True, files_compiled=ok, files_total=len(py),
                       detail=f"missing required file(s): {', '.join(missing)}")
    return None


@dataclass
class RunOutcome:
    """One harness run: the sandbox's result plus the parsed report (None when none was printed)."""

    result: Any
    report: dict[str, Any] | None

    def failure_status(self) -> Status | None:
        """TIMEOUT/MEMORY/CRASH when the run itself went wrong, None when a report came back."""
        if getattr(self.result, "timed_out", False):
            return Status.TIMEOUT
        if getattr(self.result, "memory_exceeded", False):
            return Status.MEMORY
        if self.report is None:
            return Status.CRASH
        return None

    def error_line(self) -> str:
        lines = [ln for ln in (self.result.stderr or "").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else f"exit code {self.result.returncode}, no report"


def run_harness(
    sandbox: Any,
    files: dict[str, str],
    script: str,
    config: dict[str, Any],
    *,
    wall_s: float = 60.0,
    memory_mb: int = 2048,
    binds: list[str] | None = None,
    loopback_tcp: bool = False,
) -> RunOutcome:
    """Run `python <script>` with `files` in the sandbox; the harness reads `config` (JSON) on stdin.

    The report marker carries a fresh nonce that the harness reads from stdin before it imports any
    candidate code, so a candidate cannot print a report that the parent would take for the harness's.
    """
    nonce = secrets.token_hex(8)
    payload = json.dumps({**config, "report_marker": f"{REPORT_MARKER}-{nonce}"})
    argv = [sys.executable, "-B", script]
    result = _sandbox_run(sandbox, argv, files, wall_s=wall_s, memory_mb=memory_mb, stdin=payload, binds=binds,
                          loopback_tcp=loopback_tcp)
    return RunOutcome(result, parse_report(result.stdout or "", f"{REPORT_MARKER}-{nonce}"))


def parse_report(stdout: str, marker: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(marker + " "):
            try:
                return json.loads(line[len(marker) + 1:])
            except json.JSONDecodeError:
                return None
    return None


def _sandbox_run(sandbox: Any, argv: list[str], files: dict[str, str], *, wall_s: float, memory_mb: int,
                 stdin: str | None, binds: list[str] | None = None, loopback_tcp: bool = False) -> Any:
    from moecoder.evals.sandbox import SandboxLimits

    if sandbox is None:
        raise ValueError("workflow tasks run candidate code: pass a moecoder.evals.sandbox.Sandbox")
    if binds or loopback_tcp:
        sandbox = derived(sandbox, binds or [], loopback_tcp)
    limits = SandboxLimits(wall_s=wall_s, cpu_s=wall_s, memory_mb=memory_mb, fsize_mb=64, nofile=256,
                           output_bytes=1 << 20)
    r = sandbox.run(argv, files=files, limits=limits, stdin=None if stdin is None else stdin.encode())
    # The sandbox returns bytes; harness reports are text.
    r.stdout = r.stdout.decode("utf-8", "replace") if isinstance(r.stdout, bytes) else r.stdout
    r.stderr = r.stderr.decode("utf-8", "replace") if isinstance(r.stderr, bytes) else r.stderr
    return r


_derived: dict[tuple[int, tuple[str, ...], bool], tuple[Any, Any]] = {}


def derived(sandbox: Any, paths: list[str], loopback_tcp: bool = False) -> Any:
    """The same sandbox plus read-only binds of `paths` (e.g. PostgreSQL's socket directory) and, with
    `loopback_tcp`, TCP on the sample's private loopback (torch.distributed's gloo needs it).

    The caller already opted in by handing us a sandbox; its probe report is reused, not redone."""
    key = (id(sandbox), tuple(sorted(paths)), loopback_tcp)
    if key not in _derived:
        made = type(sandbox)(min_tier=sandbox.tier, opt_in=True, hide=list(sandbox.hide),
                             extra_ro=list(paths), report=sandbox.report, loopback_tcp=loopback_tcp)
        _derived[key] = (sandbox, made)  # holding the original keeps its id from being reused
    return _derived[key][1]


def decide(checks: list[tuple[str, Callable[[], bool]]], base: Verdict) -> Verdict:
    """Apply named check rules (run on the trusted side) and fill in status, counts and the first failure."""
    failed: list[str] = []
    for name, rule in checks:
        try:
            ok = bool(rule())
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):
            ok = False  # a measurement missing or malformed counts as a failed check
        base.measurements.setdefault("checks", {})[name] = ok
        if not ok:
            failed.append(name)
    base.checks_total = len(checks)
    base.checks_passed = len(checks) - len(failed)
    base.status = Status.PASS if not failed else Status.FAIL
    base.detail = "all checks passed" if not failed else "failed: " + ", ".join(failed)
    return base
