"""Shared fixtures of the serve tests: a random-weight debug model, a tokenizer trained at test time,
and a uvicorn server on a free loopback port in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from typing import Self

import torch

from moecoder.config import get_preset
from moecoder.model import Transformer
from moecoder.tokenizer import Tokenizer, train_byte_bpe

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
    "Hello world! The quick brown fox jumps over the lazy dog. 0123456789",
    "import os\nimport sys\nif __name__ == '__main__':\n    main()\n",
] * 4


def build_codec(tmp_dir, vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE with the ChatML template, trained on a few lines of code; EOS ids on `.eos_token_ids`."""
    tok = train_byte_bpe(CORPUS, vocab_size, tmp_dir)
    tok.eos_token_ids = [tok.eos_token_id, tok.token_to_id("<|im_end|>")]
    return tok


def build_model(codec: Tokenizer, seed: int = 0, **cfg_overrides) -> Transformer:
    cfg = get_preset("debug").replace(vocab_size=codec.vocab_size, **cfg_overrides)
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    with torch.no_grad():
        # Random weights would otherwise end some sequences early on EOS; a zero logit is
        # below the max of the others, so greedy never ends and "length" tests mean something.
        for t in codec.eos_token_ids:
            model.lm_head.weight[t] = 0
    return model.eval()




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread (lifespan on: starts/stops the engine)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                   lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
