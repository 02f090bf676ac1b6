"""The backend interface: a prompt in, one `Generation` out.

A backend never raises for a failed request: retries are its business, and when they run out
it returns a `Generation` with `error` set, which the runner records as status `infra`.
Only configuration mistakes (bad key, unknown model, missing checkpoint) raise `BackendError`,
because they would fail every sample the same way.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from moecoder.evals.types import Prompt


class BackendError(ValueError):
    """A backend cannot work at all (bad URL, rejected key, missing model): stop the run."""


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; part of every cache key, so two runs with different settings never mix."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    """One model answer with what it cost to get it."""

    text: str
    latency_s: float  # request start -> last byte
    ttft_s: float | None  # request start -> first content token (streaming only)
    input_tokens: int
    output_tokens: int
    tokens_estimated: bool  # True when counted here instead of reported by the API
    attempts: int = 1
    error: str = ""  # non-empty: every attempt failed -> the sample is `infra`
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. finish_reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Generation:
        return cls(**d)


class Backend(Protocol):
    """What the runner needs from a backend. Implementations must be safe to call from threads."""

    name: str  # "openai" | "local"
    model: str  # the model name used for prices and reports
    priced_by_time: bool  # True: cost = $/hour x time (local); False: per-token price table

    def generate(self, prompt: Prompt, sampling: Sampling) -> Generation: ...

    def describe(self) -> dict[str, Any]:
        """Metadata for run.json. Must never contain secrets."""
        ...

    def close(self) -> None: ...


# Fallback token counter: words, numbers and single punctuation marks, roughly what BPE tokenizers
# produce for code. Only used when neither the API nor a model tokenizer gives a count, and the
# sample is then marked `tokens_estimated`.
_TOKEN_RE = re.compile(r"[A-Za-z_]+|\d+|\s+|[^\sA-Za-z_\d]")


def estimate_tokens(text: str) -> int:
    """Approximate token count of `text` (pieces of letters, digits, whitespace runs, punctuation)."""
    return sum(1 for m in _TOKEN_RE.finditer(text) if not m.group().isspace() or "\n" in m.group())


def make_backend(kind: str, **kwargs: Any) -> Backend:
    """Build a backend by name, importing its module only now (httpx or torch stay unloaded otherwise)."""
    if kind == "openai":
        from moecoder.evals.backends.openai_http import OpenAIBackend

        return OpenAIBackend(**kwargs)
    if kind == "local":
        from moecoder.evals.backends.local import LocalBackend

        return LocalBackend(**kwargs)
    raise BackendError(f"unknown backend {kind!r}; choose 'local' or 'openai'")
