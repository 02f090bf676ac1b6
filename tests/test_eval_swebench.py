"""SWE-bench Lite: instances from a local file, predictions in the official format, grading or skip."""

from __future__ import annotations

import json
import textwrap

import pytest
from fake_openai_server import FakeOpenAIServer, Reply
from typer.testing import CliRunner

from moecoder.cli import UserError, app
from moecoder.evals import swebench
from moecoder.evals.swebench import SweBenchDataError, extract_patch, load_instances

PATCH = textwrap.dedent("""\
    diff --git a/calc/ops.py b/calc/ops.py
    --- a/calc/ops.py
    +++ b/calc/ops.py
    @@ -1,2 +1,2 @@
     def div(a, b):
    -    return a // b
    +    return a / b  # fix
    """)

INSTANCES = [
    {"instance_id": "calc__calc-1", "repo": "calc/calc", "base_commit": "abc123", "version": "1.0",
     "problem_statement": "div(1, 2) returns 0, expected 0.5", "hints_text": "", "FAIL_TO_PASS": "[]",
     "PASS_TO_PASS": "[]"},
    {"instance_id": "calc__calc-2", "repo": "calc/calc", "base_commit": "abc124", "version": "1.0",
     "problem_statement": "add() crashes on None"},
]


def write_instances(tmp_path):
    p = tmp_path / "lite.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in INSTANCES))
    return p


def responder(body, n):
    if "calc-1" in json.dumps(body) or "div(1, 2)" in body["messages"][-1]["content"]:
        return Reply(text=f"The fix:\n```diff\n{PATCH}```\n", usage=(50, 30))
    return Reply(text="I am not sure what to change.", usage=(40, 10))


def run_cli(tmp_path, url, data, *extra):
    return CliRunner().invoke(app, ["eval", "run", "--suite", "swebench-lite", "--backend", "openai", "--model",
                                    "org/fake-coder", "--base-url", url, "--data", str(data), "--out",
                                    str(tmp_path / "run"), "--concurrency", "1", *extra])


def test_extract_patch():
    assert extract_patch(f"```diff\n{PATCH}```") == PATCH
    assert extract_patch(PATCH) == PATCH  # a bare diff
    assert extract_patch(f"```\n{PATCH}```") == PATCH  # untagged but clearly a diff
    assert extract_patch("```python\nx = 1\n```") is None
    assert extract_patch("--- just a dashed line") is None


def test_load_instances_json_and_errors(tmp_path):
    p = tmp_path / "i.json"
    p.write_text(json.dumps(INSTANCES))
    xs = load_instances(p)
    assert [x.task_id for x in xs] == ["calc__calc-1", "calc__calc-2"]
    assert "div(1, 2)" in xs[0].prompts()["instruction"].text and "abc123" in xs[0].prompts()["instruction"].text
    p.write_text(json.dumps([{"instance_id": "x", "repo": "r"}]))
    with pytest.raises(SweBenchDataError, match="base_commit, problem_statement"):
        load_instances(p)
    with pytest.raises(SweBenchDataError, match="not found"):
        load_instances(tmp_path / "missing.jsonl")


def test_predictions_written_and_grading_skipped_without_docker(tmp_path, monkeypatch):
    monkeypatch.setattr(swebench, "docker_usable", lambda: False)
    data = write_instances(tmp_path)
    with FakeOpenAIServer(responder) as srv:
        res = run_cli(tmp_path, srv.url, data, "--allow-exec")
    assert res.exit_code == 0, res.output
    preds = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert preds == [
        {"instance_id": "calc__calc-1", "model_name_or_path": "org/fake-coder", "model_patch": PATCH},
        {"instance_id": "calc__calc-2", "model_name_or_path": "org/fake-coder", "model_patch": ""},
    ]
    assert json.loads((tmp_path / "run" / "swebench.json").read_text())["reason"] == "skipped: no docker"
    assert "| org/fake-coder | — | — | skipped: no docker |" in res.output


def test_grading_reads_the_harness_report(tmp_path, monkeypatch):
    # A stand-in for swebench.harness.run_evaluation with the official CLI and report layout:
    # it resolves every prediction whose patch contains "fix".
    fake = tmp_path / "fake_pkg" / "swebench" / "harness"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "run_evaluation.py").write_text(textwrap.dedent("""\
        import argparse, json
        ap = argparse.ArgumentParser()
        for a in ("--dataset_name", "--predictions_path", "--run_id", "--max_workers"):
            ap.add_argument(a)
        args = ap.parse_args()
        preds = [json.loads(x) for x in open(args.predictions_path)]
        ids = sorted(p["instance_id"] for p in preds if "fix" in p["model_patch"])
        name = preds[0]["model_name_or_path"].replace("/", "__") + "." + args.run_id + ".json"
        json.dump({"resolved_ids": ids, "dataset": args.dataset_name}, open(name, "w"))
        """))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake_pkg"))
    monkeypatch.syspath_prepend(str(tmp_path / "fake_pkg"))
    monkeypatch.setattr(swebench, "docker_usable", lambda: True)
    data = write_instances(tmp_path)
    with FakeOpenAIServer(responder) as srv:
        res = run_cli(tmp_path, srv.url, data, "--allow-exec")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "swebench.json").read_text())
    assert summary["graded"] is True and summary["resolved"] == 1
    assert "| org/fake-coder | — | — | 50.0% |" in res.output  # 1 of 2 instances resolved


def test_grading_needs_allow_exec(tmp_path, monkeypatch):
    monkeypatch.setattr(swebench, "docker_usable", lambda: True)
    data = write_instances(tmp_path)
    with FakeOpenAIServer(responder) as srv:
        res = run_cli(tmp_path, srv.url, data)
    assert res.exit_code == 0, res.output
    assert "skipped: grading needs --allow-exec" in res.output
    assert (tmp_path / "run" / "predictions.jsonl").exists()


def test_swebench_needs_data(tmp_path):
    res = CliRunner().invoke(app, ["eval", "run", "--suite", "swebench-lite", "--backend", "openai", "--model", "m"])
    assert isinstance(res.exception, UserError) and "--data" in str(res.exception)


def test_completion_prompt_continues_an_open_diff_fence():
    inst = swebench.SweInstance("o__r-1", "o/r", "abc", "It breaks.")
    p = inst.prompts()["completion"]
    assert p.text.endswith("```diff\n") and p.continues == "diff"
    patch = "--- a/m.py\n+++ b/m.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"
    # The model's continuation is the diff and its closing fence; the prose before it is not part of the patch.
    assert extract_patch(p.program(patch + "```\nDone.")) == patch
