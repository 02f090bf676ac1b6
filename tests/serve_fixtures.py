"""Shared fixtures of the serve tests: a random-weight debug model, a tokenizer trained at test time,
and a uvicorn server on a free loopback port in a background thread."""

from __future__ import annotations

import socket
import threading
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moecoder.config import get_preset
from moecoder.model import Transformer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
    "Hello world! The quick brown fox jumps over the lazy dog. 0123456789",
    "import os\nimport sys\nif __name__ == '__main__':\n    main()\n",
] * 4


class Codec:
    """Stands in for moecoder.tokenizer.Tokenizer: encode/decode/chat template/eos ids."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.eos_token_ids = [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")]
        self.bos_token_id = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def build_codec(vocab_size: int = 320) -> Codec:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(SPECIALS)
    return Codec(tok)


def build_model(codec: Codec, seed: int = 0, **cfg_overrides) -> Transformer:
    cfg = get_preset("debug").replace(vocab_size=codec.tok.get_vocab_size(), **cfg_overrides)
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

    def __enter__(self) -> "ServerThread":
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
