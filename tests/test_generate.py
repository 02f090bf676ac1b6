"""Generation on a small in-memory MoE: cached decode vs recompute, batching, sampling, EOS, stop strings."""

import pytest
import torch

from moecoder.config import get_preset
from moecoder.generate import (
    GenerationError,
    SamplingParams,
    StopMatcher,
    generate,
    generate_stream,
    generate_text,
    sample,
    stream_text,
)
from moecoder.model import Transformer
from moecoder.tokenizer import train_byte_bpe

GREEDY = SamplingParams()




def _model(**kw):
    cfg = get_preset("debug").replace(**kw)
    m = Transformer(cfg)
    m.init_weights(std=0.1, seed=0)  # larger than default: logits far from ties, argmax is stable
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompts(lengths, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _greedy_by_recompute(model, prompt, n):
    """The obviously correct loop: full forward over the whole sequence for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 4, "qk_norm": "full", "rotary_dim": 8}])
def test_greedy_matches_full_recompute(kw):
    m = _model(**kw)
    prompt = _prompts([7])[0]
    out = generate(m, [prompt], max_new_tokens=12)
    assert out[0].tokens == _greedy_by_recompute(m, prompt, 12)
    assert out[0].finish_reason == "length"


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 4, "n_shared_experts": 1, "qk_norm": "head"}])
def test_batch_of_different_lengths_equals_one_at_a_time(kw):
    model = _model(**kw)
    prompts = _prompts([3, 11, 1, 6])
    batched = generate(model, prompts, max_new_tokens=10)
    for p, c in zip(prompts, batched):
        assert c.tokens == generate(model, [p], max_new_tokens=10)[0].tokens
    assert len({tuple(c.tokens) for c in batched}) > 1  # rows really differ


def test_seeded_sampling_is_per_row_and_reproducible(model):
    prompts = _prompts([4, 9, 2])
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=123)
    batched = generate(model, prompts, 8, params, seeds=[5, 6, 7])
    singles = [generate(model, [p], 8, params, seeds=[s])[0] for p, s in zip(prompts, [5, 6, 7])]
    assert [c.tokens for c in batched] == [c.tokens for c in singles]
    assert [c.tokens for c in generate(model, prompts, 8, params)] == [c.tokens for c in generate(model, prompts, 8,
                                                                                                  params)]
    other = generate(model, prompts, 8, SamplingParams(temperature=1.0, seed=124))
    assert [c.tokens for c in other] != [c.tokens for c in generate(model, prompts, 8, params)]


def test_eos_stops_a_row_and_is_not_returned(model):
    prompts = _prompts([5, 8])
    free = generate(model, prompts, 10)
    eos = free[0].tokens[3]
    cut = free[0].tokens.index(eos)
    out = generate(model, prompts, 10, eos_ids=[eos])
    assert out[0].tokens == free[0].tokens[:cut] and out[0].finish_reason == "stop"
    # the other row is untouched unless it produces the same id
    other = free[1].tokens
    expect = other[: other.index(eos)] if eos in other else other
    assert out[1].tokens == expect


def test_max_seq_len_caps_generation():
    m = _model(max_seq_len=12)
    out = generate(m, _prompts([9, 2]), max_new_tokens=50)
    assert [len(c.tokens) for c in out] == [3, 10]
    assert all(c.finish_reason == "length" for c in out)
    with pytest.raises(GenerationError, match="max_seq_len"):
        generate(m, _prompts([12]), 1)


def test_stream_events_and_early_stop(model):
    events = list(generate_stream(model, _prompts([3, 5]), 4))
    assert [e for e in events if e[2] is not None] == [(0, None, "length"), (1, None, "length")]
    assert sum(1 for e in events if e[1] is not None) == 8
    stream = generate_stream(model, _prompts([3]), 1000)
    first = [next(stream) for _ in range(3)]
    stream.close()  # no error, nothing left running
    assert all(tok is not None for _, tok, _ in first)
    assert list(generate_stream(model, _prompts([3]), 0)) == [(0, None, "length")]


def test_sample_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, SamplingParams(temperature=1.0, top_p=0.7), [gen])) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7 so token 1 is needed; 0.8 >= 0.7 so token 2 is not
    seen = {int(sample(logits, SamplingParams(temperature=1.0, top_k=3), [gen])) for _ in range(300)}
    assert seen == {0, 1, 2}
    assert int(sample(logits, SamplingParams(temperature=5.0, top_k=1), [gen])) == 0
    assert int(sample(logits, SamplingParams(temperature=5.0, top_p=0.01), [gen])) == 0
    assert int(sample(logits, GREEDY)) == 0
    counts = torch.bincount(torch.cat([sample(logits, SamplingParams(temperature=1.0), [gen]) for _ in range(2000)]),
                            minlength=4).float() / 2000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04)


@pytest.mark.parametrize(
    "kw, match",
    [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p")],
)
def test_bad_sampling_params(kw, match):
    with pytest.raises(GenerationError, match=match):
        SamplingParams(**kw)


def test_bad_prompts(model):
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(GenerationError, match="token id 300 outside the vocabulary of 256"):
        generate(model, [[1, 300]], 3)
    with pytest.raises(GenerationError, match="no prompts"):
        generate(model, [], 3)
    with pytest.raises(GenerationError, match="2 seeds for 1 prompts"):
        generate(model, [[1]], 3, SamplingParams(temperature=1), seeds=[1, 2])


@pytest.mark.parametrize(
    "pieces, stops, emitted, stopped",
    [
        (["ab", "c<", "/e", "nd>tail"], ["</end>"], ["ab", "c", "", ""], True),
        (["x</", "en", "q"], ["</end>"], ["x", "", "</enq"], False),
        (["aaa", "b"], ["aab"], ["a", ""], True),  # holds "aa", the longest possible start
        (["hello"], [], ["hello"], False),
        (["END at start"], ["END"], [""], True),
    ],
)
def test_stop_matcher(pieces, stops, emitted, stopped):
    m = StopMatcher(stops)
    assert [m.feed(p) for p in pieces] == emitted
    assert m.stopped == stopped
    if not stopped:
        assert "".join(emitted) + m.flush() == "".join(pieces)


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    corpus = ["def f(x):\n    return x * 2  # größer\n", "while True:\n    pass\n", "print('ok')\n"] * 30
    tok = train_byte_bpe(corpus, 300, tmp_path_factory.mktemp("tok"))
    m = _model(vocab_size=tok.vocab_size)
    return m, tok


def test_text_generation_stop_strings_and_streaming(text_setup):
    m, tok = text_setup
    prompts = [tok.encode("def f(x):"), tok.encode("print(")]
    free = generate_text(m, tok, prompts, 30)
    tokens_free = generate(m, prompts, 30)
    for c, t in zip(free, tokens_free):
        assert c.tokens == t.tokens and c.text == tok.decode(t.tokens)
    text = free[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    cut = generate_text(m, tok, prompts, 30, stop=[stop])
    assert cut[0].text == text[: text.index(stop)] and cut[0].finish_reason == "stop"
    # streaming pieces reassemble the same texts, row by row
    streamed = ["", ""]
    finishes = {}
    for b, piece, finish in stream_text(m, tok, prompts, 30, stop=[stop]):
        streamed[b] += piece
        if finish:
            finishes[b] = finish
    assert streamed == [c.text for c in cut]
    assert finishes == {0: "stop", 1: cut[1].finish_reason}


def test_tiny_temperature_and_top_p_sample_the_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0, -3.0], [2.0, 0.0, 1.0, 0.5]])
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    for params in (SamplingParams(temperature=1e-30, seed=0), SamplingParams(temperature=1.0, top_p=1e-50, seed=0)):
        assert sample(logits, params, gens).tolist() == [1, 0]


@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])  # flat to peaked distributions
def test_top_p_filter_equals_a_full_sort(scale):
    from moecoder.generate import _top_p_filter

    g = torch.Generator().manual_seed(int(scale * 10))
    probs = (torch.randn(6, 3000, generator=g) * scale).softmax(-1)
    top_p = torch.tensor([0.05, 0.5, 0.9, 0.99, 1.0, 1e-9])
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]
    drop_sorted[:, 0] = False
    drop_sorted[top_p >= 1] = False  # top_p 1 keeps everything (a float cumsum may reach 1 early)
    expected = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
    assert torch.equal(_top_p_filter(probs, top_p), expected)


def test_sample_rows_uses_each_rows_settings_and_generator():
    from moecoder.generate import sample_rows

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    draws = torch.stack([sample_rows(logits, torch.tensor([1.0, 1.0, 1e-3]), torch.tensor([0.7, 1.0, 1.0]), gens)
                         for _ in range(3000)])
    assert set(draws[:, 0].tolist()) == {0, 1}  # top_p 0.7 keeps the first two
    assert set(draws[:, 2].tolist()) == {0}  # temperature 1e-3 is greedy in effect
    freq = torch.bincount(draws[:, 1], minlength=4).float() / 3000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    # row 1 alone, from a fresh generator with the same seed, draws the same tokens
    again = [int(sample_rows(logits[1:2], torch.tensor([1.0]), None, [g]))
             for g in [torch.Generator().manual_seed(2)] for _ in range(50)]
    assert again == draws[:50, 1].tolist()
