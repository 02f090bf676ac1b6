"""`moecoder serve` (the OpenAI-compatible server) and `moecoder bench cost` ($ per 1M output tokens)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from ..engine_cli import default_model
from ..errors import UserError

bench_app = typer.Typer(help="Measure serving throughput and cost.", no_args_is_help=True)

_DTYPES = ("float32", "bfloat16", "float16")


def load_engine(model_dir: Path, *, dtype: str = "float32", device: str = "cpu", threads: int | None = None,
                **engine_kw):
    """Load a moecoder/Hugging Face checkpoint folder and its tokenizer into an (unstarted) Engine."""
    if dtype not in _DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if not Path(model_dir).is_dir():
        raise UserError(f"--model {model_dir} is not a folder")
    import torch

    from ..checkpoint import load_checkpoint
    from ..tokenizer import Tokenizer
    from .engine import Engine

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        ckpt = load_checkpoint(model_dir, dtype=getattr(torch, dtype), device=device)
        tok = Tokenizer.from_dir(model_dir)
    except ValueError as e:  # CheckpointError, TokenizerError: one line, no traceback
        raise UserError(str(e)) from None
    eos = list(ckpt.eos_token_ids) or ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    if tok.vocab_size > ckpt.config.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} ids but the model's vocab_size is {ckpt.config.vocab_size}")
    try:
        engine = Engine(ckpt.model, tok, eos, **engine_kw)
    except ValueError as e:
        raise UserError(str(e)) from None
    return engine, tok, ckpt


def serve_cmd(
    model: Path | None = typer.Option(None, "--model", help="Checkpoint folder (config.json, safetensors, "
                                      "tokenizer; default: the bundled model)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; keep loopback unless an API key is set."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key_env: str | None = typer.Option(None, help="Name of an environment variable holding the Bearer API key."),
    max_batch: int = typer.Option(16, help="Most sequences decoded together (KV-cache rows)."),
    max_context: int | None = typer.Option(None, help="Prompt + completion token limit (default: model max)."),
    max_queue: int = typer.Option(64, help="Most sequences waiting for a row; beyond it: 429 + Retry-After."),
    kv_budget_mb: float | None = typer.Option(None, help="Cap on KV-cache memory; lowers --max-batch to fit."),
    prefill_chunk: int = typer.Option(512, help="Prompt tokens prefilled per step; longer prompts take several."),
    served_model_name: str | None = typer.Option(None, help="Model id clients send (default: folder name)."),
    dtype: str = typer.Option("float32", help="Weights and KV-cache dtype: float32, bfloat16, float16."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
    threads: int | None = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
) -> None:
    """Serve a checkpoint with an OpenAI-compatible API (completions, chat, streaming) and continuous batching."""
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {api_key_env}: that environment variable is unset or empty")
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be in 1..65535, got {port}")
    model = model or default_model()
    engine, tok, ckpt = load_engine(model, dtype=dtype, device=device, threads=threads, max_batch=max_batch,
                                    max_context=max_context, max_queue=max_queue, kv_budget_mb=kv_budget_mb,
                                    prefill_chunk=prefill_chunk)
    import uvicorn

    from .api import create_app

    name = served_model_name or Path(model).resolve().name
    app = create_app(engine, tok, name, api_key=api_key, bos_token_id=ckpt.bos_token_id)
    auth = "Bearer key required" if api_key else "no API key"
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: serving on {host} without an API key (set --api-key-env)", err=True)
    typer.echo(f"serving {name!r} on http://{host}:{port}/v1  ({engine.slots} slots x {engine.max_context} tokens, "
               f"KV cache {engine.cache.nbytes() / 2**20:.0f} MiB, queue {engine.max_queue}, {auth})")
    uvicorn.run(app, host=host, port=port, log_level="warning")


@bench_app.command("cost")
def cost_cmd(
    model: Path | None = typer.Option(None, "--model", help="Checkpoint folder (default: the bundled model)."),
    usd_per_hour: float = typer.Option(..., help="What the machine costs per hour, in US dollars."),
    max_batch: int = typer.Option(16, help="Concurrent sequences (the batch kept full)."),
    prompt_tokens: int = typer.Option(64, help="Prompt length of each request."),
    max_tokens: int = typer.Option(128, help="Tokens generated per request."),
    duration: float = typer.Option(20.0, help="Seconds to measure, after a warm-up request."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="torch device."),
    threads: int | None = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
) -> None:
    """Sustained batched output tokens/s on this machine, and the $ per 1M output tokens it implies."""
    if usd_per_hour <= 0 or duration <= 0 or prompt_tokens < 1 or max_tokens < 1 or max_batch < 1:
        raise UserError("--usd-per-hour, --duration, --prompt-tokens, --max-tokens and --max-batch must be > 0")
    model = model or default_model()
    limit = ckpt_max(model)
    if prompt_tokens + max_tokens > limit:
        raise UserError(f"--prompt-tokens + --max-tokens = {prompt_tokens + max_tokens} exceeds the model's "
                        f"max_seq_len {limit}")
    engine, _tok, ckpt = load_engine(model, dtype=dtype, device=device, threads=threads, max_batch=max_batch,
                                    max_context=prompt_tokens + max_tokens, max_queue=max_batch)
    tps, n_req = measure_throughput(engine, ckpt.config.vocab_size, prompt_tokens, max_tokens, duration)
    usd_per_m = usd_per_hour / 3600 / tps * 1e6
    typer.echo(f"{tps:.1f} output tokens/s sustained ({n_req} requests, batch {engine.slots}, "
               f"{prompt_tokens} prompt + {max_tokens} output tokens each, {duration:.0f} s)")
    typer.echo(f"${usd_per_m:.4f} per 1M output tokens at ${usd_per_hour:g}/hour")


def ckpt_max(model_dir: Path) -> int:
    from ..checkpoint import read_config

    try:
        return read_config(model_dir).max_seq_len
    except ValueError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"--model {model_dir}: {e}") from None


def measure_throughput(engine, vocab_size: int, prompt_tokens: int, max_tokens: int,
                       duration: float) -> tuple[float, int]:
    """Keep every engine row busy with fresh requests for `duration` s; return (output tokens/s, requests).

    Prompts are random ids; greedy decoding with no EOS (`max_tokens` always reached) keeps the
    work per request fixed. Counting starts after a warm-up request, with the batch already full.
    """
    import threading

    import torch

    from .engine import RequestParams, Sequence

    engine.eos = frozenset()
    gen = torch.Generator().manual_seed(0)
    params = RequestParams(max_tokens=max_tokens, temperature=0.0)
    lock = threading.Lock()
    counts = {"tokens": 0, "requests": 0}

    def new_seq() -> Sequence:
        return Sequence(torch.randint(0, vocab_size, (prompt_tokens,), generator=gen).tolist(), params, sink)

    def sink(ev) -> None:
        if ev.finish_reason in ("cancelled", "error"):
            return  # shutdown notices, not tokens
        with lock:
            counts["tokens"] += 1
            if ev.finish_reason is not None:
                counts["requests"] += 1
                engine.submit([new_seq()])  # refill the freed row: the batch stays full

    warm = threading.Event()
    engine.start()
    try:
        engine.submit([Sequence([0] * prompt_tokens, RequestParams(max_tokens=4, temperature=0.0),
                                lambda ev: ev.finish_reason and warm.set())])
        if not warm.wait(300):
            raise UserError("the warm-up request did not finish in 300 s")
        engine.submit([new_seq() for _ in range(engine.slots)])
        time.sleep(min(2.0, duration / 5))  # let the prefills of the first wave pass
        with lock:
            start, t0, r0 = time.perf_counter(), counts["tokens"], counts["requests"]
        time.sleep(duration)
        with lock:
            elapsed = time.perf_counter() - start
            tokens, requests = counts["tokens"] - t0, counts["requests"] - r0
    finally:
        engine.shutdown()
    return tokens / elapsed, requests
