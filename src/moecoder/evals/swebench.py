"""SWE-bench Lite: predictions in the official JSONL format, graded by the official harness.

Instances come from a local JSON or JSONL file with at least instance_id, repo, base_commit and
problem_statement (the fields of princeton-nlp/SWE-bench_Lite); a `text` field, as in the
retrieval variants of the dataset, is used as the prompt when present. moecoder only writes
`predictions.jsonl` ({"instance_id", "model_name_or_path", "model_patch"}); grading runs the
`swebench` package's harness, which builds Docker images, so without a working `docker info`
the suite is reported as `skipped: no docker` and nothing is claimed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecoder.evals.extract import fenced_blocks
from moecoder.evals.types import Prompt, Status, Verdict

REQUIRED = ("instance_id", "repo", "base_commit", "problem_statement")
SUITE = "swebench-lite"


class SweBenchDataError(ValueError):
    """The instances file is missing, unreadable, or lacks required fields."""


@dataclass
class SweInstance:
    """One SWE-bench instance as a Task; its verdict comes from the batch harness, not `evaluate`."""

    task_id: str
    repo: str
    base_commit: str
    problem_statement: str
    hints_text: str = ""
    text: str = ""  # a ready-made prompt (retrieval variants of the dataset)
    raw: dict[str, Any] = field(default_factory=dict)
    suite: str = SUITE
    kind: str = "Issue resolution"

    def prompts(self) -> dict[str, Prompt]:
        body = self.text or (
            f"Repository: {self.repo} (at commit {self.base_commit})\n\n"
            f"Issue:\n{self.problem_statement.strip()}\n"
            + (f"\nHints:\n{self.hints_text.strip()}\n" if self.hints_text.strip() else "")
            + "\nWrite a patch that resolves the issue."
        )
        msgs = [{"role": "user", "content": body}]
        return {
            "instruction": Prompt(self.task_id, body, msgs, "swebench-instruction"),
            # The continuation is the diff the prompt's open fence starts (read as a patch, not after the prose).
            "completion": Prompt(self.task_id, body + "\n\n```diff\n", msgs, "swebench-completion@2", stop=["\n```"],
                                 code_prefix="```diff\n", continues="diff"),
        }

    def evaluate(self, code: str | dict[str, str], sandbox: Any) -> Verdict:
        return Verdict(Status.SKIPPED, syntax_ok=True, detail="graded in batch by the swebench harness")


def load_instances(path: str | Path) -> list[SweInstance]:
    """Instances from a JSON list or JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise SweBenchDataError(f"SWE-bench instances file not found: {p}")
    text = p.read_text()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise SweBenchDataError(f"{p} is neither a JSON list nor JSONL: {e}") from None
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if not isinstance(row, dict) or k not in row]
        if missing:
            raise SweBenchDataError(f"{p}: instance {i} lacks {', '.join(missing)}")
        out.append(SweInstance(row["instance_id"], row["repo"], row["base_commit"], row["problem_statement"],
                               row.get("hints_text") or "", row.get("text") or "", row))
    return out


def extract_patch(text: str) -> str | None:
    """The unified diff in an answer: a ```diff/```patch block, else an untagged block that looks like
    a diff, else the raw answer when it starts as one. None when there is no diff."""
    looks = re.compile(r"^(diff --git |--- )", re.MULTILINE)
    blocks = fenced_blocks(text)
    chosen = [b for b in blocks if b.lang in ("diff", "patch")] or [b for b in blocks if not b.lang and looks.search(b.code)]
    patch = chosen[0].code if chosen else (text if looks.match(text.lstrip()) else None)
    if not patch or not re.search(r"^\+\+\+ ", patch, re.MULTILINE):
        return None
    return patch if patch.endswith("\n") else patch + "\n"


def write_predictions(run_dir: Path, records: list[dict[str, Any]], model_name: str) -> Path:
    """predictions.jsonl in the harness's format: sample 0 of each instance, "" where no patch was found."""
    path = run_dir / "predictions.jsonl"
    rows = [
        {"instance_id": r["task_id"], "model_name_or_path": model_name, "model_patch": r.get("extracted") or ""}
        for r in sorted(records, key=lambda r: r["task_id"])
        if r["sample"] == 0 and r["status"] != Status.INFRA.value
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in rows))
    tmp.replace(path)
    return path


def docker_usable() -> bool:
    """True when a Docker daemon answers (`docker info` exits 0)."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def grade(run_dir: Path, records: list[dict[str, Any]], model_name: str, dataset: str,
          max_workers: int = 4) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write predictions, grade them when Docker and `swebench` are usable, and return the records
    (graded ones appended to samples.jsonl as superseding lines) with a summary saved in swebench.json."""
    preds = write_predictions(run_dir, records, model_name)
    summary: dict[str, Any] = {"predictions": str(preds.name), "graded": False}
    if not docker_usable():
        summary["reason"] = "skipped: no docker"
    else:
        try:
            import swebench  # noqa: F401  (only to check it is installed)
        except ImportError:
            summary["reason"] = "skipped: the swebench package is not installed (pip install swebench)"
    if "reason" not in summary:
        run_id = f"moecoder-{run_dir.name}"
        cmd = [sys.executable, "-m", "swebench.harness.run_evaluation", "--dataset_name", dataset,
               "--predictions_path", str(preds.resolve()), "--run_id", run_id, "--max_workers", str(max_workers)]
        proc = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True, check=False)
        report = run_dir / f"{model_name.replace('/', '__')}.{run_id}.json"
        if proc.returncode != 0 or not report.exists():
            summary["reason"] = f"harness failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
        else:
            resolved = set(json.loads(report.read_text()).get("resolved_ids", []))
            summary.update(graded=True, report=report.name, resolved=len(resolved))
            records = _apply_grades(run_dir, records, resolved)
    tmp = run_dir / "swebench.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(run_dir / "swebench.json")
    return records, summary


def _apply_grades(run_dir: Path, records: list[dict[str, Any]], resolved: set[str]) -> list[dict[str, Any]]:
    out = []
    with open(run_dir / "samples.jsonl", "a") as f:
        for r in records:
            if r["sample"] == 0 and r["status"] == Status.SKIPPED.value:
                ok = r["task_id"] in resolved
                r = {**r, "status": "pass" if ok else "fail", "checks_passed": int(ok), "checks_total": 1,
                     "detail": "resolved" if ok else "not resolved"}
                f.write(json.dumps(r, sort_keys=True) + "\n")
            out.append(r)
    return out
