"""The continuous-batching engine against plain full-sequence forwards, on a random debug model."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from serve_fixtures import build_codec, build_model

from moecoder.serve.engine import Engine, QueueFull, RequestParams, Sequence, TextStream, kv_bytes_per_token


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    return build_codec(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(codec):
    return build_model(codec)


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step: no cache, no batching."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.finish_reason is not None:
            self.done.set()

    @property
    def text(self):
        return "".join(e.text for e in self.events)


def run_all(engine, seqs, timeout=60):
    engine.submit(seqs)
    for s in seqs:
        assert s.sink.done.wait(timeout), "sequence did not finish"


def wait_until(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.005)


def make_seq(prompt, max_tokens, **kw):
    return Sequence(prompt, RequestParams(max_tokens=max_tokens, **{"temperature": 0.0, **kw}), Collector())


PROMPTS = ["def add(a, b):", "x", "for i in range(10):\n    print(i)", "class Stack:\n    def push", "import os"]


@pytest.mark.parametrize("prefill_chunk", [512, 5])
def test_batched_decode_equals_reference(model, codec, prefill_chunk):
    """Requests of different lengths joining and leaving a batch of 3 slots (so some queue, rows get
    compacted and prompts are prefilled beside running rows; with prefill_chunk=5 the longer
    prompts are prefilled in pieces over several steps) give the reference greedy tokens."""
    prompts = [codec.encode(p) for p in PROMPTS]
    assert max(map(len, prompts)) > 2 * 5
    max_tokens = [12, 5, 9, 1, 7]  # 1: finishes in the step that completes its prompt
    refs = [reference_greedy(model, p, n) for p, n in zip(prompts, max_tokens)]
    engine = Engine(model, codec, [], max_batch=3, max_context=64, max_queue=16, prefill_chunk=prefill_chunk).start()
    try:
        seqs = [make_seq(p, n) for p, n in zip(prompts, max_tokens)]
        run_all(engine, seqs)
        for s, ref in zip(seqs, refs):
            assert s.out_ids == ref
            assert s.finish_reason == "length"
            assert s.sink.events[-1].completion_tokens == len(ref)
            assert s.sink.text == codec.decode(ref)
        # one more after the others finished reuses a freed row
        late = make_seq(prompts[0], 12)
        run_all(engine, [late])
        assert late.out_ids == refs[0]
        st = engine.stats()
        assert (st["running"], st["prefilling"], st["waiting"], st["kv_used_tokens"]) == (0, 0, 0, 0)
    finally:
        engine.shutdown()


def test_eos_ends_with_stop(model, codec):
    prompt = codec.encode(PROMPTS[2])
    ref = reference_greedy(model, prompt, 10)
    eos = ref[4]
    first = ref.index(eos)
    engine = Engine(model, codec, [eos], max_batch=2, max_context=64).start()
    try:
        s = make_seq(prompt, 10)
        run_all(engine, [s])
        assert s.finish_reason == "stop"
        assert s.out_ids == ref[: first + 1]
        assert s.sink.text == codec.decode(ref[:first])  # the EOS token itself is not text
    finally:
        engine.shutdown()


def test_seeded_sampling_is_deterministic_alone_or_batched(model, codec):
    prompt = codec.encode(PROMPTS[0])
    engine = Engine(model, codec, [], max_batch=4, max_context=64).start()
    try:
        alone = make_seq(prompt, 16, temperature=1.0, top_p=0.9, seed=123)
        run_all(engine, [alone])
        batch = [make_seq(prompt, 16, temperature=1.0, top_p=0.9, seed=s) for s in (123, 7, 8)]
        run_all(engine, batch)
        assert batch[0].out_ids == alone.out_ids
        assert batch[1].out_ids != batch[2].out_ids  # different seeds differ (16 draws from a flat 320-way)
    finally:
        engine.shutdown()


def test_stop_text_stream_holds_back_partial_stop(codec):
    ids = codec.encode("abc STOP def")
    stream = TextStream(codec, ("STOP",))
    sent, hit = "", False
    for t in ids:
        out, hit = stream.push(t)
        sent += out
        if hit:
            break
    assert hit and sent == "abc "
    # a partial stop at the end is released by flush
    stream = TextStream(codec, ("STOP",))
    sent = "".join(stream.push(t)[0] for t in codec.encode("abc ST"))
    assert sent == "abc "
    assert sent + stream.flush()[0] == "abc ST"


def test_stop_string_ends_generation(model, codec):
    prompt = codec.encode(PROMPTS[0])
    ref_text = codec.decode(reference_greedy(model, prompt, 20))
    stop = ref_text[6:9]
    assert stop and len(stop) == 3
    engine = Engine(model, codec, [], max_batch=2, max_context=64).start()
    try:
        s = make_seq(prompt, 20, stop=(stop,))
        run_all(engine, [s])
        assert s.finish_reason == "stop"
        assert s.sink.text == ref_text[: ref_text.index(stop)]
        assert len(s.out_ids) < 20
    finally:
        engine.shutdown()


def test_cancel_frees_slot_and_queue_is_bounded(model, codec):
    prompt = codec.encode(PROMPTS[1])
    engine = Engine(model, codec, [], max_batch=1, max_context=256, max_queue=1).start()
    try:
        long = make_seq(prompt, 250)
        queued = make_seq(prompt, 250)
        engine.submit([long])
        wait_until(lambda: engine.stats()["running"] == 1)
        engine.submit([queued])
        with pytest.raises(QueueFull) as e:
            engine.submit([make_seq(prompt, 5)])
        assert e.value.retry_after_s >= 1
        engine.cancel([long, queued])
        assert long.sink.done.wait(10)
        assert long.finish_reason == "cancelled"
        wait_until(lambda: sum(engine.stats()[k] for k in ("running", "prefilling", "waiting")) == 0)
        after = make_seq(prompt, 3)
        run_all(engine, [after])
        assert len(after.out_ids) == 3
    finally:
        engine.shutdown()


def test_no_queue_still_admits_into_free_rows(model, codec):
    engine = Engine(model, codec, [], max_batch=2, max_context=64, max_queue=0).start()
    try:
        seqs = [make_seq(codec.encode("x"), 40), make_seq(codec.encode("y"), 40)]
        engine.submit(seqs)  # two free rows
        with pytest.raises(QueueFull):
            engine.submit([make_seq(codec.encode("z"), 4)])
        engine.cancel(seqs)
    finally:
        engine.shutdown()


def test_kv_budget_limits_slots(model, codec):
    per_row_mb = kv_bytes_per_token(model, torch.float32) * 128 / 2**20
    engine = Engine(model, codec, [], max_batch=8, max_context=128, kv_budget_mb=3.5 * per_row_mb)
    assert engine.slots == 3
    assert engine.cache.nbytes() <= 3.5 * per_row_mb * 2**20
    with pytest.raises(ValueError, match="kv-budget-mb"):
        Engine(model, codec, [], max_batch=8, max_context=128, kv_budget_mb=0.5 * per_row_mb)


def test_prompt_plus_max_tokens_over_context_is_refused(model, codec):
    engine = Engine(model, codec, [], max_batch=1, max_context=16).start()
    try:
        with pytest.raises(ValueError, match="context limit 16"):
            engine.submit([make_seq(list(range(10)), 7)])
    finally:
        engine.shutdown()


def test_failed_step_ends_its_sequences_and_engine_keeps_serving(model, codec, monkeypatch):
    engine = Engine(model, codec, [], max_batch=2, max_context=64).start()
    try:
        real_forward, calls = model.forward, []

        def flaky(*a, **kw):
            calls.append(1)
            if len(calls) == 2:  # the first decode step
                raise RuntimeError("boom")
            return real_forward(*a, **kw)

        monkeypatch.setattr(model, "forward", flaky)
        bad = make_seq(codec.encode("x"), 5)
        run_all(engine, [bad])
        assert bad.finish_reason == "error" and bad.sink.events[-1].finish_reason == "error"
        assert engine.alive and engine.failed_steps == 1
        good = make_seq(codec.encode("x"), 5)
        run_all(engine, [good])
        assert good.finish_reason == "length" and len(good.out_ids) == 5
    finally:
        engine.shutdown()


def test_tiny_temperature_or_top_p_is_greedy(model, codec):
    prompt = codec.encode(PROMPTS[0])
    engine = Engine(model, codec, [], max_batch=1, max_context=64).start()
    try:
        ref = reference_greedy(model, prompt, 8)
        tiny_t = make_seq(prompt, 8, temperature=5e-324)  # logits / t would overflow to inf
        tiny_p = make_seq(prompt, 8, temperature=1.0, top_p=1e-61)  # 0 in float32: every token dropped
        run_all(engine, [tiny_t, tiny_p])
        assert tiny_t.out_ids == ref and tiny_p.out_ids == ref
    finally:
        engine.shutdown()


def test_new_request_joins_running_batch(model, codec):
    """A short request submitted while a long one decodes starts at the next step and finishes
    first: it does not wait for the batch to drain."""
    engine = Engine(model, codec, [], max_batch=2, max_context=256).start()
    try:
        long = make_seq(codec.encode(PROMPTS[0]), 240)
        engine.submit([long])
        wait_until(lambda: len(long.out_ids) >= 3)
        short = make_seq(codec.encode(PROMPTS[1]), 4)
        engine.submit([short])
        assert short.sink.done.wait(30)
        assert long.finish_reason is None and len(long.out_ids) < 240  # still running
        assert short.out_ids == reference_greedy(model, codec.encode(PROMPTS[1]), 4)
        engine.cancel([long])
        assert long.sink.done.wait(10)
    finally:
        engine.shutdown()


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(model, codec):
    """With prefill_chunk=4 a 24+ token prompt takes several steps to prefill, and the running
    sequence decodes a token in each of them instead of waiting for the whole prompt."""
    engine = Engine(model, codec, [], max_batch=2, max_context=256, prefill_chunk=4).start()
    try:
        runner = make_seq(codec.encode("x"), 200)
        engine.submit([runner])
        wait_until(lambda: len(runner.out_ids) >= 2)
        prompt = codec.encode("def add(a, b):\n    return a + b\n" * 3)
        assert len(prompt) >= 24
        late = make_seq(prompt, 3)
        seen = late.sink
        runner_at_first: list[int] = []

        def sink(ev):  # runs on the engine thread: the runner's count at this exact step
            if not runner_at_first:
                runner_at_first.append(len(runner.out_ids))
            seen(ev)

        late.sink = sink
        before = len(runner.out_ids)
        engine.submit([late])
        assert seen.done.wait(30)
        assert late.out_ids == reference_greedy(model, prompt, 3)
        assert runner_at_first[0] - before >= -(-len(prompt) // 4) - 1 - 1  # one step of slack at admission
        engine.cancel([runner])
    finally:
        engine.shutdown()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_mix_with_cancellations_keeps_every_row_right(model, codec, seed):
    """Row bookkeeping under churn: random prompt lengths (chunked prefill), random output lengths,
    random cancellations; every sequence that is not cancelled still gets the reference tokens."""
    import random

    rng = random.Random(seed)
    vocab = model.cfg.vocab_size
    specs = [([rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))], rng.randint(1, 15)) for _ in range(12)]
    engine = Engine(model, codec, [], max_batch=4, max_context=64, max_queue=16, prefill_chunk=7).start()
    try:
        seqs = [make_seq(p, n) for p, n in specs]
        engine.submit(seqs)
        doomed = rng.sample(range(12), 4)
        for i in doomed:
            time.sleep(rng.random() * 0.01)
            engine.cancel([seqs[i]])
        for s in seqs:
            assert s.sink.done.wait(60)
        for i, (s, (p, n)) in enumerate(zip(seqs, specs)):
            if s.finish_reason == "cancelled":
                assert i in doomed
                continue
            assert s.finish_reason == "length" and s.out_ids == reference_greedy(model, p, n), i
        wait_until(lambda: sum(engine.stats()[k] for k in ("running", "prefilling", "waiting")) == 0)
        assert engine.stats()["kv_used_tokens"] == 0 and engine.failed_steps == 0
    finally:
        engine.shutdown()


def test_mla_model_batches_right_and_budgets_the_latent_cache(codec):
    """A DeepSeek-style model (latent KV cache, group-limited sigmoid routing, a dense first layer):
    batched rows, row compaction and chunked prefill give the reference tokens, and the KV budget
    counts the latent (kv_lora_rank + qk_rope_dim per token and layer), not per-head keys/values."""
    mla = build_model(codec, kv_lora_rank=16, q_lora_rank=None, qk_nope_dim=8, qk_rope_dim=4, v_head_dim=8,
                      rope_interleave=True, score_func="sigmoid", routing_bias=True, n_groups=2, topk_groups=1,
                      group_score="top2", dense_layers=(0,))
    per_token = mla.cfg.n_layers * (16 + 4) * 4
    assert kv_bytes_per_token(mla, torch.float32) == per_token
    engine = Engine(mla, codec, [], max_batch=8, max_context=64, kv_budget_mb=2.5 * per_token * 64 / 2**20,
                    prefill_chunk=5)
    assert engine.slots == 2 and engine.cache.nbytes() == 2 * 64 * per_token
    prompts = [codec.encode(p) for p in PROMPTS]
    max_tokens = [6, 3, 5, 2, 4]
    refs = [reference_greedy(mla, p, n) for p, n in zip(prompts, max_tokens)]
    engine.start()
    try:
        seqs = [make_seq(p, n) for p, n in zip(prompts, max_tokens)]
        run_all(engine, seqs)
        assert [s.out_ids for s in seqs] == refs
    finally:
        engine.shutdown()
