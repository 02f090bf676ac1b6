"""`moecoder data build|tokenize` and `moecoder tokenizer train`: the training-data pipeline on the command line.

Heavy imports (numpy, tokenizers, torch) stay inside the commands so `moecoder --help` is fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(help="Build a training corpus and tokenise it into packed shards.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train tokenizers.", no_args_is_help=True)


def _user_errors(fn):
    """Run fn, turning data errors into the CLI's one-line UserError."""
    from moecoder.errors import UserError
    from moecoder.train.data import DataError

    try:
        return fn()
    except DataError as e:
        raise UserError(str(e)) from None


@data_app.command("build")
def build_cmd(
    out: Annotated[Path, typer.Option(help="Output corpus directory.")],
    source: Annotated[list[Path] | None, typer.Option(
        help="Directory of *.py files or a .jsonl file of {\"text\": ...}; repeatable. "
             "Default: this interpreter's stdlib and site-packages.")] = None,
    min_file_bytes: Annotated[int, typer.Option(help="Drop documents smaller than this.")] = 32,
    max_file_bytes: Annotated[int, typer.Option(help="Drop documents larger than this.")] = 1_000_000,
    val_permille: Annotated[int, typer.Option(help="Per-mille of documents (by content hash) in the val split.")] = 10,
    max_files: Annotated[int | None, typer.Option(help="Stop after this many kept documents.")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="Stop once this many bytes are kept.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Collect, de-duplicate, filter and split source files into OUT (manifest.jsonl, train/val.jsonl, stats.json)."""
    from moecoder.train.data import BuildOptions, build_corpus

    opts = BuildOptions(min_file_bytes=min_file_bytes, max_file_bytes=max_file_bytes, val_permille=val_permille,
                        max_files=max_files, max_bytes=max_bytes)
    stats = _user_errors(lambda: build_corpus(source or None, out, opts, progress=progress))
    dropped = ", ".join(f"{k}={v}" for k, v in stats["dropped"].items()) or "none"
    typer.echo(f"kept {stats['files_kept']} files ({stats['bytes_kept'] / 1e6:.1f} MB; "
               f"train {stats['splits']['train']['files']}, val {stats['splits']['val']['files']}) "
               f"of {stats['files_seen']}; dropped: {dropped}; {len(stats['licences'])} licences; "
               f"{stats['elapsed_s']:.1f}s -> {out}")


@data_app.command("tokenize")
def tokenize_cmd(
    data: Annotated[Path, typer.Option(help="Corpus directory from `moecoder data build`.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer directory (tokenizer.json).")],
    out: Annotated[Path, typer.Option(help="Output directory for shards and index.json.")],
    workers: Annotated[int, typer.Option(help="Tokeniser worker processes.")] = 1,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file.")] = 1 << 26,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Tokenise every split of DATA into packed .bin shards plus index.json (byte-identical for any --workers)."""
    from moecoder.train.shards import tokenize_corpus

    index = _user_errors(lambda: tokenize_corpus(data, tokenizer, out, workers=workers, shard_tokens=shard_tokens,
                                                 progress=progress))
    per_split = ", ".join(f"{k} {v['num_tokens']:,} tokens in {len(v['shards'])} shards"
                          for k, v in index["splits"].items())
    typer.echo(f"{per_split} ({index['dtype']}); {index['elapsed_s']:.1f}s -> {out}")


@tokenizer_app.command("train")
def tokenizer_train_cmd(
    data: Annotated[Path, typer.Option(help="Corpus directory from `moecoder data build` (its train split is used).")],
    out: Annotated[Path, typer.Option(help="Output tokenizer directory.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size including <|endoftext|>.")] = 8192,
    min_frequency: Annotated[int, typer.Option(help="Minimum pair frequency for a merge.")] = 2,
    max_docs: Annotated[int | None, typer.Option(help="Train on at most this many documents.")] = None,
    progress: Annotated[bool, typer.Option(help="Show the trainer's progress bar.")] = True,
) -> None:
    """Train a byte-level BPE tokenizer; saves tokenizer.json and tokenizer_config.json (HF-loadable)."""
    from moecoder.train.tok_train import train_tokenizer

    info = _user_errors(lambda: train_tokenizer(data, out, vocab_size=vocab_size, min_frequency=min_frequency,
                                                max_docs=max_docs, progress=progress))
    typer.echo(json.dumps(info))
