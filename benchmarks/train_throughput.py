"""Training throughput: tokens/s of forward + backward + AdamW step, moecoder vs transformers' Mixtral.

Both models hold the same bench-mixtral weights (see _reference.py) and train on the same batch with
the same loss (cross-entropy over every next token, no router aux loss), grad clipping and fused AdamW.
moecoder runs its real `train_step` (global-token loss normalisation, grad clipping, routing stats);
transformers runs its default training forward (`labels` -> `.loss`, with `shift_labels` so both
score the same 256 targets per row) then the same backward, clip and step. Steps are interleaved so
machine load hits both alike; the figure is the median step time. `--breakdown` adds a torch.profiler
table (self time by op) of one more step of each. `--bound` profiles one more step of moecoder and prints
what its matrix products and fused AdamW alone take (the same products and the same update transformers
runs; page faults per step of each side too): transformers' step time over that is the best ratio reachable
with these GEMMs, whatever else is removed. Target: moecoder >= 1.5x transformers.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reference import build_reference

from moecoder.train.loop import StepOptions, train_step
from moecoder.train.optim import build_optimizer

TARGET = 1.5
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def gemm_and_adamw(step) -> tuple[float, float, float]:
    """(seconds in matrix products, their GFLOP, seconds in fused AdamW) of one profiled call of `step`."""
    from torch.profiler import profile

    with profile(with_flops=True, record_shapes=True) as prof:
        step()
    gemm_us = gemm_flops = adamw_us = 0.0
    for e in prof.events():
        if e.key in GEMM_OPS:
            gemm_us += e.self_cpu_time_total
            gemm_flops += e.flops or _inplace_addmm_flops(e.key, e.input_shapes)
        elif e.key in ("aten::_fused_adamw_", "aten::_fused_adam_"):
            adamw_us += e.self_cpu_time_total
    return gemm_us / 1e6, gemm_flops / 1e9, adamw_us / 1e6


def _inplace_addmm_flops(key: str, shapes) -> int:
    """The profiler counts no FLOPs for the in-place addmm_ (self, mat1, mat2, ...): 2 x M x K x N."""
    if key in ("aten::addmm_", "aten::addmm") and len(shapes) >= 3 and len(shapes[1]) == len(shapes[2]) == 2:
        (m, k), (_, n) = shapes[1], shapes[2]
        return 2 * m * k * n
    return 0


def hf_step(model, optimizer, x_BT, y_BT, lr: float, clip: float, amp_dtype) -> float:
    for g in optimizer.param_groups:
        g["lr"] = lr
    y_BT = y_BT.contiguous()
    with torch.autocast(x_BT.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        # transformers' own loss (ForCausalLMLoss: logits.float(), mean cross-entropy, -100 ignored).
        loss = model(input_ids=x_BT, labels=y_BT, shift_labels=y_BT).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (after one warmup step)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--breakdown", action="store_true", help="profile one more step of each; print top ops")
    ap.add_argument("--bound", action="store_true",
                    help="profile one more moecoder step: time in matrix products + AdamW, the best ratio they allow")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.precision == "bf16" else None

    hf, ours, ckpt_dir = build_reference(torch.float32)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    hf.to(device).train()
    ours.to(device).train()
    if device.type == "cuda":
        for m in ours.modules():
            if hasattr(m, "use_grouped_mm"):
                m.use_grouped_mm = True
    lr, clip, wd = 1e-4, 1.0, 0.1
    opt_ours = build_optimizer(ours, lr=lr, weight_decay=wd)
    # Fused AdamW, transformers' Trainer default (as moecoder's); decay on every weight there.
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=wd, fused=True)
    opts = StepOptions(clip=clip, autocast_dtype=amp)

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ours.cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Warmup step; the first losses must agree (same weights, same batch).
    loss_ours = train_step(ours, opt_ours, [(x, y)], lr, opts).loss
    loss_hf = hf_step(hf, opt_hf, x, y, lr, clip, amp)
    times = {"moecoder": [], "transformers": []}
    faults = {"moecoder": [], "transformers": []}
    for _ in range(args.steps):
        sync()
        f0, t0 = minor_faults(), time.perf_counter()
        train_step(ours, opt_ours, [(x, y)], lr, opts)
        sync()
        f1, t1 = minor_faults(), time.perf_counter()
        hf_step(hf, opt_hf, x, y, lr, clip, amp)
        sync()
        f2, t2 = minor_faults(), time.perf_counter()
        times["moecoder"].append(t1 - t0)
        times["transformers"].append(t2 - t1)
        faults["moecoder"].append(f1 - f0)
        faults["transformers"].append(f2 - f1)

    n_tok = args.batch * args.seq_len
    print(f"bench-mixtral training step (fwd + bwd + AdamW), batch {args.batch} x {args.seq_len}, "
          f"{args.precision}, {device.type}, {torch.get_num_threads()} threads, median of {args.steps}")
    print(f"first-step loss: moecoder {loss_ours:.5f}  transformers {loss_hf:.5f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, t in med.items():
        print(f"{k:>13}: {t * 1e3:8.1f} ms/step  {n_tok / t:10,.0f} tokens/s  "
              f"{statistics.median(faults[k]):9,.0f} minor page faults/step")
    ratio = med["transformers"] / med["moecoder"]
    print(f"ratio moecoder/transformers: {ratio:.2f}x ({'meets' if ratio >= TARGET else 'MISSES'} the "
          f"{TARGET}x target)")
    if args.bound:
        gemm_s, gflop, adamw_s = gemm_and_adamw(lambda: train_step(ours, opt_ours, [(x, y)], lr, opts))
        floor = gemm_s + adamw_s
        print(f"moecoder's matrix products: {gflop:.1f} GFLOP in {gemm_s * 1e3:.0f} ms ({gflop / gemm_s:.0f} GFLOP/s), "
              f"fused AdamW {adamw_s * 1e3:.0f} ms: {floor * 1e3:.0f} ms together (profiled step)")
        print(f"best ratio with these products and this update, all else free: "
              f"{med['transformers'] / floor:.2f}x; {TARGET}x needs a step of {med['transformers'] / TARGET * 1e3:.0f} ms")
    if args.breakdown:
        from torch.profiler import profile

        for name, step in (("moecoder", lambda: train_step(ours, opt_ours, [(x, y)], lr, opts)),
                           ("transformers", lambda: hf_step(hf, opt_hf, x, y, lr, clip, amp))):
            with profile() as prof:
                step()
                sync()
            print(f"--- {name}: self time by op, one step")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
    print(f"reproduce: .venv/bin/python benchmarks/train_throughput.py --batch {args.batch} --seq-len "
          f"{args.seq_len} --steps {args.steps} --precision {args.precision} --device {args.device}"
          + (f" --threads {args.threads}" if args.threads else "") + (" --bound" if args.bound else ""))


if __name__ == "__main__":
    main()
