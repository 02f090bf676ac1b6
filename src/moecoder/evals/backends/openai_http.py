"""OpenAI-compatible HTTP backend (chat or completions API) over httpx, streaming.

Streaming is always on so time-to-first-token can be measured; `stream_options.include_usage`
asks the server for token usage in the last chunk, and when a server ignores it the counts are
estimated here and marked so. Retries cover 429, 5xx, timeouts and dropped connections, with
exponential back-off and jitter; a rejected key or an unknown endpoint stops the run instead,
since every other sample would fail the same way.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from moecoder.evals.backends.base import BackendError, Generation, Sampling, estimate_tokens
from moecoder.evals.types import Prompt

_FATAL = {401: "rejected the API key", 403: "refused access", 404: "has no such endpoint or model"}


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class _GiveUp(Exception):
    """A non-retryable error for this sample only (e.g. HTTP 400: prompt too long)."""

    def __init__(self, reason: str, status: int):
        super().__init__(reason)
        self.status = status


class OpenAIBackend:
    """Talks to `{base_url}/chat/completions` or `{base_url}/completions`."""

    name = "openai"
    priced_by_time = False

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = None,
        api: str = "chat",
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        count_tokens: Callable[[str], int] = estimate_tokens,
        jitter_seed: int | None = None,
    ):
        if api not in ("chat", "completions"):
            raise BackendError(f"unknown API style {api!r}; choose 'chat' or 'completions'")
        if not base_url.startswith(("http://", "https://")):
            raise BackendError(f"--base-url must start with http:// or https://, got {base_url!r}")
        headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise BackendError(f"environment variable {api_key_env} (named by --api-key-env) is not set")
            headers["Authorization"] = f"Bearer {key}"  # lives only in this client's headers
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api = api
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._count = count_tokens
        self._rng = random.Random(jitter_seed)
        self._rng_lock = threading.Lock()
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout))
        # Some servers reject the `stream_options` field with HTTP 400; after one such answer it is
        # dropped and token counts are estimated instead.
        self._ask_usage = True

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.model,
            "base_url": self.base_url,
            "api": self.api,
            "api_key_env": self.api_key_env,  # the variable's name, never its value
            "timeout_s": self.timeout,
            "max_retries": self.max_retries,
        }

    def close(self) -> None:
        self._client.close()

    # --- one sample ---

    def generate(self, prompt: Prompt, sampling: Sampling) -> Generation:
        url = f"{self.base_url}/{'chat/completions' if self.api == 'chat' else 'completions'}"
        t_first = time.monotonic()
        errors: list[str] = []
        for attempt in range(self.max_retries + 1):
            body = self._body(prompt, sampling)
            try:
                gen = self._attempt(url, body, prompt)
                gen.attempts = attempt + 1
                gen.extra["wall_s"] = time.monotonic() - t_first
                return gen
            except _GiveUp as e:
                if e.status == 400 and "stream_options" in body:
                    try:
                        gen = self._attempt(url, {k: v for k, v in body.items() if k != "stream_options"}, prompt)
                    except (_GiveUp, _Retryable) as e2:
                        errors.append(f"{e}; again without stream_options: {e2}")
                        break
                    self._ask_usage = False  # this server rejects the field: stop sending it
                    gen.attempts = attempt + 2
                    gen.extra["wall_s"] = time.monotonic() - t_first
                    return gen
                errors.append(str(e))
                break
            except _Retryable as e:
                errors.append(str(e))
                if attempt == self.max_retries:
                    break
                time.sleep(self._delay(attempt, e.retry_after))
        return Generation(
            text="",
            latency_s=time.monotonic() - t_first,
            ttft_s=None,
            input_tokens=0,
            output_tokens=0,
            tokens_estimated=False,
            attempts=len(errors),
            error="; ".join(errors[-3:]),
        )

    def _body(self, prompt: Prompt, sampling: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "stream": True,
        }
        if self._ask_usage:
            body["stream_options"] = {"include_usage": True}
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if prompt.stop:
            body["stop"] = prompt.stop[:4]  # the OpenAI API accepts at most 4
        if self.api == "chat":
            body["messages"] = prompt.messages
        else:
            body["prompt"] = prompt.text
        return body

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        # "Equal jitter": half the exponential step is fixed, half random, so concurrent workers
        # hit by the same 429 spread out instead of retrying in lockstep.
        step = min(self.backoff_max, self.backoff_base * (2**attempt))
        with self._rng_lock:
            delay = step / 2 + self._rng.uniform(0, step / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    def _attempt(self, url: str, body: dict[str, Any], prompt: Prompt) -> Generation:
        t0 = time.monotonic()
        ttft: float | None = None
        pieces: list[str] = []
        usage: dict[str, Any] | None = None
        finish = None
        try:
            with self._client.stream("POST", url, json=body) as resp:
                self._check_status(resp)
                for line in resp.iter_lines():
                    if time.monotonic() - t0 > self.timeout:
                        raise _Retryable(f"timeout after {self.timeout:g}s")
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except json.JSONDecodeError as e:
                        raise _Retryable(f"malformed stream chunk: {e}") from None
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") if self.api == "chat" else choice.get("text")
                        if piece:
                            if ttft is None:
                                ttft = time.monotonic() - t0
                            pieces.append(piece)
                        finish = choice.get("finish_reason") or finish
        except httpx.TimeoutException:
            raise _Retryable(f"timeout after {self.timeout:g}s") from None
        except httpx.TransportError as e:
            raise _Retryable(f"connection error: {type(e).__name__}") from None
        latency = time.monotonic() - t0
        text = "".join(pieces)
        if usage and "completion_tokens" in usage:
            n_in, n_out, estimated = int(usage.get("prompt_tokens") or 0), int(usage["completion_tokens"]), False
        else:
            prompt_text = prompt.text if self.api == "completions" else "\n".join(m["content"] for m in prompt.messages)
            n_in, n_out, estimated = self._count(prompt_text), self._count(text), True
        return Generation(
            text=text,
            latency_s=latency,
            ttft_s=ttft,
            input_tokens=n_in,
            output_tokens=n_out,
            tokens_estimated=estimated,
            extra={"finish_reason": finish},
        )

    def _check_status(self, resp: httpx.Response) -> None:
        code = resp.status_code
        if code == 200:
            return
        resp.read()
        snippet = resp.text[:200].replace("\n", " ")
        if code in _FATAL:
            raise BackendError(f"{self.base_url} {_FATAL[code]} (HTTP {code}): {snippet}")
        if code == 429 or code >= 500:
            retry_after = None
            try:
                retry_after = float(resp.headers.get("retry-after", ""))
            except ValueError:
                pass
            raise _Retryable(f"HTTP {code}", retry_after)
        raise _GiveUp(f"HTTP {code}: {snippet}", code)
