"""Load on loopback: 64 concurrent streaming clients, a quarter hanging up mid-stream at random.

The server must stay up, every completed stream must be well-formed, and afterwards no slot or
queue entry may be left behind (checked through /health and /metrics).
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
import pytest
from serve_fixtures import ServerThread, build_codec, build_model

from moecoder.serve.api import create_app
from moecoder.serve.engine import Engine

CLIENTS = 64
MODEL = "debug-moe"
PROMPTS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):", "Hello world!"]


def metric(text: str, name: str) -> float:
    """The value of one sample line of Prometheus text, e.g. 'moecoder_queue_depth'."""
    vals = [float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name]
    assert vals, f"{name} not in /metrics"
    return vals[0]




@pytest.fixture(scope="module")
def server(tmp_path_factory):
    codec = build_codec(tmp_path_factory.mktemp("tok"))
    engine = Engine(build_model(codec), codec, codec.eos_token_ids, max_batch=16, max_context=96, max_queue=CLIENTS)
    with ServerThread(create_app(engine, codec, MODEL)) as srv:
        yield srv


async def one_client(client, rng: random.Random, hang_up: bool) -> dict:
    max_tokens = 80 if hang_up else rng.randint(8, 24)
    stream = await client.completions.create(model=MODEL, prompt=rng.choice(PROMPTS), max_tokens=max_tokens,
                                             # greedy never picks EOS here (see build_model), so every
                                             # hung-up stream is still running when its client leaves
                                             temperature=0.0 if hang_up else rng.choice([0.0, 0.8]),
                                             seed=rng.randint(0, 99),
                                             stream=True, stream_options={"include_usage": True})
    chunks, cut_after = [], rng.randint(1, 5)
    async for chunk in stream:
        chunks.append(chunk)
        if hang_up and len(chunks) >= cut_after:
            await stream.close()  # drop the connection mid-stream
            return {"hung_up": True}
    return {"hung_up": False, "chunks": chunks, "max_tokens": max_tokens}


async def storm(url: str) -> list[dict]:
    rng = random.Random(0)
    hang = set(rng.sample(range(CLIENTS), CLIENTS // 4))
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120,
                                  http_client=openai.DefaultAsyncHttpxClient(
                                      limits=httpx.Limits(max_connections=CLIENTS + 8))) as client:
        rngs = [random.Random(i) for i in range(CLIENTS)]
        return await asyncio.gather(*(one_client(client, rngs[i], i in hang) for i in range(CLIENTS)))


def test_64_streaming_clients_with_hangups(server):
    before = httpx.get(server.url + "/metrics").text
    results = asyncio.run(asyncio.wait_for(storm(server.url), timeout=90))
    done = [r for r in results if not r["hung_up"]]
    assert len(done) == CLIENTS - CLIENTS // 4
    for r in done:
        chunks = r["chunks"]
        with_choice = [c for c in chunks if c.choices]
        reasons = [c.choices[0].finish_reason for c in with_choice if c.choices[0].finish_reason]
        assert len(reasons) == 1 and reasons[0] in ("stop", "length")
        assert with_choice[-1].choices[0].finish_reason == reasons[0]  # nothing after the finish
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage is not None
        assert 1 <= usage.completion_tokens <= r["max_tokens"]
        assert (usage.completion_tokens == r["max_tokens"]) == (reasons[0] == "length")
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # afterwards: nothing running, nothing queued, no KV cache held
    deadline = time.time() + 20
    while (h := httpx.get(server.url + "/health").json())["running"] + h["prefilling"] + h["waiting"]:
        assert time.time() < deadline, h
        time.sleep(0.05)
    assert h["status"] == "ok" and h["kv_used_tokens"] == 0 and h["failed_steps"] == 0
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "moecoder_queue_depth") == 0
    assert metric(text, "moecoder_running_batch_size") == 0
    assert metric(text, "moecoder_prefilling") == 0
    assert metric(text, "moecoder_kv_cache_usage_ratio") == 0
    # the hung-up streams were cancelled (their slots freed early), not run to their 80 tokens
    cancelled = metric(text, 'moecoder_sequences_finished_total{reason="cancelled"}')
    assert cancelled == CLIENTS // 4
    assert metric(text, 'moecoder_requests_total{status="200"}') - _maybe(before, 'moecoder_requests_total{status="200"}') == CLIENTS

    # and it still serves
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def _maybe(text: str, name: str) -> float:
    vals = [float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name]
    return vals[0] if vals else 0.0
