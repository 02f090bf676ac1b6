"""The local backend on a tiny random checkpoint: same text as moecoder.generate, exact token counts,
TTFT, stop strings, and time-priced cost through the runner."""

from __future__ import annotations

import pytest
from checkpoint_fixtures import tiny_checkpoint

from moecoder.checkpoint import load_checkpoint
from moecoder.evals.backends.base import BackendError, Sampling
from moecoder.evals.backends.local import LocalBackend
from moecoder.evals.runner import RunConfig, Runner, load_records
from moecoder.evals.templates import get_template
from moecoder.evals.types import Prompt, Status, Verdict
from moecoder.generate import SamplingParams, generate_text
from moecoder.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def prompt(stop=()):
    return Prompt("t", "def square(x):", [], "completion@1", stop=list(stop))


def test_matches_the_library_generation(model_dir):
    be = LocalBackend(model_dir, chat=False)
    g = be.generate(prompt(), Sampling(temperature=0.0, max_tokens=12))
    ckpt, tok = load_checkpoint(model_dir), Tokenizer.from_dir(model_dir)
    ids = tok.encode("def square(x):")
    want = generate_text(ckpt.model, tok, [ids], 12, SamplingParams(), eos_ids=[0])[0]
    assert g.text == want.text and g.output_tokens == len(want.tokens) and g.input_tokens == len(ids)
    assert not g.tokens_estimated and g.error == ""
    assert g.ttft_s is not None and 0 < g.ttft_s <= g.latency_s
    assert be.describe()["path"] == str(model_dir)


def test_stop_strings_cut_the_text(model_dir):
    be = LocalBackend(model_dir, chat=False)
    full = be.generate(prompt(), Sampling(max_tokens=12)).text
    assert len(full) > 2
    stop = full[1:3]
    cut = be.generate(prompt([stop]), Sampling(max_tokens=12))
    assert cut.text == full[: full.find(stop)]


def test_missing_folder_is_a_backend_error(tmp_path):
    with pytest.raises(BackendError, match="model folder not found"):
        LocalBackend(tmp_path / "nope")


class _Task:
    task_id, suite, kind, entry_point = "sq", "humaneval", "Code generation", "square"

    def prompts(self):
        return {"completion": Prompt("sq", "def square(x):", [], "base", stop=["\ndef "]),
                "instruction": Prompt("sq", "Write square.", [{"role": "user", "content": "Write square."}], "b")}

    def evaluate(self, code, sandbox):
        return Verdict(Status.FAIL, 0, 1)


def test_runner_prices_local_generation_by_time(model_dir, tmp_path):
    cfg = RunConfig(suite="humaneval", out_dir=tmp_path / "run", template=get_template("completion@1"),
                    sampling=Sampling(max_tokens=8), samples=2, usd_per_hour=3.6, concurrency=2)
    result = Runner(cfg, LocalBackend(model_dir, chat=False), [_Task()]).run()
    assert result.state == "complete"
    recs = load_records(tmp_path / "run")
    assert len(recs) == 2
    for r in recs:
        assert r["cost_usd"] == pytest.approx(r["latency_s"] * 3.6 / 3600)  # $3.60/hour = $0.001/second
        assert r["raw"] and r["template_id"] == "completion@1"
        assert r["status"] in ("fail", "syntax")  # random weights; the prompt prefix is kept for extraction
        assert r["extracted"].startswith("def square(x):")
