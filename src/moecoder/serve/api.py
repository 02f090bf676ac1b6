"""OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming SSE or
not), GET /health, GET /metrics. Every error, including malformed bodies, is an OpenAI-style
JSON body {"error": {"message", "type", "param", "code"}} with a 4xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineStopped, Event, QueueFull, RequestParams, Sequence
from .metrics import ServeMetrics
from .schemas import ChatCompletionRequest, CompletionRequest

MAX_CHOICES = 16  # prompts x n in one request
_INTERRUPTED = {"error": "generation failed on the server (see its log); retry", "cancelled": "the server is stopping"}


class ChatCodec(Protocol):
    """What the API needs from a tokenizer (moecoder.tokenizer.Tokenizer is one)."""

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]: ...


class APIError(Exception):
    """An error answered to the client as an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error_response(status: int, message: str, type_: str, param: str | None, code: str | None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_ERROR_SCHEMA = {
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"]}},
    }}}
}
_ERRORS = {code: {"description": why, **_ERROR_SCHEMA} for code, why in [
    (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
    (429, "queue full; see Retry-After"), (503, "engine not running"),
]}


class _Gate:
    """ASGI middleware for /v1: checks the API key before anything else (even before the body is
    parsed) and counts responses by status code (streaming ones included)."""

    def __init__(self, app, metrics: ServeMetrics, api_key: str | None):
        self.app, self.metrics = app, metrics
        self.api_key = None if api_key is None else api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(status=str(message["status"])).inc()
            await send(message)

        if self.api_key is not None and not self._authorized(scope):
            response = _error_response(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                                       "invalid_request_error", None, "invalid_api_key")
            return await response(scope, receive, counting_send)
        await self.app(scope, receive, counting_send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)


class _EventBridge:
    """Hands engine events to the event loop with one wake-up per engine step, not one per event.

    The engine emits one event per sequence per step; `call_soon_threadsafe` for each would cost a
    self-pipe write (a syscall on the engine thread) per token per stream. Events are queued here;
    the engine calls `flush` after each step (Engine.step_listeners), and one scheduled drain
    delivers every event of the step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, Event]] = []
        self.scheduled = False

    def put(self, queue: asyncio.Queue, ev: Event) -> None:
        with self.lock:
            self.pending.append((queue, ev))

    def flush(self) -> None:
        with self.lock:
            if self.scheduled or not self.pending:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            with self.lock:
                self.pending.clear()
                self.scheduled = False

    def _drain(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for queue, ev in items:
            queue.put_nowait(ev)


class _SSE(StreamingResponse):
    """A streaming response that runs `on_close` however the stream ends (done, error, disconnect)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def create_app(engine: Engine, codec: ChatCodec, model_name: str, *, api_key: str | None = None,
               metrics: ServeMetrics | None = None, bos_token_id: int | None = None) -> FastAPI:
    """Build the app. The engine is started when the app starts and shut down when it stops."""
    metrics = metrics or engine.metrics or ServeMetrics()
    if engine.metrics is None:
        engine.metrics = metrics
    metrics.bind(engine)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.alive:
            engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="moecoder", version="0.1.0", lifespan=lifespan)
    app.add_middleware(_Gate, metrics=metrics, api_key=api_key)

    # --- errors ---
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            msg, param = "request body is not valid JSON", None
        return _error_response(400, f"{param}: {msg}" if param else msg, "invalid_request_error", param, None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error_response(e.status_code, str(e.detail), kind, None, None, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return _error_response(500, f"internal error: {type(e).__name__}", "server_error", None, None)

    bridges: dict[str, Any] = {}

    # --- helpers ---
    def check_request(req) -> None:
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if (name := req.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported")

    def check_tokens(ids: list[int], param: str) -> list[int]:
        if not ids and bos_token_id is not None:
            ids = [bos_token_id]
        if not ids:
            raise APIError(400, f"{param} is empty after tokenization", param=param)
        if len(ids) >= engine.max_context:
            raise APIError(400, f"{param} has {len(ids)} tokens; this server's context limit is "
                                f"{engine.max_context} tokens (prompt + max_tokens)", param=param,
                           code="context_length_exceeded")
        return ids

    def make_params(req, prompt_len: int, max_tokens: int | None) -> RequestParams:
        room = engine.max_context - prompt_len
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds this server's "
                                f"context limit of {engine.max_context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return RequestParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop=req.stop_list())

    async def run(request: Request, req, prompts_ids: list[list[int]], max_tokens: int | None,
                  render_chunk, render_final, chat: bool):
        if len(prompts_ids) * req.n > MAX_CHOICES:
            raise APIError(400, f"prompts x n = {len(prompts_ids) * req.n} exceeds {MAX_CHOICES}", param="n")
        loop = asyncio.get_running_loop()
        if bridges.get("loop") is not loop:  # one bridge per event loop (tests may run several)
            if "bridge" in bridges:
                engine.remove_step_listener(bridges["bridge"].flush)
            bridges["loop"], bridges["bridge"] = loop, _EventBridge(loop)
            engine.add_step_listener(bridges["bridge"].flush)
        bridge: _EventBridge = bridges["bridge"]
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            bridge.put(queue, ev)

        seqs = []
        for pi, ids in enumerate(prompts_ids):
            params = make_params(req, len(ids), max_tokens)
            seqs += [Sequence(ids, params, sink, index=pi * req.n + j) for j in range(req.n)]
        try:
            engine.submit(seqs)
        except QueueFull as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        except EngineStopped as e:
            raise APIError(503, str(e), type_="server_error", code="engine_stopped") from None
        prompt_tokens = sum(len(ids) for ids in prompts_ids)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        now = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _SSE(_stream(queue, seqs, rid, now, prompt_tokens, include_usage, render_chunk, chat),
                        on_close=lambda: engine.cancel(seqs))
        texts = [""] * len(seqs)
        done: dict[int, Event] = {}
        try:
            while len(done) < len(seqs):
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                texts[ev.index] += ev.text
                if ev.finish_reason is not None:
                    done[ev.index] = ev
        finally:
            engine.cancel(seqs)
        failed = [ev.finish_reason for ev in done.values() if ev.finish_reason in ("error", "cancelled")]
        if failed:
            raise APIError(503, _INTERRUPTED[failed[0]], type_="server_error")
        completion = sum(ev.completion_tokens for ev in done.values())
        choices = [render_final(i, texts[i], done[i].finish_reason) for i in range(len(seqs))]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                "model": model_name, "choices": choices, "usage": _usage(prompt_tokens, completion)}

    async def _stream(queue, seqs, rid, now, prompt_tokens, include_usage, render_chunk, chat):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def frame(choices, usage=None) -> str:
            body: dict[str, Any] = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": choices}
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        if chat:
            for s in seqs:
                yield frame([{"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        finished, completion = 0, 0
        while finished < len(seqs):
            ev = await queue.get()
            if ev.finish_reason in ("error", "cancelled"):
                err = {"error": {"message": _INTERRUPTED[ev.finish_reason], "type": "server_error",
                                 "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            if ev.text or ev.finish_reason is not None:
                yield frame([render_chunk(ev.index, ev.text, ev.finish_reason)])
            if ev.finish_reason is not None:
                finished += 1
                completion += ev.completion_tokens
        if include_usage:
            yield frame([], _usage(prompt_tokens, completion))
        yield "data: [DONE]\n\n"

    # --- routes ---
    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)
        return {"status": "ok", **engine.stats(), "failed_steps": engine.failed_steps}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses=_ERRORS)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "moecoder", "max_model_len": engine.max_context}]}

    @app.post("/v1/completions", responses=_ERRORS)
    async def completions(req: CompletionRequest, request: Request):
        check_request(req)
        prompts = [check_tokens(codec.encode(p), "prompt") for p in req.prompts()]

        def chunk(i, text, reason):
            return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}

        return await run(request, req, prompts, req.max_tokens, chunk, chunk, chat=False)

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_request(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = check_tokens(codec.encode_chat(messages, add_generation_prompt=True), "messages")
        except ValueError as e:  # the template may reject a conversation (unknown role, bad order)
            raise APIError(400, f"messages rejected by the chat template: {e}", param="messages") from None

        def chunk(i, text, reason):
            delta = {"content": text} if text else {}
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}

        def final(i, text, reason):
            return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason}

        return await run(request, req, [ids], req.token_limit(), chunk, final, chat=True)

    return app


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
