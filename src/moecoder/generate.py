"""Autoregressive generation on token ids: prefill, decode_one_token, sample (gpt-fast style).

A batch of prompts of different lengths is right-padded and prefilled in one forward
(`logits_at` picks each row's last real position, so the LM head runs once per row); each
row's cache position is then set to its own length and decoding proceeds with per-row
positions. Rows that finish keep decoding with the batch (their tokens are dropped): the
batch stays rectangular and the decode step stays one small function that torch.compile
can wrap.

The text layer (`stream_text`, `generate_text`) adds the tokenizer: incremental
detokenization and stop strings.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .kernels import cpu as cpu_kernels
from .model import KVCache, Transformer


class GenerationError(ValueError):
    """Bad generation arguments (empty prompt, out-of-range ids, invalid sampling settings)."""


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k / top_p filter before sampling; seed makes it reproducible.

    With a seed, row i of a batch samples from its own generator seeded `seed + i`, so a row's
    output does not depend on which other prompts share its batch (see `seeds` to set each row's).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)  # generated ids, EOS excluded
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length"
    text: str = ""  # filled by the text layer


# --- the three small functions ---


def sample(logits_BV: torch.Tensor, params: SamplingParams,
           generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """Pick one token per row [B] from logits [B, V]: greedy, or temperature/top-k/top-p sampling."""
    if params.temperature == 0:
        return logits_BV.argmax(dim=-1)
    return sample_rows(logits_BV, torch.full((logits_BV.shape[0],), params.temperature),
                       None if params.top_p is None else torch.full((logits_BV.shape[0],), params.top_p),
                       generators, top_k=params.top_k)


def sample_rows(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_p_B: torch.Tensor | None = None,
                generators: Sequence[torch.Generator | None] | None = None, top_k: int | None = None) -> torch.Tensor:
    """Sample one token per row [B], each row with its own temperature (> 0), top_p and generator.

    One batched pass over the logits; the draw is by inverse CDF: row b takes the first token whose
    cumulative probability exceeds u_b * total, with u_b ~ U[0, 1) from row b's generator. That is
    the categorical distribution exactly, costs one cumsum and a binary search (torch.multinomial
    measured ~20x slower per row on CPU), and a zero-probability token is never chosen.
    """
    # Shift by the max first: with a tiny temperature the division then gives 0 and -inf, never inf - inf.
    logits = logits_BV.float()
    z = torch.sub(logits, logits.amax(dim=-1, keepdim=True)).div_(temperature_B.to(logits)[:, None])
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z.masked_fill_(z < kth, float("-inf"))
    weights = z.exp_()  # unnormalised probabilities (the top token's is 1): the draw scales u by the total
    if top_p_B is not None and bool((top_p_B < 1).any()):
        weights = _top_p_filter(weights / weights.sum(dim=-1, keepdim=True), top_p_B.to(weights))
    gens = generators if generators is not None else [None] * weights.shape[0]
    u_B = torch.cat([torch.rand(1, generator=g) for g in gens])
    cdf = weights.cumsum(dim=-1)
    token_B = torch.searchsorted(cdf, (u_B * cdf[:, -1])[:, None], right=True)[:, 0]
    overflow = token_B >= weights.shape[-1]  # u * total rounded up to total: take the last possible token
    if bool(overflow.any()):
        last_B = weights.shape[-1] - 1 - (weights.flip(-1) > 0).int().argmax(dim=-1)
        token_B = torch.where(overflow, last_B, token_B)
    return token_B


def _top_p_filter(probs_BV: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Zero every token whose higher-ranked tokens already cover top_p (the top token always stays).

    Sorting the whole vocabulary is slow on CPU (8 rows of 152k: ~0.1 s), so each row sorts only
    its candidates: the tokens with p >= c, for a cut c lowered (by 4x) until they hold top_p of
    the mass. A token below c has at least that mass ranked above it, so it is dropped anyway.
    """
    cut_B = probs_BV.amax(dim=-1)
    for _ in range(64):
        mass_B = (probs_BV * (probs_BV >= cut_B[:, None])).sum(dim=-1)
        short = mass_B < top_p_B
        if not bool(short.any()):
            break
        cut_B = torch.where(short, cut_B / 4, cut_B)
    out = torch.zeros_like(probs_BV)
    for b in range(probs_BV.shape[0]):
        if top_p_B[b] >= 1:
            out[b] = probs_BV[b]
            continue
        cand = (probs_BV[b] >= cut_B[b]).nonzero()[:, 0]
        p_sorted, order = probs_BV[b, cand].sort(descending=True)
        keep = (p_sorted.cumsum(0) - p_sorted) < top_p_B[b]
        keep[0] = True  # a top_p below float32 resolution must not drop every token
        kept = cand[order[keep]]
        out[b, kept] = probs_BV[b, kept]
    return out


def prefill(model: Transformer, tokens_BT: torch.Tensor, lengths_B: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run right-padded prompts through the model; return each row's next-token logits [B, V].

    Padding sits after each row's real tokens, so causal attention keeps it invisible to them;
    the cache slots it fills are overwritten by the row's own decode steps.
    """
    out = model(tokens_BT, cache=cache, logits_at=lengths_B - 1)
    cache.pos[: tokens_BT.shape[0]] = lengths_B
    return out.logits[:, 0]


def decode_one_token(model: Transformer, tokens_B1: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One decode step for every row at its own cache position: logits [B, V]."""
    return model(tokens_B1, cache=cache).logits[:, -1]


@functools.cache
def compiled_decode_one_token():
    """decode_one_token under torch.compile, built once per process so that every generate call
    reuses its graphs. Traced, the step has static shapes (see AttentionStep): it compiles once per
    (batch, cache length), not once per position."""
    cpu_kernels.prepare_for_compile()  # bf16 products go to the C kernel as opaque ops when it is in use
    return torch.compile(decode_one_token, dynamic=False)


def cache_length(needed: int, max_seq_len: int, compiled: bool) -> int:
    """KV cache length for a generation needing `needed` positions. A compiled step recompiles for
    every new cache length, so round up to a power of two (at least 256, at most max_seq_len)."""
    if not compiled:
        return needed
    return max(needed, min(max(256, 1 << (needed - 1).bit_length()), max_seq_len))


# --- token-level generation ---


def _model_device_dtype(model: Transformer) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if not prompts:
        raise GenerationError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in p]
        if not ids:
            raise GenerationError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary of {vocab_size}")
        out.append(ids)
    return out


def _generators(params: SamplingParams, n: int, device: torch.device,
                seeds: Sequence[int] | None) -> list[torch.Generator | None]:
    if seeds is not None and len(seeds) != n:
        raise GenerationError(f"got {len(seeds)} seeds for {n} prompts")
    if seeds is None and params.seed is None:
        return [None] * n
    seeds = seeds if seeds is not None else [params.seed + i for i in range(n)]
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@torch.inference_mode()
def generate_stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    eos_ids: Iterable[int] = (),
    seeds: Sequence[int] | None = None,
    compile: bool = False,
) -> Iterator[tuple[int, int | None, str | None]]:
    """Generate for a batch of token-id prompts, yielding events as they happen.

    Each event is (row, token, finish): (row, id, None) for a new token, then once per row
    (row, None, "stop") when it produced an EOS id (not yielded as a token) or
    (row, None, "length") when it reached max_new_tokens or the model's max_seq_len.
    Stopping the iteration early stops the computation.
    """
    cfg = model.cfg
    prompts = _check_prompts(prompts, cfg.vocab_size)
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
        if n >= cfg.max_seq_len:
            raise GenerationError(f"prompt {i} has {n} tokens; the model's max_seq_len is {cfg.max_seq_len}")
    budgets = [min(max_new_tokens, cfg.max_seq_len - n) for n in lengths]
    eos = {int(e) for e in eos_ids}
    device, dtype = _model_device_dtype(model)
    gens = _generators(params, B, device, seeds)
    steps = max(budgets)
    if steps == 0:
        for b in range(B):
            yield b, None, "length"
        return

    cache = KVCache(cfg, B, cache_length(max(lengths) + steps, cfg.max_seq_len, compile), dtype, device=device)
    tokens_BT = torch.zeros(B, max(lengths), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens_BT[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    lengths_B = torch.tensor(lengths, dtype=torch.long, device=device)
    decode = compiled_decode_one_token() if compile else decode_one_token

    logits_BV = prefill(model, tokens_BT, lengths_B, cache)
    counts, done = [0] * B, [False] * B
    for step in range(steps):
        next_B = sample(logits_BV, params, gens)
        for b, tok in enumerate(next_B.tolist()):
            if done[b]:
                continue
            if tok in eos:
                done[b] = True
                yield b, None, "stop"
                continue
            counts[b] += 1
            yield b, tok, None
            if counts[b] >= budgets[b]:
                done[b] = True
                yield b, None, "length"
        if all(done) or step == steps - 1:
            break
        logits_BV = decode(model, next_B[:, None], cache)


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             params: SamplingParams = SamplingParams(), eos_ids: Iterable[int] = (),
             seeds: Sequence[int] | None = None, compile: bool = False) -> list[Completion]:
    """Generate for every prompt and return the completions (token ids and finish reasons)."""
    out = [Completion() for _ in prompts]
    for b, tok, finish in generate_stream(model, prompts, max_new_tokens, params, eos_ids, seeds, compile):
        if tok is not None:
            out[b].tokens.append(tok)
        if finish is not None:
            out[b].finish_reason = finish
    return out


# --- text level: detokenization and stop strings ---


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Return the text that is safe to emit now; sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        buf = self.pending + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return buf[: min(hits)]
        hold = 0  # longest suffix of buf that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def text_events(model: Transformer, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                params: SamplingParams = SamplingParams(), eos_ids: Iterable[int] = (), stop: Sequence[str] = (),
                seeds: Sequence[int] | None = None,
                compile: bool = False) -> Iterator[tuple[int, int | None, str, str | None]]:
    """(row, token, text, finish) events: generate_stream plus detokenization and stop strings.

    `text` is the whole-character text that became safe to show with this event (may be empty).
    """
    B = len(prompts)
    decoders = [tokenizer.stream_decoder() for _ in range(B)]
    matchers = [StopMatcher(stop) for _ in range(B)]
    finished = [False] * B
    events = generate_stream(model, prompts, max_new_tokens, params, eos_ids, seeds, compile)
    try:
        for b, tok, finish in events:
            if finished[b]:
                continue  # a stop string ended this row; the batch decodes on for the others
            if tok is not None:
                text = matchers[b].feed(decoders[b].push(tok))
                if matchers[b].stopped:
                    finished[b] = True
                    yield b, tok, text, "stop"
                    continue
                yield b, tok, text, None
            if finish is not None:
                finished[b] = True
                tail = matchers[b].feed(decoders[b].flush()) + matchers[b].flush()
                yield b, None, tail, "stop" if matchers[b].stopped else finish
            if all(finished):
                break
    finally:
        events.close()  # frees the KV cache now, not at garbage collection


def stream_text(model: Transformer, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                params: SamplingParams = SamplingParams(), eos_ids: Iterable[int] = (),
                stop: Sequence[str] = (), seeds: Sequence[int] | None = None,
                compile: bool = False) -> Iterator[tuple[int, str, str | None]]:
    """Like generate_stream, but yields (row, text, finish): text pieces are whole characters
    (possibly empty on the finishing event). A stop string ends its row with "stop"; the text
    before it is kept, the stop string itself is not."""
    for b, _, text, finish in text_events(model, tokenizer, prompts, max_new_tokens, params, eos_ids, stop,
                                           seeds, compile):
        if text or finish is not None:
            yield b, text, finish


def generate_text(model: Transformer, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  params: SamplingParams = SamplingParams(), eos_ids: Iterable[int] = (),
                  stop: Sequence[str] = (), seeds: Sequence[int] | None = None,
                  compile: bool = False) -> list[Completion]:
    """Generate and detokenize; `tokens` holds every id sampled up to the end (stop string included)."""
    out = [Completion() for _ in prompts]
    for b, tok, text, finish in text_events(model, tokenizer, prompts, max_new_tokens, params, eos_ids, stop,
                                             seeds, compile):
        if tok is not None:
            out[b].tokens.append(tok)
        out[b].text += text
        if finish is not None:
            out[b].finish_reason = finish
    return out
