"""End-to-end runs: fake tasks, the real OpenAI backend, a loopback fake server; numbers checked by hand."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer, Reply

from moecoder.evals.backends.base import Sampling
from moecoder.evals.backends.openai_http import OpenAIBackend
from moecoder.evals.prices import PriceTable
from moecoder.evals.report import html_report, load_summary, markdown_report
from moecoder.evals.runner import RunConfig, RunError, Runner, load_records
from moecoder.evals.templates import get_template
from moecoder.evals.types import Prompt, Status, Verdict

SECRET = "sk-test-SECRET-42"


@dataclass
class FakeTask:
    """A function task whose checks run the (scripted, trusted) answer in-process."""

    task_id: str
    entry_point: str
    checks: list[tuple[tuple, object]]
    suite: str = "humaneval"
    kind: str = "Code generation"
    evaluated: list[str] = field(default_factory=list)

    def prompts(self):
        msg = f"TASK={self.task_id}: write {self.entry_point}(a, b)"
        return {"instruction": Prompt(self.task_id, msg, [{"role": "user", "content": msg}], "fake"),
                "completion": Prompt(self.task_id, f"def {self.entry_point}(a, b):\n", [], "fake", stop=["\ndef "])}

    def evaluate(self, code, sandbox):
        self.evaluated.append(code)
        ns: dict = {}
        exec(code, ns)  # noqa: S102  (scripted answers written in this file, not model output)
        fn = ns.get(self.entry_point)
        if fn is None:
            return Verdict(Status.FAIL, 0, len(self.checks), detail=f"{self.entry_point} not defined")
        passed = sum(fn(*args) == want for args, want in self.checks)
        status = Status.PASS if passed == len(self.checks) else Status.FAIL
        return Verdict(status, passed, len(self.checks))


def tasks():
    return [
        FakeTask("add", "add", [((1, 2), 3), ((0, 0), 0), ((2, 0), 2), ((5, 5), 10)]),
        FakeTask("sub", "sub", [((3, 1), 2)]),
        FakeTask("mul", "mul", [((2, 3), 6), ((0, 1), 0)]),
    ]


def fence(code: str) -> str:
    return f"Here you go:\n```python\n{code}```\nDone."


# (task, sample) -> reply. Sample i is told apart by its seed (seed + i).
SCRIPT = {
    ("add", 0): Reply(text=fence("def add(a, b):\n    return a + b\n"), usage=(100, 40), first_delay=0.2),
    ("add", 1): Reply(text=fence("def add(a, b):\n    return a - b\n"), usage=(100, 50)),  # 2 of 4 checks
    ("sub", 0): Reply(text=fence("def sub(a, b)\n    return a - b\n"), usage=(120, 30)),  # syntax error
    ("sub", 1): Reply(text="I cannot help with that.", usage=(120, 20)),  # nothing to extract
    ("mul", 0): Reply(status=500),  # every attempt fails -> infra
    ("mul", 1): Reply(text=fence("def mul(a, b):\n    return a * b\n"), usage=(80, 60)),
}


def responder(body, n):
    task = re.search(r"TASK=(\w+)", body["messages"][-1]["content"]).group(1)
    return SCRIPT[(task, body["seed"] - 7)]


def prices(tmp_path: Path, out: float = 2.50, inp: float = 0.50) -> PriceTable:
    p = tmp_path / "prices.toml"
    p.write_text(f'[models."fake-coder"]\noutput = {out}\ninput = {inp}\n')
    return PriceTable.load(p)


def make_runner(tmp_path, url, task_list, *, out="run", concurrency=2, max_usd=None, table=None, **kw):
    be = OpenAIBackend(model="fake-coder", base_url=url, api_key_env="FAKE_API_KEY", max_retries=1,
                       backoff_base=0.01, jitter_seed=0)
    cfg = RunConfig(suite="humaneval", out_dir=tmp_path / out, template=get_template("instruct-md@1"),
                    sampling=Sampling(temperature=0.8, seed=7, max_tokens=64), samples=2,
                    concurrency=concurrency, max_usd=max_usd)
    return Runner(cfg, be, task_list, prices=table or prices(tmp_path), **kw)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("FAKE_API_KEY", SECRET)


def test_full_run_reproduces_hand_computed_report(tmp_path):
    with FakeOpenAIServer(responder) as srv:
        result = make_runner(tmp_path, srv.url, tasks()).run()
    assert result.state == "complete" and result.new_samples == 6
    assert len(srv.hits) == 5 + 2  # five answers, and mul#0 tried twice (1 retry) before infra
    recs = {(r["task_id"], r["sample"]): r for r in load_records(tmp_path / "run")}
    assert {k: r["status"] for k, r in recs.items()} == {
        ("add", 0): "pass", ("add", 1): "fail", ("sub", 0): "syntax", ("sub", 1): "extract",
        ("mul", 0): "infra", ("mul", 1): "pass"}
    assert recs[("add", 1)]["checks_passed"] == 2 and recs[("add", 1)]["checks_total"] == 4
    assert recs[("add", 0)]["raw"] == SCRIPT[("add", 0)].text  # raw and extracted are both kept
    assert recs[("add", 0)]["extracted"] == "def add(a, b):\n    return a + b\n"
    assert recs[("add", 0)]["ttft_s"] >= 0.2  # streaming TTFT
    assert "HTTP 500" in recs[("mul", 0)]["error"] and recs[("mul", 0)]["attempts"] == 2
    # cost of add#0 by hand: (100 * 0.50 + 40 * 2.50) / 1e6
    assert recs[("add", 0)]["cost_usd"] == pytest.approx(150e-6)

    s = load_summary(tmp_path / "run")
    a = s.overall
    # Scored samples exclude the infra one: 5. Passes 2, syntax ok 3 (pass, fail, pass).
    assert a["pass_rate"] == pytest.approx(2 / 5)
    assert a["pass@1"] == pytest.approx((1 / 2 + 0 / 2 + 1 / 1) / 3)  # per task c/n, averaged
    assert "pass@2" not in a  # mul has only one scored sample
    assert a["syntax_accuracy"] == pytest.approx(3 / 5)
    assert a["logical_correctness"] == pytest.approx((1 + 0.5 + 0 + 0 + 1) / 5)
    assert (a["input_tokens"], a["output_tokens"]) == (520, 200)
    cost = (520 * 0.50 + 200 * 2.50) / 1e6
    assert a["cost_usd"] == pytest.approx(cost)
    assert a["usd_per_1m_output_tokens"] == pytest.approx(cost / 200 * 1e6)  # 3.80
    assert a["usd_per_solved_task"] == pytest.approx(cost / 2)  # add and mul solved
    md = markdown_report([s])
    assert "| fake-coder | 50.0% | — | — | 3.80 |" in md
    assert "| pass@1=50.0% | 40.0% [11.8–76.9] |" in md  # Wilson 95% CI of 2/5: by hand in test_eval_metrics
    assert "60.0% [23.1–88.2]" in md  # 3/5
    assert "$0.0008" in md and "$0.0004" in md
    assert "extract 1, fail 1, infra 1, pass 2, syntax 1" in md
    page = html_report([s])
    assert page.count("data:image/png;base64,") == 3 and "3.80" in page

    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["state"] == "complete" and meta["backend"]["api_key_env"] == "FAKE_API_KEY"
    assert meta["template_id"] == "instruct-md@1" and meta["sampling"]["temperature"] == 0.8
    assert len(meta["task_ids_sha256"]) == 64 and meta["versions"]["python"]
    for f in (tmp_path / "run").rglob("*"):  # the key is never written anywhere
        if f.is_file():
            assert SECRET not in f.read_text(errors="replace"), f


def test_interrupted_run_resumes_without_redoing_samples(tmp_path):
    calls = []

    def stop_after_three(rec):
        calls.append(rec["key"])
        if len(calls) == 3:
            raise KeyboardInterrupt

    only_ok = {k: v for k, v in SCRIPT.items() if v.status == 200}
    with FakeOpenAIServer(lambda body, n: only_ok.get(
            (re.search(r"TASK=(\w+)", body["messages"][-1]["content"]).group(1), body["seed"] - 7),
            SCRIPT[("mul", 1)])) as srv:
        ts = tasks()
        with pytest.raises(KeyboardInterrupt):
            make_runner(tmp_path, srv.url, ts, concurrency=1, on_record=stop_after_three).run()
        # three samples recorded; the fourth request was already in flight and its answer is cached
        assert len(srv.hits) == 4
        assert json.loads((tmp_path / "run" / "run.json").read_text())["state"] == "interrupted"
        assert len(load_records(tmp_path / "run")) == 3
        result = make_runner(tmp_path, srv.url, ts, concurrency=1).run()
        assert result.state == "complete" and result.new_samples == 3 and result.cached_generations == 1
        assert len(srv.hits) == 6  # only the two samples never requested were requested
        again = make_runner(tmp_path, srv.url, ts, concurrency=1).run()
        assert again.new_samples == 0 and len(srv.hits) == 6
    assert json.loads((tmp_path / "run" / "run.json").read_text())["invocations"] == 3
    assert len(load_records(tmp_path / "run")) == 6


def test_generate_only_then_evaluate_uses_the_cache(tmp_path):
    ts = tasks()
    with FakeOpenAIServer(responder) as srv:
        runner = make_runner(tmp_path, srv.url, ts)
        runner.cfg.generate_only = True
        r1 = runner.run()
        assert r1.state == "generated" and len(srv.hits) == 7 and not any(t.evaluated for t in ts)
        assert [r["status"] for r in load_records(tmp_path / "run")] == ["infra"]  # only the failed one
        r2 = make_runner(tmp_path, srv.url, ts).run()
        # five answers come from the cache; only the infra sample is asked again (twice: 1 retry)
        assert r2.cached_generations == 5 and len(srv.hits) == 9 and r2.state == "complete"
    assert len(load_records(tmp_path / "run")) == 6


def test_spending_cap_stops_cleanly_and_persists(tmp_path):
    table = prices(tmp_path, out=1000.0, inp=0.0)  # 40 output tokens = $0.04
    flat = Reply(text=fence("def add(a, b):\n    return a + b\n"), usage=(10, 40))
    with FakeOpenAIServer(lambda body, n: flat) as srv:
        r = make_runner(tmp_path, srv.url, tasks(), concurrency=1, max_usd=0.10, table=table).run()
        assert r.state == "stopped: spending cap"
        assert len(srv.hits) == 3 and r.spent_usd == pytest.approx(0.12)  # stops once 0.12 >= 0.10
        assert len(load_records(tmp_path / "run")) == 3
        r = make_runner(tmp_path, srv.url, tasks(), concurrency=1, max_usd=0.10, table=table).run()
        assert r.state == "stopped: spending cap" and len(srv.hits) == 3  # the cap survives a restart
        r = make_runner(tmp_path, srv.url, tasks(), concurrency=1, max_usd=1.0, table=table).run()
        assert r.state == "complete" and len(srv.hits) == 6
    assert json.loads((tmp_path / "run" / "run.json").read_text())["spent_usd"] == pytest.approx(0.24)


def test_cap_without_a_price_is_refused(tmp_path):
    be = OpenAIBackend(model="unpriced-model", base_url="http://127.0.0.1:9/v1")
    cfg = RunConfig(suite="humaneval", out_dir=tmp_path / "r", template=get_template("instruct-md@1"), max_usd=1.0)
    with pytest.raises(RunError, match="unpriced-model"):
        Runner(cfg, be, tasks(), prices=PriceTable.load())


def test_a_run_directory_refuses_other_settings(tmp_path):
    flat = Reply(text=fence("def add(a, b):\n    return a + b\n"), usage=(1, 1))
    with FakeOpenAIServer(lambda body, n: flat) as srv:
        make_runner(tmp_path, srv.url, tasks()[:1]).run()
        r = make_runner(tmp_path, srv.url, tasks()[:1])
        r.cfg.sampling = Sampling(temperature=0.2, seed=7)
        with pytest.raises(RunError, match="sampling"):
            r.run()


def test_a_torn_last_line_loses_only_that_sample(tmp_path):
    flat = Reply(text=fence("def add(a, b):\n    return a + b\n"), usage=(1, 1))
    with FakeOpenAIServer(lambda body, n: flat) as srv:
        make_runner(tmp_path, srv.url, tasks()[:1]).run()
        log = tmp_path / "run" / "samples.jsonl"
        lines = log.read_text().splitlines(keepends=True)
        log.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing the second record
        assert len(load_records(tmp_path / "run")) == 1
        r = make_runner(tmp_path, srv.url, tasks()[:1]).run()
        assert r.new_samples == 1 and r.cached_generations == 1 and len(srv.hits) == 2  # answer came from cache
    assert len(load_records(tmp_path / "run")) == 2


def test_concurrency_is_bounded(tmp_path):
    slow = Reply(text=fence("def add(a, b):\n    return a + b\n"), usage=(1, 1), first_delay=0.15)
    with FakeOpenAIServer(lambda body, n: slow) as srv:
        ts = [FakeTask(f"t{i}", "add", [((1, 2), 3)]) for i in range(4)]
        r = make_runner(tmp_path, srv.url, ts, concurrency=3).run()
    assert r.new_samples == 8 and srv.max_active == 3


@dataclass
class ProseTask(FakeTask):
    """A completion prompt in prose, as MBPP's: the continuation alone is the program."""

    def prompts(self):
        text = f"TASK={self.task_id}: write {self.entry_point}(a, b). Tests:\nassert {self.entry_point}(1, 2) == 3\n[BEGIN]\n"
        return {"completion": Prompt(self.task_id, text, [], "fake-prose", stop=["[DONE]", "\nassert "], code_prefix="")}


def test_completion_answers_to_prose_and_code_prompts_are_programs(tmp_path):
    """A code prompt's continuation extends the prompt (HumanEval); a prose prompt's stands alone (MBPP's
    [BEGIN] format: prepending the prose would make every answer a syntax error)."""
    replies = {"add": Reply(text="def add(a, b):\n    return a + b\n[DONE]\nnoise", usage=(30, 12)),
               "sub": Reply(text="def sub(a, b):\n    return a - b\n\nassert sub(1, 2) == 5\n", usage=(30, 12)),
               "mul": Reply(text="    return a * b\n\ndef other():\n", usage=(30, 8))}

    def answer(body, n):
        prompt = body["prompt"]
        return replies[re.search(r"TASK=(\w+)", prompt).group(1) if "TASK=" in prompt else "mul"]

    task_list = [ProseTask("add", "add", [((1, 2), 3)]), ProseTask("sub", "sub", [((3, 1), 2)]),
                 FakeTask("mul", "mul", [((2, 3), 6)])]
    with FakeOpenAIServer(answer) as srv:
        be = OpenAIBackend(model="fake-coder", base_url=srv.url, api_key_env="FAKE_API_KEY", api="completions",
                           max_retries=0)
        cfg = RunConfig(suite="mbpp", out_dir=tmp_path / "run", template=get_template("completion@1"),
                        sampling=Sampling(max_tokens=64), samples=1)
        assert Runner(cfg, be, task_list, prices=prices(tmp_path)).run().state == "complete"
    recs = {r["task_id"]: r for r in load_records(tmp_path / "run")}
    assert recs["add"]["extracted"] == "def add(a, b):\n    return a + b\n"
    assert recs["sub"]["extracted"] == "def sub(a, b):\n    return a - b\n"  # cut at the model's own test
    assert recs["mul"]["extracted"] == "def mul(a, b):\n    return a * b\n"  # prompt + body, cut at "\ndef "
    assert {k: r["status"] for k, r in recs.items()} == {"add": "pass", "sub": "pass", "mul": "pass"}


@dataclass
class ShapedTask(FakeTask):
    """A prose completion prompt whose continuation is a patch (SWE-bench) or files (workflows)."""

    continues: str = "diff"

    def prompts(self):
        text = f"TASK={self.task_id}: fix it.\n\n" + ("```diff\n" if self.continues == "diff" else "")
        prefix = "```diff\n" if self.continues == "diff" else ""
        stop = ["\n```"] if self.continues == "diff" else []
        return {"completion": Prompt(self.task_id, text, [], "fake-shaped", stop=stop, code_prefix=prefix,
                                     continues=self.continues)}

    def evaluate(self, code, sandbox):
        self.evaluated.append(code)
        return Verdict(Status.PASS, 1, 1)


PATCH = "--- a/m.py\n+++ b/m.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"


def test_completion_answers_read_as_patches_and_files(tmp_path):
    """A continuation is read as what its prompt asks for: the diff an open ```diff fence starts, or files."""
    diff_task = ShapedTask("fix", "fix", [], continues="diff")
    files_task = ShapedTask("files", "files", [], continues="files")
    replies = {"fix": Reply(text=PATCH + "```\nThat should do it.", usage=(20, 20)),
               "files": Reply(text="### m.py\n```python\nx = 2\n```\n", usage=(20, 20))}
    with FakeOpenAIServer(lambda body, n: replies[re.search(r"TASK=(\w+)", body["prompt"]).group(1)]) as srv:
        be = OpenAIBackend(model="fake-coder", base_url=srv.url, api_key_env="FAKE_API_KEY", api="completions",
                           max_retries=0)
        out = tmp_path
        cfg = RunConfig(suite="swebench-lite", out_dir=out / "run", template=get_template("completion@1"),
                        sampling=Sampling(max_tokens=64), samples=1)
        assert Runner(cfg, be, [diff_task, files_task], prices=prices(out)).run().state == "complete"
    recs = {r["task_id"]: r for r in load_records(out / "run")}
    assert recs["fix"]["extracted"] == PATCH and recs["fix"]["status"] == "pass"
    assert recs["files"]["extracted"] == {"m.py": "x = 2\n"} and recs["files"]["status"] == "pass"
    assert diff_task.evaluated == [PATCH] and files_task.evaluated == [{"m.py": "x = 2\n"}]
