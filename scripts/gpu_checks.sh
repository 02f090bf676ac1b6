#!/usr/bin/env bash
# The GPU checks the issues name, as one script for a session that is lent a device (about 10 minutes
# on an H100/H200; each check is bounded). Run from the repository root on the GPU machine:
#
#     bash scripts/gpu_checks.sh            # writes $OUT/gpu/*.txt (OUT defaults to ./runs)
#
# 1. CUDA sanity + the parity tests on the GPU's torch (tiny models, seconds).
# 2. Model FLOPs utilisation of the ~500M-parameter MoE training step in bf16 (issue 3).
# 3. fp16 + GradScaler and NCCL through torchrun: a short `moecoder train` on one GPU (issue 3).
# 4. Training throughput vs transformers on CUDA, bf16 (the same benchmark as on CPU).
# 5. Batch-1 decode vs transformers on CUDA (the decode benchmark runs on the model's device).
# Each step's output goes to its own file; a failing step does not stop the others; the exit code
# is the number of failed steps.
set -u
OUT=${OUT:-runs}
mkdir -p "$OUT/gpu"
PY=${PY:-python3}
failed=0

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$OUT/gpu/summary.txt"
  if timeout "$limit" "$@" > "$OUT/gpu/$name.txt" 2>&1; then
    tail -n 4 "$OUT/gpu/$name.txt" | tee -a "$OUT/gpu/summary.txt"
  else
    echo "   FAILED (exit $?), see $OUT/gpu/$name.txt" | tee -a "$OUT/gpu/summary.txt"
    tail -n 20 "$OUT/gpu/$name.txt" >> "$OUT/gpu/summary.txt"
    failed=$((failed + 1))
  fi
}

step env 60 "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
step parity 300 "$PY" -m pytest -q -x tests/test_hf_parity.py tests/test_deepseek_parity.py tests/test_train_fp16.py
step mfu 300 "$PY" benchmarks/mfu.py --preset moe-500m --precision bf16 --batch 8 --seq-len 1024 --steps 10

TOK=$OUT/gpu/tokens
step data 120 "$PY" -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from test_train_loop import write_token_dir
write_token_dir(Path('$TOK'), n_train=200000, n_val=20000)
print('token folder written')"
step train-fp16-nccl 300 "$PY" -m torch.distributed.run --nproc_per_node=1 -m moecoder train --config debug \
  --data "$TOK" --out "$OUT/gpu/train-fp16" --precision fp16 --device cuda --steps 50
step train-throughput 300 "$PY" benchmarks/train_throughput.py --device cuda --precision bf16 --batch 8 --seq-len 1024 --steps 10
step decode 300 "$PY" benchmarks/decode.py --device cuda --tokens 64 --repeats 3 --compile

echo "failed steps: $failed" | tee -a "$OUT/gpu/summary.txt"
exit "$failed"
