"""`moecoder serve` and `moecoder bench cost` as a user runs them: on a saved checkpoint folder, in a subprocess."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest
from serve_fixtures import build_codec, build_model, free_port

from moecoder.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("tok")
    codec = build_codec(tok_dir)
    out = tmp_path_factory.mktemp("ckpt") / "tiny-moe"
    save_checkpoint(build_model(codec, norm_topk=True), out, tokenizer_dir=tok_dir, extra_config={"eos_token_id": codec.eos_token_ids})
    return out


def moecoder(*args):
    return [sys.executable, "-m", "moecoder", *map(str, args)]


@contextlib.contextmanager
def served(*args, env=None):
    """`moecoder serve *args` in a subprocess on a free loopback port; yields its base URL once /health answers."""
    port = free_port()
    proc = subprocess.Popen(moecoder("serve", *args, "--port", port), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_subprocess_with_api_key(ckpt_dir):
    env = {**os.environ, "MOECODER_TEST_KEY": "s3cret"}
    with served("--model", ckpt_dir, "--api-key-env", "MOECODER_TEST_KEY", "--max-batch", 2, "--max-context", 64,
                "--threads", 1, env=env) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-moe"]
        r = client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401


@pytest.mark.parametrize("args,needle", [
    (["serve", "--model", "/nonexistent/dir"], "is not a folder"),
    (["serve", "--model", ".", "--api-key-env", "MOECODER_SURELY_UNSET_VAR"], "MOECODER_SURELY_UNSET_VAR"),
])
def test_serve_bad_arguments_are_one_line(args, needle):
    r = subprocess.run(moecoder(*args), capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bench_cost_prints_dollars_per_million(ckpt_dir):
    r = subprocess.run(moecoder("bench", "cost", "--model", ckpt_dir, "--usd-per-hour", 2.5, "--duration", 1,
                                "--max-batch", 4, "--prompt-tokens", 8, "--max-tokens", 16, "--threads", 1),
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    tps = float(re.search(r"([\d.]+) output tokens/s", r.stdout).group(1))
    usd = float(re.search(r"\$([\d.]+) per 1M output tokens at \$2.5/hour", r.stdout).group(1))
    assert tps > 0 and int(re.search(r"\((\d+) requests", r.stdout).group(1)) > 0
    assert usd == pytest.approx(2.5 / 3600 / tps * 1e6, rel=0.01)


def test_evaluation_harness_end_to_end_against_moecoder_serve(tmp_path):
    """`moecoder eval` (OpenAI-compatible backend) against `moecoder serve` running the bundled model
    (the default without --model): usage comes from the server (not estimated) and every sample gets
    a real verdict."""
    import json

    with served("--max-batch", 2, "--threads", 1) as url:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        assert model == "default-model"
        out = tmp_path / "run"
        res = subprocess.run(moecoder("eval", "run", "--suite", "humaneval", "--backend", "openai", "--base-url",
                                      url + "/v1", "--model", model, "--template", "completion@1", "--limit", 3,
                                      "--max-tokens", 48, "--allow-exec", "--out", out),
                             capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert all(r["status"] in {"pass", "fail", "syntax", "timeout", "crash", "memory"} for r in records)
    assert all(r["output_tokens"] > 0 and not r["tokens_estimated"] for r in records)
    assert "HumanEval pass@1" in res.stdout
