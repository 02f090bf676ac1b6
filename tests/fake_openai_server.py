"""A real OpenAI-compatible HTTP server on loopback, in a thread, with scripted answers.

Tests drive the eval backends through real sockets: each request is answered by a responder
function `(request_json, hit_number) -> Reply`, so tests can script 429/500 sequences, delays
before the first token, usage blocks present or absent, and count how many requests arrived.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass
class Reply:
    status: int = 200
    text: str = ""
    pieces: int = 3  # the text is streamed in this many chunks
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens); None: no usage chunk
    first_delay: float = 0.0  # seconds before the first content chunk (TTFT)
    piece_delay: float = 0.0  # seconds between later chunks
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeOpenAIServer:
    """Use as a context manager; `url` is the base URL ending in /v1."""

    def __init__(self, responder: Callable[[dict[str, Any], int], Reply]):
        self.responder = responder
        self.hits: list[Hit] = []
        self.active = 0  # requests being answered right now
        self.max_active = 0  # the most at once (checks the client's concurrency bound)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                with server._lock:
                    server.hits.append(Hit(self.path, dict(self.headers), body))
                    number = len(server.hits) - 1
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    self._answer(body, number)
                finally:
                    with server._lock:
                        server.active -= 1

            def _answer(self, body: dict[str, Any], number: int) -> None:
                reply = server.responder(body, number)
                if reply.status != 200:
                    payload = json.dumps({"error": {"message": f"scripted {reply.status}"}}).encode()
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                chat = self.path.endswith("/chat/completions")
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                k = max(1, reply.pieces)
                size = -(-len(reply.text) // k) if reply.text else 1
                chunks = [reply.text[i : i + size] for i in range(0, len(reply.text), size)] or [""]
                time.sleep(reply.first_delay)
                for i, piece in enumerate(chunks):
                    if i:
                        time.sleep(reply.piece_delay)
                    choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                    choice["finish_reason"] = "stop" if i == len(chunks) - 1 else None
                    self._event({"id": "x", "choices": [choice]})
                if reply.usage is not None and body.get("stream_options", {}).get("include_usage"):
                    p, c = reply.usage
                    usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                    self._event({"id": "x", "choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

            def _event(self, obj: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
                self.wfile.flush()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def scripted(replies: list[Reply]) -> Callable[[dict[str, Any], int], Reply]:
    """Answer the n-th request with replies[n] (the last one repeats)."""
    return lambda body, n: replies[min(n, len(replies) - 1)]
