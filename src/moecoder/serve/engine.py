"""Continuous-batching generation engine, run on its own thread.

Every sequence in the engine owns one row ("slot") of a static KV cache. Rows 0..n-1 are the
decoding sequences and rows n..n+k-1 the ones still prefilling their prompt; a freed row is
refilled by moving a later row into it, so both groups stay contiguous and one decode step is
one forward over a `[n, 1]` batch. At each step boundary waiting requests take free rows, and
up to `prefill_chunk` prompt tokens are prefilled (long prompts in chunks over several steps,
so they never stall the decoding rows for long) through a row-window view of the same cache.
A sequence whose prompt is complete joins the decode batch; finished or cancelled ones leave
at the next step without stalling the others.

The engine works on token ids; text appears only at its edge (incremental detokenisation and
stop strings), so HTTP handlers receive ready-to-send text deltas through a callback.
"""

from __future__ import annotations

import collections
import copy
import logging
import secrets
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .. import sizing
from ..generate import SamplingParams as Sampling
from ..generate import StopMatcher, sample_rows
from ..kernels import cpu as cpu_kernels
from ..model import KVCache, Transformer

log = logging.getLogger(__name__)

# Below these, sampling is greedy in effect, and computing it in float32 breaks: logits /
# temperature overflows to inf (NaN probabilities), a top_p under ~1e-45 rounds to 0 and drops
# every token. Such requests are decoded greedily.
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6


class TextCodec(Protocol):
    """What the engine needs from a tokenizer (moecoder.tokenizer.Tokenizer is one)."""

    def stream_decoder(self): ...  # an object with push(id) -> str and flush() -> str


class QueueFull(Exception):
    """The waiting queue is at --max-queue; the client should retry later."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"server is at capacity; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineStopped(RuntimeError):
    """The engine thread is not running."""


@dataclass(frozen=True)
class RequestParams:
    """What one request asks for: a token limit, sampling settings and stop strings."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """One update of one sequence, delivered to its sink on the engine thread."""

    index: int  # choice index within its request
    text: str  # new text since the previous event (may be empty)
    completion_tokens: int  # generated so far
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"


@dataclass(eq=False)
class Sequence:
    """One generation: a prompt, its sampling parameters and where its events go."""

    prompt_ids: list[int]
    params: RequestParams
    sink: Callable[[Event], None]
    index: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    # --- engine state ---
    out_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: str | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        p = self.params
        temperature = p.temperature if p.temperature >= MIN_TEMPERATURE and p.top_p >= MIN_TOP_P else 0.0
        self.sampling = Sampling(temperature=temperature, top_p=p.top_p if p.top_p < 1 else None)
        # Choice i of a seeded request draws from seed + i, as moecoder.generate does for row i.
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed((seed + self.index) % (2**63))


class TextStream:
    """Ids in, sendable text out: incremental detokenisation, then stop strings (text that may be
    the start of a stop string is held back until it is known not to be)."""

    def __init__(self, codec: TextCodec, stop: tuple[str, ...]):
        self.decoder = codec.stream_decoder()
        self.matcher = StopMatcher(stop)

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token; return (text safe to send now, whether a stop string was hit)."""
        return self.matcher.feed(self.decoder.push(token)), self.matcher.stopped

    def flush(self) -> tuple[str, bool]:
        """The held-back remainder at the end of generation."""
        text = self.matcher.feed(self.decoder.flush())
        return text + self.matcher.flush(), self.matcher.stopped


def kv_bytes_per_token(model: Transformer, dtype: torch.dtype) -> int:
    """Cache bytes one token takes in every layer (MLA models cache a latent, not per-head K/V)."""
    return sizing.kv_bytes_per_token(model.cfg, torch.empty((), dtype=dtype).element_size())


def _row_view(cache: KVCache, start: int, stop: int) -> KVCache:
    """A KVCache whose rows are cache rows start..stop-1, sharing storage (writes land in `cache`).

    This is how a prompt is prefilled into a free row while other rows hold live sequences:
    the model only ever sees a batch starting at row 0 of the cache it is given.
    """
    view = copy.copy(cache)  # every other attribute (max_len, ...) as in the full cache
    view.k = [t[start:stop] for t in cache.k]
    view.v = [t[start:stop] for t in cache.v]
    view.pos = cache.pos[start:stop]
    return view


class Engine:
    """Continuous-batching generator over one model; thread-safe `submit` / `cancel`.

    `max_batch` rows of `max_context` positions are allocated up front; `kv_budget_mb` (if
    given) lowers the row count to what fits. Requests wait in a queue of at most `max_queue`
    (then `QueueFull`) until a row is free.
    """

    def __init__(
        self,
        model: Transformer,
        codec: TextCodec,
        eos_token_ids: Seq[int],
        *,
        max_batch: int = 8,
        max_context: int | None = None,
        max_queue: int = 64,
        kv_budget_mb: float | None = None,
        prefill_chunk: int = 512,
        metrics=None,
    ):
        self.model = model.eval()
        self.codec = codec
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.max_context = int(max_context or model.cfg.max_seq_len)
        if not 1 <= self.max_context <= model.cfg.max_seq_len:
            raise ValueError(f"max_context must be in 1..{model.cfg.max_seq_len} (the model's max_seq_len)")
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.device.type == "cpu":
            # Build (or load) and time the CPU kernels now, not during the first request (kernels/cpu.py).
            cpu_kernels.kernel()
        per_row = kv_bytes_per_token(model, self.dtype) * self.max_context
        slots = max_batch
        if kv_budget_mb is not None:
            slots = min(max_batch, int(kv_budget_mb * 2**20 // per_row))
            if slots < 1:
                raise ValueError(
                    f"--kv-budget-mb {kv_budget_mb} holds no sequence of --max-context {self.max_context} "
                    f"(one needs {per_row / 2**20:.2f} MiB)"
                )
        self.slots = slots
        self.max_queue = max_queue
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.prefill_chunk = prefill_chunk  # prompt tokens (padded) prefilled per step
        self.cache = KVCache(model.cfg, slots, self.max_context, self.dtype, device=self.device)
        self.metrics = metrics
        self.running: list[Sequence] = []  # decoding; running[i] lives in cache row i
        self.streams: list[TextStream] = []  # streams[i] belongs to running[i]
        self.prefilling: list[Sequence] = []  # prefilling[i] lives in row len(running) + i
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None  # the last failed step's exception
        self.failed_steps = 0
        self.steps = 0
        # Called on the engine thread after every loop iteration (its events all emitted), so a
        # consumer can hand a whole step's events over at once (see serve/api.py).
        self._step_listeners: list[Callable[[], None]] = []

    # --- public, any thread ---
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="moecoder-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def add_step_listener(self, fn: Callable[[], None]) -> None:
        with self._cv:
            self._step_listeners = [*self._step_listeners, fn]

    def remove_step_listener(self, fn: Callable[[], None]) -> None:
        with self._cv:
            self._step_listeners = [f for f in self._step_listeners if f != fn]

    def _notify_step(self) -> None:
        for fn in self._step_listeners:
            try:
                fn()
            except Exception:
                log.exception("a step listener failed")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none). Raises QueueFull when the queue cannot take them all."""
        for s in seqs:
            need = len(s.prompt_ids) + s.params.max_tokens
            if need > self.max_context:
                raise ValueError(f"prompt + max_tokens = {need} tokens exceeds the context limit {self.max_context}")
        with self._cv:
            if not self.alive:
                raise EngineStopped("the generation engine is not running")
            # Free rows count as room too: waiting sequences there are admitted at the next step.
            if len(self.waiting) + len(seqs) > self.max_queue + self.slots - self._rows_used():
                raise QueueFull(self._retry_after())
            self.waiting.extend(seqs)
            self._cv.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Mark sequences cancelled; their rows are freed at the next step boundary."""
        with self._cv:
            for s in seqs:
                s.cancelled = True
            self._cv.notify()

    def stats(self) -> dict[str, int | float]:
        with self._cv:
            rows = self._rows_used()
            used = int(self.cache.pos[:rows].sum()) if rows else 0
            return {
                "running": len(self.running),
                "prefilling": len(self.prefilling),
                "waiting": len(self.waiting),
                "slots": self.slots,
                "kv_used_tokens": used,
                "kv_capacity_tokens": self.slots * self.max_context,
            }

    # --- engine thread ---
    def _retry_after(self) -> int:
        return 1 + len(self.waiting) // max(1, self.slots)

    def _rows_used(self) -> int:
        return len(self.running) + len(self.prefilling)

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._rows_used() and not self.waiting:
                        self._cv.wait()
                    if self._stop:
                        break
                    self._drop_cancelled()
                    self._admit()
                try:
                    with torch.inference_mode():
                        if self.prefilling:
                            self._prefill_step()
                        if self.running:
                            self._decode_step()
                except Exception as e:
                    # One failed step must not take the server down: end the sequences in rows, keep serving.
                    log.exception("engine step failed; ending the sequences of this step")
                    self.error, self.failed_steps = e, self.failed_steps + 1
                    with self._cv:
                        victims = self.running + self.prefilling
                        self.running, self.streams, self.prefilling = [], [], []
                    for s in victims:
                        s.finish_reason = "error"
                        self._count_finished("error")
                        self._emit(s, Event(s.index, "", len(s.out_ids), "error"))
                self._notify_step()
        finally:
            with self._cv:
                for s in self.running + self.prefilling + list(self.waiting):
                    self._emit(s, Event(s.index, "", len(s.out_ids), "cancelled"))
                self.running, self.streams, self.prefilling = [], [], []
                self.waiting.clear()
            self._notify_step()

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self.waiting):
            for s in self.waiting:
                if s.cancelled:
                    self._finished(s, "cancelled")
            self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
        # Highest index first: the row moved into a freed one has already been checked.
        for i in reversed(range(len(self.prefilling))):
            if self.prefilling[i].cancelled:
                self._free_prefilling(i, "cancelled")
        for row in reversed(range(len(self.running))):
            if self.running[row].cancelled:
                self._free(row, "cancelled")

    def _admit(self) -> None:
        """Waiting sequences take the free rows (after the prefilling ones), prompt not yet cached."""
        while self.waiting and self._rows_used() < self.slots:
            self.cache.pos[self._rows_used()] = 0
            self.prefilling.append(self.waiting.popleft())

    def _plan_prefill(self) -> list[int]:
        """Prompt tokens to prefill this step for prefilling[0], [1], ...

        The batch is right-padded, so it costs rows x longest chunk; that stays within
        `prefill_chunk`. A prompt longer than that is prefilled alone, `prefill_chunk` tokens a
        step; any other row in the batch gets its whole remaining prompt. So either every row
        of the batch completes its prompt, or the batch is one partial row.
        """
        n, chunks, longest, last_start = len(self.running), [], 0, 0
        for i, s in enumerate(self.prefilling):
            start = int(self.cache.pos[n + i])
            c = min(len(s.prompt_ids) - start, self.prefill_chunk)
            wide = max(longest, c)
            if chunks and ((len(chunks) + 1) * wide > self.prefill_chunk
                           or max(last_start, start) + wide > self.max_context):  # padding must fit the row
                break
            chunks.append(c)
            longest, last_start = wide, max(last_start, start)
        return chunks

    def _prefill_step(self) -> None:
        n, chunks = len(self.running), self._plan_prefill()
        m = len(chunks)
        starts = self.cache.pos[n : n + m].clone()
        tokens = torch.zeros(m, max(chunks), dtype=torch.long, device=self.device)
        for i, (s, c) in enumerate(zip(self.prefilling, chunks)):
            a = int(starts[i])
            tokens[i, :c] = torch.tensor(s.prompt_ids[a : a + c])
        lens = torch.tensor(chunks, device=self.device)
        logits = self.model(tokens, cache=_row_view(self.cache, n, n + m), logits_at=lens - 1).logits[:, -1]
        self.cache.pos[n : n + m] = starts + lens  # the padded tail is garbage that later writes overwrite
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(chunks))
        if int(self.cache.pos[n]) < len(self.prefilling[0].prompt_ids):
            return  # one long prompt, not done yet
        with self._cv:  # rows n..n+m-1 now hold whole prompts: they join the decode batch
            done, self.prefilling = self.prefilling[:m], self.prefilling[m:]
            self.running.extend(done)
            self.streams.extend(TextStream(self.codec, s.params.stop) for s in done)
        self._sample_and_emit(logits, rows=range(n, n + m))

    def _decode_step(self) -> None:
        n = len(self.running)
        last = torch.tensor([s.out_ids[-1] for s in self.running], device=self.device)[:, None]
        logits = self.model(last, cache=_row_view(self.cache, 0, n)).logits[:, -1]
        self.steps += 1
        self._sample_and_emit(logits, rows=range(n))

    def _sample_and_emit(self, logits_NV: torch.Tensor, rows: range) -> None:
        seqs = [self.running[r] for r in rows]
        sampled = [i for i, s in enumerate(seqs) if s.sampling.temperature > 0]
        if len(sampled) < len(seqs):
            tokens = logits_NV.argmax(-1).tolist()
        else:
            tokens = [0] * len(seqs)
        if sampled:  # one batched pass; each row its own generator, so draws do not depend on the batch
            pick = [seqs[i] for i in sampled]
            rows_V = logits_NV if len(sampled) == len(seqs) else logits_NV[sampled]
            top_p = [s.sampling.top_p or 1.0 for s in pick]
            drawn = sample_rows(rows_V, torch.tensor([s.sampling.temperature for s in pick]),
                                torch.tensor(top_p) if min(top_p) < 1 else None, [s.generator for s in pick])
            for i, tok in zip(sampled, drawn.tolist()):
                tokens[i] = tok
        now = time.perf_counter()
        finished: list[tuple[int, str]] = []
        for r, s, tok in zip(rows, seqs, tokens):
            s.out_ids.append(tok)
            if self.metrics is not None:
                if s.last_token_time is None:
                    self.metrics.ttft.observe(now - s.arrival)
                else:
                    self.metrics.itl.observe(now - s.last_token_time)
                self.metrics.generation_tokens.inc()
            s.last_token_time = now
            stream = self.streams[r]
            if tok in self.eos:
                text, reason = stream.flush()[0], "stop"
            else:
                text, hit = stream.push(tok)
                reason = "stop" if hit else None
                if reason is None and len(s.out_ids) >= s.params.max_tokens:
                    rest, hit = stream.flush()
                    text, reason = text + rest, "stop" if hit else "length"
            self._emit(s, Event(s.index, text, len(s.out_ids), reason))
            if reason is not None:
                finished.append((r, reason))
        for r, reason in sorted(finished, reverse=True):
            self.running[r].finish_reason = reason
            self._free(r, None)

    def _move_row(self, src: int, dst: int) -> None:
        p = int(self.cache.pos[src])
        for kv in (self.cache.k, self.cache.v):
            for t in kv:
                t[dst, :, :p] = t[src, :, :p]
        self.cache.pos[dst] = p

    def _free(self, row: int, reason: str | None) -> None:
        """Remove running[row]; refill rows so running and prefilling rows stay contiguous."""
        with self._cv:
            s = self.running[row]
            last = len(self.running) - 1
            if row != last:
                self._move_row(last, row)
                self.running[row], self.streams[row] = self.running[last], self.streams[last]
            self.running.pop()
            self.streams.pop()
            if self.prefilling:  # row `last` is now a hole before the prefilling rows
                self._move_row(last + len(self.prefilling), last)
                self.prefilling.insert(0, self.prefilling.pop())
        self._finished(s, reason)

    def _free_prefilling(self, i: int, reason: str) -> None:
        with self._cv:
            s, n, last = self.prefilling[i], len(self.running), len(self.prefilling) - 1
            if i != last:
                self._move_row(n + last, n + i)
                self.prefilling[i] = self.prefilling[last]
            self.prefilling.pop()
        self._finished(s, reason)

    def _finished(self, s: Sequence, reason: str | None) -> None:
        self._count_finished(reason or s.finish_reason)
        if reason is not None:
            s.finish_reason = reason
            self._emit(s, Event(s.index, "", len(s.out_ids), reason))

    def _count_finished(self, reason: str | None) -> None:
        if self.metrics is not None:
            self.metrics.finished.labels(reason=reason or "unknown").inc()

    @staticmethod
    def _emit(s: Sequence, ev: Event) -> None:
        try:
            s.sink(ev)
        except Exception:  # a client's closed event loop must not stop the engine
            log.debug("dropping an event for a closed client", exc_info=True)
