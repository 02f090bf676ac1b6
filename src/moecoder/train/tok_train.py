"""Byte-level BPE tokenizer training on the train split of a built corpus.

Writes tokenizer.json (the `tokenizers` format) and tokenizer_config.json / special_tokens_map.json so the folder
loads with any Hugging Face tokenizer loader; <|endoftext|> is bos, eos and pad.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from moecoder.hashing import sha256_file
from moecoder.train.data import DataError, count_lines, iter_texts, split_file, write_json_atomic

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB = 257  # 256 byte symbols + <|endoftext|>


def train_tokenizer(corpus_dir: Path, out_dir: Path, vocab_size: int = 8192, min_frequency: int = 2,
                    max_docs: int | None = None, progress: bool = False) -> dict:
    """Train byte-level BPE on corpus_dir/train.jsonl and save it to out_dir; returns a small summary dict."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab size must be at least {MIN_VOCAB} (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    train_file = split_file(corpus_dir, "train")
    texts = iter_texts(train_file)
    n_docs = count_lines(train_file)
    if n_docs == 0:
        raise DataError(f"train split of {corpus_dir} is empty")
    if max_docs is not None:
        n_docs = min(n_docs, max_docs)
        texts = (t for i, t in zip(range(max_docs), texts))

    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    # Code cares about exact whitespace: no prefix space, offsets untrimmed, so decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts, trainer=trainer, length=n_docs)
    eos_id = tok.token_to_id(EOS_TOKEN)
    if eos_id is None:  # cannot happen with special_tokens above; guards a tokenizers behaviour change
        raise DataError(f"{EOS_TOKEN} missing from trained vocabulary")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tokenizer.json.tmp{os.getpid()}"
    tok.save(str(tmp))
    os.replace(tmp, out_dir / "tokenizer.json")
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    write_json_atomic(out_dir / "special_tokens_map.json", special)
    write_json_atomic(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    })
    return {"vocab_size": tok.get_vocab_size(), "eos_id": eos_id, "docs": n_docs,
            "sha256": sha256_file(out_dir / "tokenizer.json"), "elapsed_s": round(time.perf_counter() - t0, 3)}


def load_tokenizer(tok_dir: Path):
    """The `tokenizers.Tokenizer` saved in tok_dir, with a clear error when it is missing or unreadable."""
    from tokenizers import Tokenizer

    path = Path(tok_dir) / "tokenizer.json"
    if not Path(tok_dir).is_dir():
        raise DataError(f"tokenizer dir not found: {tok_dir}")
    if not path.is_file():
        raise DataError(f"no tokenizer.json in {tok_dir} (run `moecoder tokenizer train` first)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception on parse errors)
        raise DataError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def eos_id_of(tok) -> int:
    eos = tok.token_to_id(EOS_TOKEN)
    if eos is None:
        raise DataError(f"tokenizer has no {EOS_TOKEN} token")
    return eos
