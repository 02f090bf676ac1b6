"""benchmarks/mfu.py: the FLOP count it divides by, and a CPU smoke run of the script itself."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import mfu

from moecoder.sizing import attention_flops, meta_params


def test_train_flops_are_six_times_active_matmul_plus_three_times_mean_causal_attention():
    cfg = mfu.model_config("debug")
    T = 64
    active = meta_params(cfg).active_matmul
    # Attention FLOPs are linear in the keys attended (no window here): the causal mean is at (T + 1) / 2 keys.
    per_key = attention_flops(cfg, 2) - attention_flops(cfg, 1)
    assert mfu.train_flops_per_token(cfg, T) == pytest.approx(6 * active + 3 * per_key * (T + 1) / 2)


def test_moe_500m_is_the_size_the_issue_asks_for():
    counts = meta_params(mfu.model_config("moe-500m"))
    assert 450e6 < counts.total < 550e6 and counts.active < counts.total / 2


def test_cpu_smoke_run_reports_a_consistent_mfu():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mfu.py"), "--device", "cpu", "--preset", "debug",
                        "--batch", "2", "--seq-len", "32", "--steps", "1", "--peak-tflops", "0.05"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    step_ms = float(re.search(r"step ([\d.]+) ms", r.stdout).group(1))
    gflop_tok = float(re.search(r"([\d.]+) GFLOP/token", r.stdout).group(1))
    mfu_pct = float(re.search(r"MFU ([\d.]+)%", r.stdout).group(1))
    expected = gflop_tok * 1e9 * 2 * 32 / (step_ms / 1e3) / 0.05e12 * 100
    assert mfu_pct == pytest.approx(expected, rel=0.05, abs=0.15)  # printed values are rounded


def test_a_cpu_without_a_given_peak_is_refused():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mfu.py"), "--device", "cpu", "--preset", "debug",
                        "--steps", "1"], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode != 0 and "--peak-tflops" in r.stderr and "Traceback" not in r.stderr
