"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types).

Only what the server implements is declared; unknown fields are ignored, as OpenAI-compatible
servers commonly do, so clients that send extra options keep working.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_PROMPTS = 8  # prompts in one /v1/completions request


def _utf8(s: str) -> str:
    # JSON may carry lone surrogates ("\ud800"), which no tokenizer can encode.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("string is not valid UTF-8 (lone surrogate)") from None
    return s


Text = Annotated[str, AfterValidator(_utf8)]
Stop = Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: Text
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # Not implemented; declared so a request that asks for them is refused rather than silently
    # answered without them (False / 0 / null are accepted: they ask for nothing).
    logprobs: bool | Annotated[int, Field(ge=0, le=20)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    def unsupported(self) -> str | None:
        """The name of an option this server does not implement but the request asks for."""
        if self.logprobs:
            return "logprobs"
        if self.top_logprobs:
            return "top_logprobs"
        return None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
    echo: Literal[False] = False  # echoing the prompt back is not implemented: say so rather than ignore it

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
