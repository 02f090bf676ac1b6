"""Batch-1 greedy decode tokens/s: moecoder vs transformers' generate (and llama.cpp when available).

Same random weights in both (an HF Mixtral folder written by transformers, loaded by moecoder).
Also reports decode speed as a fraction of the memory-bandwidth roofline:
roofline tok/s = measured copy bandwidth / bytes of weights read per token.
bf16 rows keep bf16 weights and run bf16 matmuls, accumulated in fp32: on moecoder's side by its
few-row bf16 C kernel (moecoder/kernels, eager and as an opaque op in the compiled step) where a C
compiler is present and it measures faster, else by PyTorch's kernels (MOECODER_CPU_KERNELS=0 forces
that). RMSNorm statistics, rotary angles and router scores are computed in fp32 as in the reference
implementations. No weight is converted to another dtype.

    .venv/bin/python benchmarks/decode.py [--tokens 64] [--repeats 3] [--compile]

llama.cpp: set LLAMA_BENCH=/path/to/llama-bench and LLAMA_CONVERT=/path/to/convert_hf_to_gguf.py
(built from the llama-cpp-python source package); without them that column is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _reference import build_reference, copy_bandwidth, median_time, threads_note, weight_bytes_per_token

from moecoder.generate import generate


def _agreement(ref: list[int], got: list[int]) -> str:
    """How many leading greedy tokens agree: in bf16 the two sides round differently (summation order),
    and on random weights a near-tie of two logits can flip one argmax, after which the texts differ."""
    n = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    return f"first {n}/{len(ref)}"


def _write_sentencepiece_vocab(ckpt_dir: Path) -> None:
    """llama.cpp's converter needs a tokenizer; the reference model has random weights and none. A tiny
    sentencepiece model (padded by the converter to the model's 32000 ids) makes the folder convertible;
    it does not change what is timed (token ids in, token ids out)."""
    import sentencepiece as spm  # benchmark-only dependency

    text = Path(tempfile.mkdtemp()) / "text.txt"
    text.write_text("\n".join(Path(json.__file__).read_text().splitlines() * 20))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(ckpt_dir / "tokenizer"), vocab_size=300,
                                   model_type="bpe", minloglevel=2)
    shutil.rmtree(text.parent, ignore_errors=True)


def llama_cpp_tok_s(ckpt_dir: Path, dtype: str, n_tokens: int) -> float | None:
    bench, convert = os.environ.get("LLAMA_BENCH"), os.environ.get("LLAMA_CONVERT")
    if not (bench and convert and Path(bench).exists() and Path(convert).exists()):
        return None
    if not (ckpt_dir / "tokenizer.model").exists():
        _write_sentencepiece_vocab(ckpt_dir)
    out = Path(tempfile.mkdtemp()) / f"model-{dtype}.gguf"
    subprocess.run([sys.executable, convert, str(ckpt_dir), "--outtype", dtype, "--outfile", str(out)],
                   check=True, capture_output=True)
    threads = str(torch.get_num_threads())  # the same thread count as the torch columns
    res = subprocess.run([bench, "-m", str(out), "-p", "0", "-n", str(n_tokens), "-t", threads, "-o", "json"],
                         check=True, capture_output=True, text=True)
    rows = json.loads(res.stdout)
    shutil.rmtree(out.parent, ignore_errors=True)
    return float(rows[0]["avg_ts"])


def measure(dtype: torch.dtype, name: str, args, bw: float) -> dict:
    """One table row: transformers, moecoder eager (and compiled), roofline, llama.cpp for one dtype."""
    hf, ours, ckpt = build_reference(dtype)
    hf, ours = hf.to(args.device), ours.to(args.device)
    ids = torch.randint(0, 32000, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)).to(args.device)
    n = args.tokens

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out.cpu()  # waits for the device

    def run_ours(compile=False):
        return generate(ours, [ids[0].tolist()], n, compile=compile)

    hf_tokens = run_hf()[0, args.prompt_len:].tolist()
    same = _agreement(hf_tokens, run_ours()[0].tokens)
    t_hf = median_time(run_hf, args.repeats)
    t_ours = median_time(run_ours, args.repeats)
    roof = bw / weight_bytes_per_token(ours, torch.finfo(dtype).bits // 8)
    row = {"dtype": name, "hf": n / t_hf, "moecoder": n / t_ours, "roofline": roof, "same_tokens": same}
    if args.compile:
        # The first compiled call pays the compile (once per process and cache shape): time it apart.
        t0 = time.perf_counter()
        same_compiled = _agreement(hf_tokens, run_ours(True)[0].tokens)
        row["compile_s"] = max(time.perf_counter() - t0 - n / row["moecoder"], 0.0)
        row["moecoder_compiled"] = n / median_time(lambda: run_ours(True), args.repeats)
        row["same_tokens"] = f"{same} / compiled {same_compiled}"
    row["llama_cpp"] = llama_cpp_tok_s(ckpt, name, n) if args.device == "cpu" else None
    shutil.rmtree(ckpt, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (llama.cpp column: CPU only)")
    ap.add_argument("--compile", action="store_true",
                    help="also time moecoder with a torch.compile'd decode step (and report its compile time)")
    args = ap.parse_args()

    bw = copy_bandwidth(device=args.device)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"# decode benchmark on {where}  ({threads_note()})  copy bandwidth {bw / 1e9:.1f} GB/s")
    rows = [measure(dtype, name, args, bw) for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16"))]

    print("| dtype | transformers tok/s | moecoder tok/s | ratio | compiled tok/s | ratio | compile s | "
          "% of roofline (best) | roofline tok/s | llama.cpp tok/s | moecoder/llama.cpp | greedy tokens equal to transformers' |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        comp = r.get("moecoder_compiled")
        best = max(r["moecoder"], comp or 0)
        lc = r["llama_cpp"]
        comp_cols = (f"{comp:.1f} | {comp / r['hf']:.2f}x | {r['compile_s']:.1f}" if comp else "n/a | n/a | n/a")
        print(f"| {r['dtype']} | {r['hf']:.1f} | {r['moecoder']:.1f} | {r['moecoder'] / r['hf']:.2f}x | {comp_cols} | "
              f"{100 * best / r['roofline']:.0f}% | {r['roofline']:.0f} | "
              f"{'n/a' if lc is None else f'{lc:.1f}'} | {'n/a' if lc is None else f'{best / lc:.2f}'} | {r['same_tokens']} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} (shared machine: compare ratios within one run)")
    print(f"\nreproduce: .venv/bin/python benchmarks/decode.py --tokens {args.tokens} --repeats {args.repeats}"
          + (" --compile" if args.compile else "") + (f" --device {args.device}" if args.device != "cpu" else ""))


if __name__ == "__main__":
    main()
