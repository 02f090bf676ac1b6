"""`moecoder eval run|report|compare` end to end, with fake workflow tasks and a fake OpenAI server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer, Reply
from typer.testing import CliRunner

from moecoder.cli import UserError, app
from moecoder.evals import eval_cli
from moecoder.evals.types import Prompt, Status, Verdict

DATA = Path(os.environ.get("MOECODER_SHARED_DATA", "/work/shared/data"))


@dataclass
class FakeWorkflow:
    """Multi-file task: each required file passes its check when it defines OK."""

    task_id: str
    kind: str
    suite: str = "workflow"

    def prompts(self):
        msg = f"TASK={self.task_id}: write pkg/a.py and pkg/b.py"
        return {"instruction": Prompt(self.task_id, msg, [{"role": "user", "content": msg}], "fake"),
                "completion": Prompt(self.task_id, msg, [], "fake")}

    def evaluate(self, code, sandbox):
        assert sandbox == "fake-sandbox"
        assert isinstance(code, dict)
        for src in code.values():
            try:
                compile(src, "x", "exec")
            except SyntaxError:
                return Verdict(Status.SYNTAX, 0, 2, syntax_ok=False)
        passed = sum("OK" in code.get(p, "") for p in ("pkg/a.py", "pkg/b.py"))
        return Verdict(Status.PASS if passed == 2 else Status.FAIL, passed, 2)


def files(a: str, b: str) -> str:
    return f"### pkg/a.py\n```python\n{a}\n```\n\n### pkg/b.py\n```python\n{b}\n```\n"


ANSWERS = {
    ("wf/a", 0): files("OK = 1", "OK = 2"),  # 2/2
    ("wf/a", 1): files("OK = 1", "x = ("),  # syntax error
    ("wf/b", 0): files("OK = 1", "nope = 1"),  # 1/2
    ("wf/b", 1): files("OK = 1", "nope = 2"),  # 1/2
}


def responder(body, n):
    task = re.search(r"TASK=(\S+):", body["messages"][-1]["content"]).group(1)
    return Reply(text=ANSWERS[(task, body["seed"])], usage=(10, 20), first_delay=0.05)


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(eval_cli, "load_tasks", lambda suite, data: ([FakeWorkflow("wf/a", "Refactoring"),
                                                                      FakeWorkflow("wf/b", "Data engineering")], None))
    monkeypatch.setattr(eval_cli, "make_sandbox", lambda min_tier: ("fake-sandbox", "namespaces"))


def run(url, out, model="gpt-4o", *extra):
    return CliRunner().invoke(app, ["eval", "run", "--suite", "workflows", "--backend", "openai", "--model", model,
                                    "--base-url", url, "--samples", "2", "--seed", "0", "--out", str(out),
                                    "--allow-exec", *extra])


def test_workflow_run_report_and_compare(tmp_path, fakes):
    with FakeOpenAIServer(responder) as srv:
        r1 = run(srv.url, tmp_path / "a")
        r2 = run(srv.url, tmp_path / "b", "deepseek-coder-v2")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    meta = json.loads((tmp_path / "a" / "run.json").read_text())
    assert meta["template_id"] == "instruct-files@1" and meta["sandbox_tier"] == "namespaces"

    res = CliRunner().invoke(app, ["eval", "report", str(tmp_path / "a"), "--html"])
    assert res.exit_code == 0, res.output
    # the review's workflow table: syntax 1/2 and 2/2; logical (1 + 0)/2 and (0.5 + 0.5)/2
    assert re.search(r"\| wf/a \| Refactoring \| 50\.0% \| 50\.0% \| 0\.\d\d s \|", res.output)
    assert re.search(r"\| wf/b \| Data engineering \| 100\.0% \| 50\.0% \| 0\.\d\d s \|", res.output)
    # default prices: GPT-4o $15 / 1M output tokens (input unpriced) -> measured 15.00
    assert "| gpt-4o | — | — | — | 15.00 |" in res.output
    assert (tmp_path / "a" / "report.md").read_text().strip() in res.output
    page = (tmp_path / "a" / "report.html").read_text()
    assert page.count("<img") == 3 and "Refactoring" in page

    res = CliRunner().invoke(app, ["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"),
                                   "--html", str(tmp_path / "cmp.html"), "--review"])
    assert res.exit_code == 0, res.output
    assert "| gpt-4o | — | — | — | 15.00 |" in res.output and "| deepseek-coder-v2 | — | — | — | 0.50 |" in res.output
    assert "| MiniMax M2.7 (review, published) | 82.3% | 78.1% | 33.2% | 2.50 |" in res.output
    assert (tmp_path / "cmp.html").read_text().count("<img") == 3


def test_rerun_resumes_without_requests(tmp_path, fakes):
    with FakeOpenAIServer(responder) as srv:
        assert run(srv.url, tmp_path / "a").exit_code == 0
        res = run(srv.url, tmp_path / "a")
        assert len(srv.hits) == 4
    assert "complete: 0 new samples, 0 requests" in res.output


def test_refuses_to_execute_without_allow_exec():
    proc = subprocess.run([sys.executable, "-m", "moecoder", "eval", "run", "--suite", "humaneval", "--backend",
                           "openai", "--model", "m"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: suite humaneval executes model-written code; pass --allow-exec to run "
                                   "it in the sandbox (or --generate-only to only generate)")


@pytest.mark.parametrize("args,msg", [
    (["--suite", "nope"], "unknown suite"),
    (["--suite", "workflows", "--allow-exec", "--template", "x@1"], "unknown template"),
    (["--suite", "workflows", "--allow-exec", "--backend", "openai"], "needs --model"),
    (["--suite", "workflows", "--allow-exec", "--backend", "openai", "--model", "m", "--api-key-env", "NO_SUCH_VAR_X"],
     "NO_SUCH_VAR_X"),
    (["--suite", "workflows", "--allow-exec", "--backend", "openai", "--model", "unpriced", "--max-usd", "1"],
     "--max-usd needs a price"),
    (["--suite", "workflows", "--allow-exec", "--backend", "local", "--model", "/no/such/dir"], "model folder not found"),
])
def test_bad_input_is_one_clear_error(args, msg, tmp_path, fakes, monkeypatch):
    monkeypatch.delenv("NO_SUCH_VAR_X", raising=False)
    res = CliRunner().invoke(app, ["eval", "run", "--out", str(tmp_path / "r"), *args])
    assert isinstance(res.exception, UserError), res.output
    assert msg in str(res.exception)


def test_report_of_a_non_run_is_an_error(tmp_path):
    res = CliRunner().invoke(app, ["eval", "report", str(tmp_path)])
    assert isinstance(res.exception, UserError) and "not a run directory" in str(res.exception)


@pytest.mark.parametrize("suite,data", [("humaneval", []), ("mbpp", ["--data", str(DATA / "mbpp.jsonl")])])
def test_base_model_without_chat_template_gets_the_completion_template(tmp_path, suite, data):
    """The bundled model has no chat template: HumanEval defaults to continuing the function, MBPP to its
    original [BEGIN] prompt."""
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "moecoder", "eval", "run", "--suite", suite, *data, "--backend", "local",
                          "--limit", "2", "--max-tokens", "16", "--generate-only", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "run.json").read_text())["template_id"] == "completion@1"
