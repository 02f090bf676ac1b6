"""benchmarks/train_throughput.py --bound: the matrix-product FLOPs and times it adds up from a profiled step."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_throughput


def test_bound_counts_every_product_including_in_place_addmm_and_times_fused_adamw():
    M, K, N = 48, 32, 40
    a, b = torch.randn(M, K), torch.randn(K, N)
    c = torch.zeros(M, N)
    p = torch.nn.Parameter(torch.randn(64))
    p.grad = torch.randn(64)
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)

    def step():
        torch.mm(a, b, out=c)  # counted by the profiler
        c.addmm_(a, b)  # not counted by the profiler: the benchmark adds it from the shapes
        torch.bmm(a[None], b[None])
        opt.step()

    gemm_s, gflop, adamw_s = train_throughput.gemm_and_adamw(step)
    assert gflop == pytest.approx(3 * 2 * M * K * N / 1e9)
    assert gemm_s > 0 and adamw_s > 0


def test_in_place_addmm_flops_from_shapes():
    assert train_throughput._inplace_addmm_flops("aten::addmm_", [[7, 5], [7, 3], [3, 5], [], []]) == 2 * 7 * 3 * 5
    assert train_throughput._inplace_addmm_flops("aten::relu", [[7, 5]]) == 0
