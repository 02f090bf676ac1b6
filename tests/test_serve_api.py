"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from serve_fixtures import ServerThread, build_codec, build_model

from moecoder.serve.api import create_app
from moecoder.serve.engine import Engine

KEY = "sk-test-key"
MODEL = "debug-moe"
CONTEXT = 128




@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    return build_codec(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def server(codec):
    engine = Engine(build_model(codec), codec, codec.eos_token_ids, max_batch=4, max_context=CONTEXT, max_queue=16)
    with ServerThread(create_app(engine, codec, MODEL, api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]


def test_completion_usage_matches_tokenizer_and_length(client, codec):
    prompt = "def add(a, b):"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(codec.encode(prompt))
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert isinstance(r.choices[0].text, str)


def test_greedy_deterministic_and_stream_equals_nonstream(client):
    kw = {"model": MODEL, "prompt": "for i in range(10):", "max_tokens": 12, "temperature": 0}
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == a.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == a.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_seed_determinism_and_n(client):
    kw = {"model": MODEL, "prompt": "import os", "max_tokens": 10, "temperature": 1.0, "top_p": 0.95, "seed": 42, "n": 3}
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # choices draw differently
    # sampling may draw EOS (finish "stop", fewer tokens); "length" choices used all 10
    lengths = sum(c.finish_reason == "length" for c in a.choices)
    assert 10 * lengths + (3 - lengths) <= a.usage.completion_tokens <= 30
    assert all(c.finish_reason in ("stop", "length") for c in a.choices)


def test_stop_string(client):
    kw = {"model": MODEL, "prompt": "class Stack:", "max_tokens": 24, "temperature": 0}
    full = client.completions.create(**kw).choices[0].text
    stop = full[8:11]
    r = client.completions.create(**kw, stop=[stop, "\x00never"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.usage.completion_tokens < 24
    streamed = client.completions.create(**kw, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_completion_and_stream(client, codec):
    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(codec.encode(codec.apply_chat_template(msgs), add_special_tokens=False))
    assert r.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_api_key_required(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    err = e.value.body
    assert set(err) >= {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401
    # the key is checked before the body is even parsed
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"Authorization": "Bearer x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open


def _post(server, path, content, **kw):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=30, **kw)


BAD = [
    ("/v1/completions", b'{"model": "debug-moe", "prompt": ', 400, None),
    ("/v1/completions", b'{"model": "debug-moe", "prompt": 5}', 400, "prompt"),
    ("/v1/completions", b'{"model": "debug-moe", "prompt": "x", "max_tokens": "8"}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "debug-moe", "prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "debug-moe", "prompt": "x", "max_tokens": 10000000000}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "debug-moe", "prompt": "x", "n": 1000}', 400, "n"),
    ("/v1/completions", b'{"model": "debug-moe", "prompt": "x", "temperature": -1}', 400, "temperature"),
    ("/v1/completions", b'{"model": "gpt-4", "prompt": "x"}', 404, "model"),
    ("/v1/completions", b'{"model": "debug-moe", "prompt": "\xff\xfe"}', 400, None),
    ("/v1/completions", b'{"model": "debug-moe", "prompt": "\\ud800"}', 400, "prompt"),
    ("/v1/completions", b'[1, 2]', 400, None),
    ("/v1/completions", b'{"model": "debug-moe", "prompt": "x", "logprobs": 2}', 400, "logprobs"),
    ("/v1/completions", b'{"model": "debug-moe", "prompt": "x", "echo": true}', 400, "echo"),
    ("/v1/chat/completions", b'{"model": "debug-moe", "messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "debug-moe", "messages": [{"role": "wizard", "content": "x"}]}', 400, None),
    ("/v1/chat/completions", b'{"model": "debug-moe"}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "debug-moe", "messages": [{"role": "tool", "content": "x"}]}', 400, "messages"),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_input_is_4xx_with_openai_error(server, path, body, status, param):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param)


def test_prompt_longer_than_context_names_the_limit(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hello world! " * 200, max_tokens=4)
    assert str(CONTEXT) in e.value.body["message"] and e.value.body["code"] == "context_length_exceeded"
    r = _post(server, "/v1/completions", b'{"model": "debug-moe", "prompt": "x", "max_tokens": 1000}')
    assert r.status_code == 400 and str(CONTEXT) in r.json()["error"]["message"]


def test_full_queue_gives_429_with_retry_after(codec):
    engine = Engine(build_model(codec), codec, [], max_batch=1, max_context=256, max_queue=1)
    with ServerThread(create_app(engine, codec, MODEL)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        streams = [client.completions.create(model=MODEL, prompt="x", max_tokens=250, stream=True)]
        next(iter(streams[0]))  # the first request is running
        threads = [threading.Thread(target=lambda: client.completions.create(model=MODEL, prompt="y", max_tokens=3))]
        threads[0].start()
        deadline = time.time() + 10
        while httpx.get(srv.url + "/health").json()["waiting"] < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "z", "max_tokens": 3})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        streams[0].close()  # disconnect: frees the slot, the queued request runs
        threads[0].join(timeout=30)
        assert not threads[0].is_alive()
        deadline = time.time() + 10
        while (h := httpx.get(srv.url + "/health").json())["running"] + h["prefilling"] + h["waiting"]:
            assert time.time() < deadline
            time.sleep(0.01)


def test_health_and_metrics(server, client):
    client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 4
    text = httpx.get(server.url + "/metrics").text
    for name in ["moecoder_requests_total", "moecoder_prompt_tokens_total", "moecoder_generation_tokens_total",
                 "moecoder_time_to_first_token_seconds_bucket", "moecoder_inter_token_latency_seconds_bucket",
                 "moecoder_queue_depth", "moecoder_running_batch_size", "moecoder_kv_cache_usage_ratio"]:
        assert name in text
    ok = [line for line in text.splitlines() if line.startswith('moecoder_requests_total{status="200"}')]
    assert ok and float(ok[0].split()[-1]) >= 1


def test_event_bridge_wakes_the_loop_once_per_engine_step():
    import asyncio

    from moecoder.serve.api import _EventBridge
    from moecoder.serve.engine import Event

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda cb, *a: (wakeups.append(cb), real(cb, *a))[1]
        bridge = _EventBridge(loop)
        queues = [asyncio.Queue() for _ in range(3)]
        for step in range(2):  # two engine steps of three events each
            for i, q in enumerate(queues):
                bridge.put(q, Event(i, f"s{step}", step + 1))
            bridge.flush()
            bridge.flush()  # a second flush before the drain ran schedules nothing more
            await asyncio.sleep(0)
        bridge.flush()  # nothing pending: no wake-up
        await asyncio.sleep(0)
        assert len(wakeups) == 2
        return [[q.get_nowait().text for _ in range(q.qsize())] for q in queues]

    assert asyncio.run(main()) == [["s0", "s1"]] * 3
