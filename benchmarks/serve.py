"""Serving figure: continuous batching vs one request at a time, over real HTTP on loopback.

Serves the bundled model (what `moecoder serve` serves by default), a checkpoint folder (--model)
or a random-weight preset (--preset bench-mixtral: the engine benchmarks' reference config, with
the benchmark tokenizer's vocabulary). Starts `moecoder serve` twice in a subprocess (--max-batch N,
then --max-batch 1) and sends the same streaming requests from N concurrent clients each time.
Prints output tokens/s, TTFT p50/p95 and inter-token latency for both, and the ratio.

Target: with 8 concurrent streams, batched >= 3x the one-at-a-time throughput.

    .venv/bin/python benchmarks/serve.py                          # 8 clients, the bundled model
    .venv/bin/python benchmarks/serve.py --preset bench-mixtral   # 85.7M random-weight reference model
    .venv/bin/python benchmarks/serve.py --clients 16 --max-tokens 32 --preset debug
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from moecoder.checkpoint import save_checkpoint
from moecoder.checkpoint.hf import read_config
from moecoder.config import get_preset
from moecoder.engine_cli import BUNDLED_MODEL
from moecoder.model import Transformer
from moecoder.tokenizer import train_byte_bpe

CORPUS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "class Queue:\n    def __init__(self):\n        self.items = []\n",
    "for line in open('data.txt'):\n    print(line.strip().split(','))\n",
    "The server batches requests that arrive while others are decoding.",
] * 50


def build_checkpoint(preset: str, vocab: int, out: Path) -> Path:
    tok = train_byte_bpe(CORPUS, vocab, out / "tok")
    cfg = get_preset(preset).replace(vocab_size=tok.vocab_size, norm_topk=True)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():
        # Random weights: keep EOS rare so requests run to (about) their max_tokens.
        model.lm_head.weight[tok.eos_token_id] = 0
    return save_checkpoint(model, out / preset, tokenizer_dir=out / "tok")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, max_batch: int, threads: int, context: int, dtype: str = "float32",
                 ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "moecoder", "serve", "--model", str(ckpt), "--port", str(port),
           "--max-batch", str(max_batch), "--max-context", str(context), "--threads", str(threads), "--dtype", dtype,
           "--served-model-name", "bench"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("server did not start in 120 s")
        time.sleep(0.2)


async def _sse_events(url: str, path: str, body: dict):
    """POST `body` and yield each server-sent event's data (str) as it arrives.

    A lean HTTP/1.1 client on asyncio streams (chunked transfer decoding, one connection per
    request): the load generator shares this machine's two cores with the server, and httpx's
    streaming costs ~0.5 ms of client CPU per event, which would be taken from the server.
    """
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        payload = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                     .encode() + payload)
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        if status != 200:
            raise RuntimeError(f"{path}: HTTP {status}: {(await reader.read()).decode(errors='replace')[:300]}")
        if "transfer-encoding: chunked" not in head.lower():
            raise RuntimeError(f"{path}: expected a chunked event stream, got headers {head!r}")
        buf = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                break
            buf += (await reader.readexactly(size + 2))[:-2]
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                for line in ev.split(b"\n"):
                    if line.startswith(b"data: "):
                        yield line[6:].decode()
    finally:
        writer.close()


async def one_request(url: str, prompt: str, max_tokens: int, seed: int) -> dict:
    # Seeded sampling, not greedy: greedy random weights fall into loops of one byte token whose text
    # never completes a UTF-8 character, which would hide every chunk until the end.
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, usage, done = [], None, False
    async for data in _sse_events(url, "/v1/completions", body):
        if data == "[DONE]":
            done = True
            continue
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"stream ended with an error: {event['error']}")
        if event.get("usage"):
            usage = event["usage"]
        if event["choices"] and event["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    if not done or usage is None:
        raise RuntimeError("stream ended without usage and [DONE]")
    return {"start": t0, "stamps": stamps, "end": time.perf_counter(), "tokens": usage["completion_tokens"]}


async def run_load(url: str, clients: int, prompts: list[str], max_tokens: list[int]) -> dict:
    """Each client sends its next request as soon as its previous one ends (closed loop)."""
    sem = asyncio.Semaphore(clients)

    async def limited(i):
        async with sem:
            return await one_request(url, prompts[i], max_tokens[i], seed=i)

    await one_request(url, prompts[0], 4, seed=0)  # warm-up
    t0 = time.perf_counter()
    results = await asyncio.gather(*(limited(i) for i in range(len(prompts))))
    wall = time.perf_counter() - t0
    ttft = sorted(r["stamps"][0] - r["start"] for r in results if r["stamps"])
    itl = sorted(b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:]))
    tokens = sum(r["tokens"] for r in results)
    busy = sum(r["end"] - r["start"] for r in results) / wall  # mean requests in flight
    return {"tok_s": tokens / wall, "tokens": tokens, "wall": wall, "ttft": ttft, "itl": itl, "in_flight": busy}


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def report(name: str, r: dict) -> None:
    print(f"{name:<28} {r['tok_s']:8.1f} out tok/s  ({r['tokens']} tokens in {r['wall']:.1f} s)  "
          f"TTFT* p50 {pct(r['ttft'], .5) * 1e3:7.1f} ms  p95 {pct(r['ttft'], .95) * 1e3:7.1f} ms  "
          f"ITL p50 {pct(r['itl'], .5) * 1e3:6.1f} ms  p95 {pct(r['itl'], .95) * 1e3:6.1f} ms  "
          f"mean {statistics.fmean(r['itl']) * 1e3 if r['itl'] else float('nan'):6.1f} ms  "
          f"in flight {r['in_flight']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--preset", default=None, help="serve a random-weight model of this preset instead")
    ap.add_argument("--vocab", type=int, default=2048, help="tokenizer (and model) vocabulary size")
    ap.add_argument("--clients", type=int, default=8, help="concurrent streams")
    ap.add_argument("--requests", type=int, default=None,
                    help="total requests (default: 6 x --clients, so that most of the run has every client active)")
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64, help="mean output tokens (each request: 0.5x-1.5x)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per mode (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (1: robust on shared CPUs)")
    ap.add_argument("--dtype", default="float32", help="server weights and KV cache: float32 or bfloat16")
    args = ap.parse_args()
    if args.preset and args.model:
        ap.error("give --model or --preset, not both")
    args.model = args.model or BUNDLED_MODEL
    requests = args.requests or 6 * args.clients
    # Distinct prompts: identical greedy requests would route identically and flatter batching.
    rng = random.Random(0)
    words = ["def", "fib", "n", "return", "queue", "items", "server", "batches", "requests", "line", "open", "data", "print", "class", "self"]
    prompts = [" ".join(rng.choice(words) for _ in range(args.prompt_words)) for _ in range(requests)]
    # Mixed lengths, so requests leave (and queued ones join) at different steps.
    lengths = [rng.randint(args.max_tokens // 2, args.max_tokens * 3 // 2) for _ in range(requests)]
    context = 4 * args.prompt_words + 2 * args.max_tokens + 16  # words -> tokens is < 4 here

    modes = {f"batched (max-batch {args.clients})": args.clients, "one at a time (max-batch 1)": 1}
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.preset, args.vocab, Path(tmp)) if args.preset else args.model
        servers = {name: start_server(ckpt, mb, args.threads, context, args.dtype) for name, mb in modes.items()}
        try:
            # Alternate the two servers round by round, so load from other processes on a shared
            # machine hits both alike; report each mode's median round.
            for _ in range(args.rounds):
                for name, (_, url) in servers.items():
                    runs[name].append(asyncio.run(run_load(url, args.clients, prompts, lengths)))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    cfg = get_preset(args.preset).replace(vocab_size=args.vocab) if args.preset else read_config(args.model)
    what = f"{args.preset} random weights" if args.preset else str(args.model)
    print(f"model: {what} (dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_experts} experts "
          f"top-{cfg.top_k}, vocab {cfg.vocab_size}); {args.clients} concurrent streaming clients, {requests} requests "
          f"of {args.max_tokens // 2}-{args.max_tokens * 3 // 2} output tokens, {args.rounds} alternating rounds; "
          f"server --threads {args.threads} --dtype {args.dtype}; loopback HTTP; CPU ({os.cpu_count()} cores)")
    medians = {}
    for name, rs in runs.items():
        medians[name] = sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2]
        report(name, medians[name])
        print(f"{'':<28}rounds: " + ", ".join(f"{r['tok_s']:.1f}" for r in rs) + " out tok/s")
    (_, rb), (_, rs1) = medians.items()
    print(f"continuous batching / one at a time: {rb['tok_s'] / rs1['tok_s']:.2f}x output tokens/s "
          f"(median rounds; target >= 3x)")
    print("TTFT* = time to the first chunk with text; ITL = time between text chunks")
    print("reproduce: .venv/bin/python benchmarks/serve.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
