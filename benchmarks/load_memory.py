"""Peak host memory of load_checkpoint, as a multiple of the checkpoint's size on disk (target <= 1.2x).

Builds the bench-mixtral preset (85.7M params) with random weights, saves it with moecoder's
save_checkpoint in bf16 and in fp32 (per-expert tensor naming, as released checkpoints), then for
each case loads it in a fresh subprocess and reports

    (peak ru_maxrss after loading and touching every weight) - (VmRSS after imports)
    ------------------------------------------------------------------------------
                      bytes of *.safetensors in the folder

Baseline is the current RSS after `import torch, moecoder` and building one tiny model on the
meta device (torch's one-off lazy initialisation), not the import-time peak, so the ratio errs
high. Every weight is summed after loading so that memory-mapped tensors are
resident and counted. One extra case loads the fp32 folder as bf16 (dtype conversion at load).

    .venv/bin/python benchmarks/load_memory.py
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

TARGET = 1.2


def _rss_now_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(folder: str, dtype_name: str) -> None:
    """Runs in a fresh interpreter: load, touch every weight, print one JSON line."""
    import torch

    from moecoder.checkpoint import load_checkpoint
    from moecoder.config import get_preset
    from moecoder.model import Transformer

    # Warm up torch's lazily initialised module machinery (~65 MiB, independent of model size)
    # so the baseline holds everything but the weights.
    with torch.device("meta"):
        Transformer(get_preset("debug"))
    dtype = getattr(torch, dtype_name)
    base = _rss_now_kib()
    t0 = time.perf_counter()
    ckpt = load_checkpoint(folder, dtype=dtype)
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        total = sum(float(t.sum()) for t in ckpt.model.state_dict().values())  # in place: no fp32 copies
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    n_params = sum(p.numel() for p in ckpt.model.parameters())
    print(json.dumps({"peak_delta_bytes": (peak - base) * 1024, "load_s": load_s, "params": n_params,
                      "checksum_finite": math.isfinite(total)}))


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _measure(folder: Path, dtype_name: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), dtype_name],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(root: str) -> None:
    """Runs in its own interpreter, so the parent stays small: Linux carries ru_maxrss across
    fork+exec, and a parent holding the model would inflate every child's figure."""
    import torch

    from moecoder.checkpoint import save_checkpoint
    from moecoder.config import get_preset
    from moecoder.model import Transformer

    model = Transformer(get_preset("bench-mixtral"))
    model.init_weights(seed=0)
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        with warnings.catch_warnings():  # the preset does not renormalise top-k; irrelevant here
            warnings.simplefilter("ignore")
            save_checkpoint(model.to(dtype), Path(root) / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--build", metavar="ROOT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.build:
        build(args.build)
        return

    root = Path(tempfile.mkdtemp(prefix="moecoder-load-mem-"))
    try:
        subprocess.run([sys.executable, __file__, "--build", str(root)], check=True)
        print(f"bench-mixtral checkpoint, fresh subprocess per load; target peak RSS <= {TARGET}x size on disk")
        print(f"{'on disk':>9} {'loaded as':>9} {'disk MiB':>9} {'peak MiB':>9} {'ratio':>6} {'load s':>7}")
        worst = 0.0
        for disk, loaded in (("bfloat16", "bfloat16"), ("float32", "float32"), ("float32", "bfloat16")):
            r = _measure(root / disk, loaded)
            size = _disk_bytes(root / disk)
            ratio = r["peak_delta_bytes"] / size
            worst = max(worst, ratio)
            print(f"{disk:>9} {loaded:>9} {size / 2**20:9.1f} {r['peak_delta_bytes'] / 2**20:9.1f} "
                  f"{ratio:6.2f} {r['load_s']:7.2f}")
        print(f"params: {r['params'] / 1e6:.1f}M; worst ratio {worst:.2f} ({'meets' if worst <= TARGET else 'MISSES'} "
              f"the {TARGET}x target)")
        print("reproduce: .venv/bin/python benchmarks/load_memory.py")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
