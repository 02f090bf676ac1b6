"""Model FLOPs utilisation of a moecoder MoE training step (issue: "~500M-parameter MoE, bf16").

Trains the model for a few steps on random tokens with the project's own `train_step` (bf16
autocast, fused AdamW, grouped expert matmuls on CUDA) and reports

    MFU = model FLOPs per step / step time / peak FLOP/s of the device

Model FLOPs per token (PaLM's convention, no recomputation counted) = 6 x active matmul
parameters (LM head included, embedding lookup not; `sizing.py`) + 3 x the forward attention
FLOPs of a token, averaged over the causal positions 1..T of a sequence.

The default model, `moe-500m`: vocab 32000, dim 1024, 12 layers, 16 heads / 4 KV heads,
8 experts top-2 of width 1408 (about 512M total / 200M active parameters).

    .venv/bin/python benchmarks/mfu.py                                  # CUDA: bf16, batch 8 x 1024
    .venv/bin/python benchmarks/mfu.py --device cpu --preset debug --batch 2 --seq-len 64 --steps 2 --peak-tflops 1

Peak FLOP/s: `--peak-tflops`, or for known GPUs their dense bf16 tensor-core peak from the vendor's
datasheet (H100 SXM / H200: 989.4 TFLOP/s; A100: 312). Nothing is assumed for other devices.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from moecoder.config import get_preset
from moecoder.model import Transformer
from moecoder.sizing import attention_flops, meta_params
from moecoder.train.loop import StepOptions, train_step
from moecoder.train.optim import build_optimizer

MOE_500M = {"vocab_size": 32000, "dim": 1024, "n_layers": 12, "n_heads": 16, "n_kv_heads": 4, "ffn_dim": 2816,
            "moe_ffn_dim": 1408, "n_experts": 8, "top_k": 2, "norm_topk": True, "max_seq_len": 4096, "rope_theta": 1e6}

# Dense bf16 tensor-core peaks (datasheets), TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def model_config(preset: str):
    return get_preset("bench-mixtral").replace(**MOE_500M) if preset == "moe-500m" else get_preset(preset)


def train_flops_per_token(cfg, seq_len: int) -> float:
    """6 x active matmul params + 3 x mean causal attention FLOPs over positions 1..seq_len."""
    attn = sum(attention_flops(cfg, t) for t in range(1, seq_len + 1)) / seq_len
    return 6 * meta_params(cfg).active_matmul + 3 * attn


def peak_flops(device: torch.device, given_tflops: float | None) -> float:
    if given_tflops is not None:
        return given_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        sys.exit(f"unknown peak for {name!r}: pass --peak-tflops")
    sys.exit("pass --peak-tflops for a CPU (this script does not guess a CPU's peak)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="moe-500m", help="moe-500m or any moecoder preset")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for this precision")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    args = ap.parse_args()
    if args.steps < 1 or args.batch < 1 or args.seq_len < 2:
        ap.error("--steps, --batch must be >= 1 and --seq-len >= 2")
    device = torch.device(args.device)
    peak = peak_flops(device, args.peak_tflops)
    cfg = model_config(args.preset)
    if args.seq_len > cfg.max_seq_len:
        ap.error(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")

    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model.to(device).train()
    if device.type == "cuda":
        for m in model.modules():
            if hasattr(m, "use_grouped_mm"):
                m.use_grouped_mm = True
    step_model = torch.compile(model) if args.compile else model
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    opts = StepOptions(clip=1.0, autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g).to(device)
    batch = [(tokens[:, :-1], tokens[:, 1:])]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    losses, times = [], []
    for i in range(2 + args.steps):
        sync()
        t0 = time.perf_counter()
        res = train_step(step_model, opt, batch, 1e-4, opts)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
        losses.append(res.loss)
    step_s = statistics.median(times)
    n_tok = args.batch * args.seq_len
    flops_tok = train_flops_per_token(cfg, args.seq_len)
    achieved = flops_tok * n_tok / step_s
    counts = meta_params(cfg)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model {args.preset}: {counts.total / 1e6:.1f}M total / {counts.active / 1e6:.1f}M active parameters "
          f"({counts.active_matmul / 1e6:.1f}M active matmul); {args.precision}; batch {args.batch} x {args.seq_len}; "
          f"{where}; torch {torch.__version__}{'; compiled' if args.compile else ''}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    print(f"step {step_s * 1e3:.2f} ms (median of {args.steps}), {n_tok / step_s:,.0f} tokens/s, "
          f"{flops_tok / 1e9:.4g} GFLOP/token (6 x active matmul + 3 x attention)")
    print(f"achieved {achieved / 1e12:.2f} TFLOP/s of {peak / 1e12:.1f} peak: MFU {100 * achieved / peak:.1f}%")
    print("reproduce: .venv/bin/python benchmarks/mfu.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
