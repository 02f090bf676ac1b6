"""The OpenAI-compatible backend against a real loopback server: streaming, usage, retries, errors."""

from __future__ import annotations

import pytest
from fake_openai_server import FakeOpenAIServer, Reply, scripted

from moecoder.evals.backends.base import BackendError, Sampling, estimate_tokens
from moecoder.evals.backends.openai_http import OpenAIBackend
from moecoder.evals.types import Prompt

PROMPT = Prompt(task_id="t/0", text="def add(a, b):\n", messages=[{"role": "user", "content": "write add"}],
                template_id="instruct-md@1", stop=["\ndef "])


def backend(url: str, **kw) -> OpenAIBackend:
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("jitter_seed", 0)
    return OpenAIBackend(model="fake-model", base_url=url, **kw)


def test_chat_streaming_measures_ttft_and_reads_usage(monkeypatch):
    monkeypatch.setenv("FAKE_KEY_VAR", "sk-secret-123")
    reply = Reply(text="```python\nreturn a + b\n```", pieces=4, usage=(11, 7), first_delay=0.3, piece_delay=0.05)
    with FakeOpenAIServer(scripted([reply])) as srv:
        b = backend(srv.url, api_key_env="FAKE_KEY_VAR")
        g = b.generate(PROMPT, Sampling(temperature=0.2, max_tokens=64))
    assert g.error == "" and g.text == reply.text
    assert 0.3 <= g.ttft_s < g.latency_s  # first token after the scripted delay, last one later
    assert g.latency_s >= 0.3 + 3 * 0.05
    assert (g.input_tokens, g.output_tokens, g.tokens_estimated) == (11, 7, False)
    hit = srv.hits[0]
    assert hit.path == "/v1/chat/completions"
    assert hit.headers["Authorization"] == "Bearer sk-secret-123"
    assert hit.body["messages"] == PROMPT.messages and hit.body["stream"] is True
    assert hit.body["temperature"] == 0.2 and hit.body["max_tokens"] == 64 and hit.body["stop"] == ["\ndef "]
    assert "sk-secret-123" not in str(b.describe())


def test_completions_api_without_usage_estimates_tokens():
    with FakeOpenAIServer(scripted([Reply(text="    return a + b\n", usage=None)])) as srv:
        g = backend(srv.url, api="completions").generate(PROMPT, Sampling())
    assert srv.hits[0].path == "/v1/completions" and srv.hits[0].body["prompt"] == PROMPT.text
    assert "Authorization" not in srv.hits[0].headers
    assert g.tokens_estimated
    assert g.output_tokens == estimate_tokens("    return a + b\n") and g.input_tokens == estimate_tokens(PROMPT.text)


def test_retries_429_and_500_then_succeeds():
    replies = [Reply(status=429), Reply(status=500), Reply(status=503), Reply(text="ok", usage=(1, 1))]
    with FakeOpenAIServer(scripted(replies)) as srv:
        g = backend(srv.url, max_retries=4).generate(PROMPT, Sampling())
    assert g.error == "" and g.text == "ok" and g.attempts == 4 and len(srv.hits) == 4


def test_retries_are_bounded_then_infra():
    with FakeOpenAIServer(scripted([Reply(status=500)])) as srv:
        g = backend(srv.url, max_retries=2).generate(PROMPT, Sampling())
    assert len(srv.hits) == 3 and g.attempts == 3
    assert "HTTP 500" in g.error and g.text == ""


def test_timeout_is_retried_then_infra():
    with FakeOpenAIServer(scripted([Reply(text="late", first_delay=1.0)])) as srv:
        g = backend(srv.url, max_retries=1, timeout=0.2).generate(PROMPT, Sampling())
    assert len(srv.hits) == 2 and "timeout" in g.error


def test_retry_after_header_is_respected():
    replies = [Reply(status=429, headers={"Retry-After": "0.4"}), Reply(text="ok")]
    with FakeOpenAIServer(scripted(replies)) as srv:
        g = backend(srv.url).generate(PROMPT, Sampling())
    assert g.text == "ok" and g.extra["wall_s"] >= 0.4


def test_rejected_key_stops_instead_of_retrying(monkeypatch):
    monkeypatch.setenv("K", "bad")
    with FakeOpenAIServer(scripted([Reply(status=401)])) as srv, pytest.raises(BackendError, match="rejected the API key"):
        backend(srv.url, api_key_env="K").generate(PROMPT, Sampling())
    assert len(srv.hits) == 1


def test_bad_request_is_not_retried():
    with FakeOpenAIServer(scripted([Reply(status=400)])) as srv:
        b = backend(srv.url)
        g = b.generate(PROMPT, Sampling())
        b.generate(PROMPT, Sampling())
    # one more request only to rule out the stream_options field as the cause, then no retries
    assert "HTTP 400" in g.error and "without stream_options" in g.error
    assert [("stream_options" in h.body) for h in srv.hits] == [True, False, True, False]  # usage still asked


def test_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    with pytest.raises(BackendError, match="NOPE_KEY"):
        OpenAIBackend(model="m", base_url="http://127.0.0.1:1/v1", api_key_env="NOPE_KEY")


def test_server_rejecting_stream_options_falls_back_to_estimates():
    def picky(body, n):
        return Reply(status=400) if "stream_options" in body else Reply(text="ok then", usage=(3, 2))
    with FakeOpenAIServer(picky) as srv:
        b = backend(srv.url)
        g1 = b.generate(PROMPT, Sampling())
        g2 = b.generate(PROMPT, Sampling())
    assert g1.text == g2.text == "ok then" and g1.tokens_estimated and g1.output_tokens == estimate_tokens("ok then")
    assert len(srv.hits) == 3  # one rejected request, then the field is no longer sent
