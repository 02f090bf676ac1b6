"""Batch-1 prefill time of a long prompt: moecoder vs transformers (same weights, same KV-cache work).

Both sides do what their generate does before the first token: run the whole prompt, fill a KV cache
and project only the last position to the vocabulary (transformers: `logits_to_keep=1`).
Also prints the achieved matmul GFLOP/s (2 x the active non-embedding params each token multiplies;
moecoder's last layer runs only its key/value projections for all but the last token, since only the
last position's output reaches the LM head, so it does ~20% fewer FLOPs than transformers here).

    .venv/bin/python benchmarks/prefill.py [--tokens 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _reference import build_reference, median_time, threads_note

from moecoder.generate import prefill
from moecoder.model import KVCache


def active_matmul_params(model, layer: int | None = None) -> int:
    """Weights one prompt token multiplies (attention, router, top_k experts per MoE layer; no LM head),
    in every layer or in one."""
    cfg = model.cfg
    prefix = "" if layer is None else f"layers.{layer}."
    total = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name in ("embed.weight", "lm_head.weight") or not name.startswith(prefix):
            continue
        total += p.numel() // cfg.n_experts * cfg.top_k if ".experts." in name else p.numel()
    return total


def prefill_matmul_flops(model, tokens: int) -> int:
    """Matmul FLOPs moecoder's prefill runs: every layer for every token, except that the last layer
    runs only its key and value projections for all tokens and the rest for the last one."""
    last = len(model.layers) - 1
    attn = model.layers[last].attn
    kv = sum(p.numel() for n, p in attn.named_parameters() if p.dim() == 2 and n.split(".")[0] in ("k_proj", "v_proj"))
    last_params = active_matmul_params(model, last)
    return 2 * ((active_matmul_params(model) - last_params + kv) * tokens + (last_params - kv))


def measure(dtype: torch.dtype, name: str, args) -> dict:
    """One table row: transformers and moecoder prefill times for one dtype."""
    hf, ours, ckpt = build_reference(dtype)
    cfg = ours.cfg
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([args.tokens])

    def run_hf():
        with torch.inference_mode():
            return hf(ids, use_cache=True, logits_to_keep=1).logits[:, -1]

    def run_ours():
        with torch.inference_mode():
            cache = KVCache(cfg, 1, args.tokens + 1, dtype)
            return prefill(ours, ids, lengths, cache)

    diff = (run_hf().float() - run_ours().float()).abs().max().item()
    t_hf = median_time(run_hf, args.repeats)
    t_ours = median_time(run_ours, args.repeats)
    flops = prefill_matmul_flops(ours, args.tokens)
    shutil.rmtree(ckpt, ignore_errors=True)
    return {"dtype": name, "hf": t_hf, "ours": t_ours, "gflops": flops / t_ours / 1e9, "diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    print(f"# prefill benchmark  ({threads_note()})  prompt {args.tokens} tokens, batch 1")
    rows = [measure(dtype, name, args) for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16"))]

    print("| dtype | transformers s | moecoder s | speed ratio | moecoder tok/s | moecoder GFLOP/s | max abs logit diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['hf']:.4f} | {r['ours']:.4f} | {r['hf'] / r['ours']:.2f}x | "
              f"{args.tokens / r['ours']:.0f} | {r['gflops']:.0f} | {r['diff']:.2e} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} (shared machine: compare ratios within one run)")
    print(f"\nreproduce: .venv/bin/python benchmarks/prefill.py --tokens {args.tokens} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
