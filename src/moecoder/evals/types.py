"""Types shared by the evaluation layers (tasks, sandbox, backends, metrics, reports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from moecoder.evals.extract import truncate_at_stop


class Status(str, Enum):
    """Outcome of one sample. Exactly one per sample."""

    PASS = "pass"
    FAIL = "fail"  # ran, some check failed
    TIMEOUT = "timeout"  # wall-clock or CPU limit
    MEMORY = "memory"  # address-space limit / MemoryError
    CRASH = "crash"  # the candidate process died (signal, exit before reporting, protocol abuse)
    SYNTAX = "syntax"  # extracted code does not compile
    EXTRACT = "extract"  # no code could be extracted from the model output
    INFRA = "infra"  # generation failed after retries (HTTP errors), not the model's fault
    SKIPPED = "skipped"  # generated but not graded (e.g. SWE-bench Lite without Docker)


@dataclass
class Verdict:
    """What the trusted side decided about one candidate."""

    status: Status
    checks_passed: int = 0
    checks_total: int = 0
    syntax_ok: bool = True
    files_compiled: int = 0  # multi-file answers: files that compile()
    files_total: int = 0
    detail: str = ""  # short human-readable reason (first failing check, error line)
    measurements: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status is Status.PASS

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "checks_passed": self.checks_passed,
            "checks_total": self.checks_total,
            "syntax_ok": self.syntax_ok,
            "files_compiled": self.files_compiled,
            "files_total": self.files_total,
            "detail": self.detail,
            "measurements": self.measurements,
        }


@dataclass
class Prompt:
    """What a backend is asked. `text` for completion-style, `messages` for chat-style."""

    task_id: str
    text: str
    messages: list[dict[str, str]]
    template_id: str  # e.g. "humaneval-completion@1"
    stop: list[str] = field(default_factory=list)
    # Completion style: the code the continuation extends, prepended to it to make the program. None: the
    # prompt text itself (HumanEval's signature + docstring); "" for a prompt in prose (MBPP's [BEGIN] format).
    code_prefix: str | None = None
    # Completion style: what the program is read as: "code" (one module, as it is), "files" (### path + fenced
    # blocks) or "diff" (a patch).
    continues: str = "code"

    def program(self, continuation: str) -> str:
        """The program a completion-style answer makes: code prefix + the continuation cut at the first stop."""
        prefix = self.text if self.code_prefix is None else self.code_prefix
        return prefix + truncate_at_stop(continuation, self.stop)


class Task(Protocol):
    """One evaluation problem. Tasks own their checks; the executor never knows a task's logic."""

    task_id: str
    suite: str  # "humaneval", "humaneval+", "mbpp", "mbpp-sanitized", "workflow", "swebench-lite"
    kind: str  # task type for reports: "Code generation", "Refactoring", "Data engineering", ...

    def prompts(self) -> dict[str, Prompt]:
        """Prompt per template style: {"completion": ..., "instruction": ...}."""
        ...

    def evaluate(self, code: str | dict[str, str], sandbox: Any) -> Verdict:
        """Decide a verdict for extracted code (a module, or files by path) using the sandbox."""
        ...
