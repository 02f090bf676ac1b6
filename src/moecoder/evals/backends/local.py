"""Local backend: a moecoder checkpoint folder, generated with moecoder.generate on this machine.

Cost is priced by time (USD/hour x measured generation time), so it needs no price entry.
One generation runs at a time on the shared model; concurrency > 1 only queues requests.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

from moecoder.evals.backends.base import BackendError, Generation, Sampling
from moecoder.evals.types import Prompt
from moecoder.hashing import sha256_file

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "assets" / "default-model"


class LocalBackend:
    """Generates with a checkpoint folder (config.json, safetensors, tokenizer.json)."""

    name = "local"
    priced_by_time = True

    def __init__(self, model_dir: str | Path | None = None, chat: bool = True, device: str = "cpu",
                 dtype: str = "float32"):
        folder = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
        if not folder.is_dir():
            hint = "" if model_dir else " (no bundled default model; pass --model PATH)"
            raise BackendError(f"model folder not found: {folder}{hint}")
        import torch  # only now: a wrong path should fail fast, without loading torch

        from moecoder.checkpoint import CheckpointError, load_checkpoint
        from moecoder.tokenizer import Tokenizer, TokenizerError

        try:
            ckpt = load_checkpoint(folder, dtype=getattr(torch, dtype), device=device)
            self.tokenizer = Tokenizer.from_dir(folder)
        except (CheckpointError, TokenizerError, OSError) as e:
            raise BackendError(f"cannot load model from {folder}: {e}") from None
        self.folder = folder
        # The weights' fingerprint is part of the model's identity, so a retrained checkpoint in the
        # same folder never reuses cached generations or verdicts of the old one.
        self.weights_sha256 = _weights_fingerprint(folder)
        self.model = f"{folder.name}@{self.weights_sha256[:12]}"
        self.chat = chat and self.tokenizer.has_chat_template
        self.device, self.dtype = device, dtype
        self._ckpt = ckpt
        eos = set(ckpt.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self._eos = sorted(eos)
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model, "path": str(self.folder), "chat_template": self.chat,
                "device": self.device, "dtype": self.dtype, "weights_sha256": self.weights_sha256}

    def close(self) -> None:
        pass

    def generate(self, prompt: Prompt, sampling: Sampling) -> Generation:
        from moecoder.generate import GenerationError, SamplingParams, StopMatcher, generate_stream

        ids = self.tokenizer.encode_chat(prompt.messages) if self.chat else self.tokenizer.encode(prompt.text)
        params = SamplingParams(temperature=sampling.temperature,
                                top_p=sampling.top_p if sampling.top_p < 1 else None, seed=sampling.seed)
        decoder = self.tokenizer.stream_decoder()
        stops = StopMatcher(prompt.stop)
        pieces: list[str] = []
        n_out, ttft, finish = 0, None, None
        with self._lock:
            t0 = time.monotonic()
            try:
                events = generate_stream(self._ckpt.model, [ids], sampling.max_tokens, params, self._eos)
                for _, tok, fin in events:
                    if tok is not None:
                        n_out += 1
                        if ttft is None:
                            ttft = time.monotonic() - t0
                        pieces.append(stops.feed(decoder.push(tok)))
                        if stops.stopped:
                            finish = "stop"
                            break
                    if fin is not None:
                        finish = fin
                        pieces.append(stops.feed(decoder.flush()) + stops.flush())
                events.close()
            except GenerationError as e:
                return Generation("", time.monotonic() - t0, None, len(ids), 0, False, error=f"generation: {e}")
            latency = time.monotonic() - t0
        return Generation("".join(pieces), latency, ttft, len(ids), n_out, False, extra={"finish_reason": finish})


def _weights_fingerprint(folder: Path) -> str:
    """sha256 over config.json and every safetensors file of the folder (name and content)."""
    h = hashlib.sha256()
    for f in sorted([folder / "config.json", *folder.glob("*.safetensors")]):
        h.update(f.name.encode() + b"\0")
        sha256_file(f, h)
    return h.hexdigest()
