"""Tokenizer folder loading, chat templates and streaming detokenization, on a BPE trained here."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moecoder.tokenizer import (
    REPLACEMENT_CHAR,
    ChatTemplateError,
    Tokenizer,
    TokenizerError,
    train_byte_bpe,
)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "# Grüße aus München — naïve café, 東京タワー and ünïcödé\n",
    "for i in range(10):\n    print(i * i)\n",
] * 40  # a few KB

TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer=trainer)
    tk.save(str(d / "tokenizer.json"))
    n = tk.get_vocab_size()  # the corpus is small: fewer merges than asked for
    config = {
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": "</s>",
        "add_bos_token": True,
        "added_tokens_decoder": {"0": {"content": "<s>", "special": True}, "1": {"content": "</s>", "special": True},
                                 str(n): {"content": "<tool>", "special": True}},
        "chat_template": TEMPLATE,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def test_special_tokens_from_config(tok):
    assert (tok.bos_token, tok.bos_token_id) == ("<s>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 1)
    n = tok.tk.get_vocab_size(with_added_tokens=False)
    assert tok.token_to_id("<tool>") == n  # added from added_tokens_decoder
    assert tok.vocab_size == n + 1
    assert tok.encode("x <tool> y", add_special_tokens=False).count(n) == 1


@pytest.mark.parametrize("text", ["def add(a, b):\n    return a + b\n", "Grüße 東京 🦀 naïve", "", "  \t\n"])
def test_encode_decode_roundtrip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id  # add_bos_token
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_stream_decoder_emits_only_whole_characters(tok):
    text = "print('Grüße 東京 🦀🦀 naïve café')\n"
    ids = tok.encode(text, add_special_tokens=False)
    # The test only means something if some token holds a partial character.
    assert any(REPLACEMENT_CHAR in tok.decode([i]) for i in ids)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text
    assert "" in pieces  # held back at least once, mid-character


def test_stream_decoder_flush_returns_incomplete_tail(tok):
    ids = tok.encode("🦀", add_special_tokens=False)
    assert len(ids) >= 2  # never seen in training: one token per byte
    dec = tok.stream_decoder()
    assert "".join(dec.push(i) for i in ids[:-1]) == ""  # emoji not complete yet
    tail = dec.flush()
    assert tail and set(tail) == {REPLACEMENT_CHAR}  # the held-back bytes, lossily decoded
    assert dec.flush() == ""  # nothing held twice


def test_stream_decoder_skips_special_tokens(tok):
    ids = tok.encode("a b", add_special_tokens=False) + [tok.eos_token_id]
    dec = tok.stream_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "a b"


def test_chat_template_renders_with_generation_prompt(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi <b>&"}]
    text = tok.apply_chat_template(msgs)
    assert text == "<s>[system] be brief</s>\n[user] hi <b>&</s>\n[assistant] "
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("[assistant] ")
    ids = tok.encode_chat(msgs)
    assert ids.count(tok.bos_token_id) == 1 and ids.count(tok.eos_token_id) == 2


def test_chat_template_raise_exception(tok):
    msgs = [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]
    with pytest.raises(ChatTemplateError, match="system must come first"):
        tok.apply_chat_template(msgs)


def test_chat_template_is_sandboxed(tok_dir):
    t = Tokenizer.from_dir(tok_dir)
    t.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match="SecurityError"):
        t.apply_chat_template([])


def test_chat_template_tojson_does_not_html_escape(tok_dir):
    t = Tokenizer.from_dir(tok_dir)
    t.chat_template = "{{ messages | tojson }}"
    assert t.apply_chat_template([{"role": "user", "content": "<a & b>"}]) == '[{"role": "user", "content": "<a & b>"}]'


def test_template_list_and_jinja_file(tmp_path, tok_dir):
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    cfg = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([]) == "D"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages|length }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": ""}]) == "J1"


def test_bad_folders_are_named(tmp_path, tok_dir):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="eos_token '<nope>' is not in the vocabulary"):
        Tokenizer.from_dir(tmp_path)
    bad_ids = {"added_tokens_decoder": {"7": {"content": "</s>", "special": True}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(bad_ids))
    with pytest.raises(TokenizerError, match="has id 1 but tokenizer_config.json says 7"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.from_dir(tmp_path)


def test_train_byte_bpe_writes_a_loadable_folder(tmp_path):
    t = train_byte_bpe(CORPUS, 300, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    again = Tokenizer.from_dir(tmp_path)
    assert again.vocab_size == t.vocab_size == 300
    assert again.eos_token_id == again.token_to_id("<|endoftext|>")
    text = again.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert again.decode(again.encode_chat([{"role": "user", "content": "hi"}]), skip_special_tokens=False) == text
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        again.apply_chat_template([{"role": "tool", "content": "x"}])
