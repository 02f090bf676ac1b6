"""The few-row CPU kernels (kernels/few_rows.c): bf16 and fp32 products and the fused routed experts,
each of the three code paths against PyTorch; the build cache, the fallbacks and the per-dtype choice;
and that decode uses them and still matches PyTorch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moecoder.config import get_preset
from moecoder.kernels import cpu
from moecoder.model import KVCache, Transformer

# -march for each path: VDPBF16PS (AVX512_BF16), widen + FMA (AVX-512F), portable C.
PATHS = {"avx512_bf16": "sapphirerapids", "avx512f": "skylake-avx512", "portable": "x86-64"}
SHAPES = [(1, 1, 1), (1, 17, 33), (2, 9, 64), (3, 5, 100), (4, 20, 7), (5, 33, 130), (7, 16, 31), (8, 3, 70),
          (11, 19, 129), (16, 40, 256), (1, 300, 512)]


def _cpu_has(flag: str) -> bool:
    try:
        return flag in open("/proc/cpuinfo").read().split()
    except OSError:
        return False


def _runs_here(isa: str) -> bool:
    return {"avx512_bf16": _cpu_has("avx512_bf16"), "avx512f": _cpu_has("avx512f"), "portable": True}[isa]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """isa -> Kernel, for each path this CPU can execute (building needs a C compiler)."""
    if cpu._compiler() is None:
        pytest.skip("no C compiler on this machine: the kernel is optional and PyTorch is used")
    out = tmp_path_factory.mktemp("kernels")
    kernels = {}
    for isa, march in PATHS.items():
        if _runs_here(isa):
            k = cpu.Kernel(cpu.build(out, march=march))
            assert k.isa == isa, f"-march={march} built the {k.isa} path"
            kernels[isa] = k
    return kernels


def _bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of the bf16 spacing at want (1 = one rounding step)."""
    spacing = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-3)
    return (got.float() - want.float()).abs() / spacing


@pytest.mark.parametrize("isa", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_kernel_matches_torch_product(built, isa, dtype, M, N, K):
    if isa not in built:
        pytest.skip(f"this CPU cannot run the {isa} path")
    k = built[isa]
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x = torch.randn(M, K + 5, generator=g).to(dtype)[:, :K]  # strided rows
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    exact = x.double() @ w.double().t()
    for bias in (None, b):
        got = k.mm(x, w, bias)
        want = F.linear(x, w, bias)
        ref = exact + (0 if bias is None else bias.double())
        assert got.dtype == dtype and got.shape == (M, N)
        if dtype == torch.bfloat16:
            # Both accumulate exact products in fp32 and round once; only the summation order differs.
            assert torch.allclose(got.double(), ref, rtol=2**-7, atol=2e-6 * K), (got - ref).abs().max()
            assert _bf16_ulps(got, want).max() <= 2
        else:
            # fp32 sums in another order: within a few fp32 roundings of a sum of K terms of size ~1.
            assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6 * K), (got - ref).abs().max()
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * K)


@pytest.mark.parametrize("isa", list(PATHS))
def test_kernel_rounds_like_torch_when_the_sum_is_exact(built, isa):
    """Small integers: every partial sum is exact in fp32 whatever the order, so the only rounding is
    the final one to bf16 (to nearest, ties to even), which must equal PyTorch's bit for bit."""
    if isa not in built:
        pytest.skip(f"this CPU cannot run the {isa} path")
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-8, 9, (6, 200), generator=g).bfloat16()
    w = torch.randint(-8, 9, (50, 200), generator=g).bfloat16()
    b = torch.randint(-300, 301, (50,), generator=g).bfloat16()
    got, want = built[isa].mm(x, w, b), F.linear(x, w, b)
    assert (x.float() @ w.float().t() + b.float()).abs().max() > 256  # results that bf16 must round
    assert torch.equal(got, want)


@pytest.mark.parametrize("isa", list(PATHS))
def test_kernel_writes_into_strided_out_rows_only(built, isa):
    if isa not in built:
        pytest.skip(f"this CPU cannot run the {isa} path")
    x = torch.randn(3, 64).bfloat16()
    w = torch.randn(24, 64).bfloat16()
    buf = torch.full((3, 40), 7.0, dtype=torch.bfloat16)
    built[isa].mm(x, w, out=buf[:, 8:32])
    assert _bf16_ulps(buf[:, 8:32], F.linear(x, w)).max() <= 2
    assert (buf[:, :8] == 7).all() and (buf[:, 32:] == 7).all()


@pytest.mark.parametrize("isa", list(PATHS))
def test_kernel_propagates_inf_and_nan(built, isa):
    if isa not in built:
        pytest.skip(f"this CPU cannot run the {isa} path")
    x = torch.ones(2, 40).bfloat16()
    x[0, 3] = float("inf")
    x[1, 5] = float("nan")
    w = torch.ones(3, 40).bfloat16()
    y = built[isa].mm(x, w)
    assert torch.isinf(y[0]).all() and torch.isnan(y[1]).all()


def test_build_is_cached_and_atomic(tmp_path):
    if cpu._compiler() is None:
        pytest.skip("no C compiler")
    lib = cpu.build(tmp_path)
    mtime = lib.stat().st_mtime_ns
    assert cpu.build(tmp_path) == lib and lib.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporary file left behind


def test_broken_compiler_is_a_clear_error_and_pytorch_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(cpu.shutil, "which", lambda name: "/bin/false" if name == "false" else None)
    with pytest.raises(RuntimeError, match="does not run|failed"):
        cpu.build(tmp_path)
    # The same through the loader: no kernel, and bf16 decode falls back to PyTorch.
    code = ("import torch; from moecoder.kernels import cpu; from moecoder.model.linear import linear;"
            "assert cpu.kernel() is None;"
            "x, w = torch.randn(1, 8).bfloat16(), torch.randn(4, 8).bfloat16();"
            "torch.set_grad_enabled(False); print(linear(x, w).dtype)")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "MOECODER_CACHE": str(tmp_path / "cache"),
           "PATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "torch.bfloat16"


def test_disabled_by_environment(tmp_path):
    code = "from moecoder.kernels import cpu; print(cpu.kernel())"
    env = {**os.environ, "MOECODER_CPU_KERNELS": "0", "MOECODER_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr
    assert not any(tmp_path.iterdir())  # nothing was built


def _counted_kernel(monkeypatch) -> tuple[cpu.Kernel, list[str]]:
    """A freshly built kernel in use whatever the timing-based choice decided on this machine, whose
    `mm` and `moe_swiglu` calls are recorded ("mm" / "moe")."""
    if cpu._compiler() is None:
        pytest.skip("no C compiler: the kernel is optional and PyTorch is used")
    k = cpu.Kernel(cpu.build())
    monkeypatch.setattr(cpu, "_load", lambda threads: k)
    calls: list[str] = []
    real_mm, real_moe = k.mm, k.moe_swiglu
    monkeypatch.setattr(k, "mm", lambda *a, **kw: (calls.append("mm"), real_mm(*a, **kw))[1])
    monkeypatch.setattr(k, "moe_swiglu", lambda *a, **kw: (calls.append("moe"), real_moe(*a, **kw))[1])
    return k, calls


def _debug_model(dtype: torch.dtype) -> tuple:
    cfg = get_preset("debug").replace(vocab_size=512)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return cfg, model.to(dtype).eval()


@pytest.mark.parametrize("isa", list(PATHS))
def test_fused_moe_swiglu_matches_the_pytorch_expert_loop(built, isa):
    """One call for a few tokens' routed experts against the same math in PyTorch bf16 ops (the eager
    decode loop it replaces): the same roundings, so only summation order and exp() differ."""
    if isa not in built:
        pytest.skip(f"this CPU cannot run the {isa} path")
    g = torch.Generator().manual_seed(3)
    E, C, Fh, N, K = 5, 72, 40, 4, 2
    x = torch.randn(N, C, generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * Fh, C, generator=g) / C**0.5).bfloat16()
    w2 = (torch.randn(E, C, Fh, generator=g) / Fh**0.5).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    weights = torch.rand(N, K, generator=g).softmax(-1)
    got = built[isa].moe_swiglu(x, w13, w2, ids, weights)
    want = torch.zeros_like(x)
    for n in range(N):
        acc = None
        for e, wt in zip(ids[n].tolist(), weights[n].bfloat16().tolist()):
            gate, up = F.linear(x[n : n + 1], w13[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, w2[e]) * wt
            acc = y if acc is None else acc + y
        want[n] = acc[0]
    assert got.dtype == torch.bfloat16 and got.shape == (N, C)
    assert torch.allclose(got.float(), want.float(), rtol=2**-6, atol=2e-3), (got.float() - want.float()).abs().max()
    exact = (got == want).float().mean().item()
    assert exact > 0.8, f"only {exact:.0%} of the outputs equal PyTorch's bit for bit"


def _routing(N: int, E: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    return ids, torch.rand(N, K, generator=g).softmax(-1)


@pytest.mark.parametrize("isa", list(PATHS))
@pytest.mark.parametrize("N,E,K", [(1, 4, 2), (8, 8, 2), (16, 3, 2), (5, 6, 3), (13, 2, 1)])
def test_fused_moe_fp32_matches_pytorch_per_expert(built, isa, N, E, K):
    """Tokens grouped by expert in C (an expert chosen by up to 16 tokens: 8-row weight passes and a
    tail) against each expert run by PyTorch on the tokens that chose it; x rows strided."""
    if isa not in built:
        pytest.skip(f"this CPU cannot run the {isa} path")
    g = torch.Generator().manual_seed(N * 100 + E)
    C, Fh = 72, 40
    x = torch.randn(N, C + 8, generator=g)[:, :C]
    w13 = torch.randn(E, 2 * Fh, C, generator=g) / C**0.5
    w2 = torch.randn(E, C, Fh, generator=g) / Fh**0.5
    ids, weights = _routing(N, E, K, seed=N + E)
    got = built[isa].moe_swiglu(x, w13, w2, ids, weights)
    want = cpu.torch_moe_swiglu(x, w13, w2, ids, weights)
    assert got.dtype == torch.float32 and got.shape == (N, C)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_fused_moe_on_random_shapes(built):
    """30 random layers (1-16 tokens, 1-64 experts, top-1..8, odd widths) in both dtypes on every path
    this CPU runs, against PyTorch's per-expert ops."""
    g = torch.Generator().manual_seed(11)
    for _ in range(30):
        N, E, C, Fh = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 17), (1, 65), (1, 90), (1, 70)))
        K = int(torch.randint(1, min(E, 8) + 1, (1,), generator=g))
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
        weights = torch.rand(N, K, generator=g)
        x = torch.randn(N, C, generator=g)
        w13 = torch.randn(E, 2 * Fh, C, generator=g) / C**0.5
        w2 = torch.randn(E, C, Fh, generator=g) / Fh**0.5
        for isa, k in built.items():
            got = k.moe_swiglu(x, w13, w2, ids, weights)
            want = cpu.torch_moe_swiglu(x, w13, w2, ids, weights)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (isa, N, E, K, C, Fh)
            xb, w13b, w2b = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
            got = k.moe_swiglu(xb, w13b, w2b, ids, weights).float()
            want = cpu.torch_moe_swiglu(xb, w13b, w2b, ids, weights).float()
            assert torch.allclose(got, want, rtol=2**-5, atol=2e-2), (isa, "bf16", N, E, K, C, Fh)


@pytest.mark.parametrize("isa", list(PATHS))
def test_fused_moe_bf16_groups_like_the_sorted_dispatch(built, isa):
    """16 tokens on 3 experts in bf16: the same roundings as PyTorch's per-expert ops and index_add in
    expert order, so only the products' summation order and exp() differ."""
    if isa not in built:
        pytest.skip(f"this CPU cannot run the {isa} path")
    g = torch.Generator().manual_seed(5)
    N, E, C, Fh = 16, 3, 64, 48
    x = torch.randn(N, C, generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * Fh, C, generator=g) / C**0.5).bfloat16()
    w2 = (torch.randn(E, C, Fh, generator=g) / Fh**0.5).bfloat16()
    ids, weights = _routing(N, E, 2, seed=6)
    got = built[isa].moe_swiglu(x, w13, w2, ids, weights)
    want = cpu.torch_moe_swiglu(x, w13, w2, ids, weights)
    assert torch.allclose(got.float(), want.float(), rtol=2**-6, atol=2e-3), (got.float() - want.float()).abs().max()
    assert (got == want).float().mean().item() > 0.8


def test_product_choice_is_per_dtype_and_row_count(built, monkeypatch):
    """`mm_min_rows` (measured at load) decides: fp32 from 3 rows, bf16 from 1, none for a dtype it lacks."""
    k = next(iter(built.values()))
    monkeypatch.setattr(cpu, "_load", lambda threads: k)
    monkeypatch.setattr(k, "mm_min_rows", {torch.float32: 3})
    w = torch.randn(8, 16)
    with torch.inference_mode():
        assert [cpu.usable(torch.randn(r, 16), w, r) for r in (1, 2, 3, 16, 17)] == [False, False, True, True, False]
        assert not cpu.usable(torch.randn(4, 16).bfloat16(), w.bfloat16(), 4)
    assert cpu.usable(torch.randn(4, 16), w, 4) is False  # autograd on: training never goes to the kernel
    monkeypatch.setattr(k, "fast_moe", frozenset({torch.float32}))
    w13, w2 = torch.randn(2, 8, 16), torch.randn(2, 16, 4)
    with torch.inference_mode():
        assert cpu.moe_usable(torch.randn(16, 16), w13, w2) and not cpu.moe_usable(torch.randn(17, 16), w13, w2)
        assert not cpu.moe_usable(torch.randn(4, 16).bfloat16(), w13.bfloat16(), w2.bfloat16())
        assert not cpu.moe_usable(torch.randn(4, 16), w13.transpose(1, 2).contiguous().transpose(1, 2), w2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_steps_use_the_kernels_and_match_pytorch(monkeypatch, dtype):
    """Decode steps of 1, 3, 8 and 16 rows: every MoE layer is one fused experts call; the products
    (attention, router, LM head) go to the kernel from the fewest rows it is used for (bf16: 1; fp32: 3,
    where MKL's matrix-vector kernel is as fast); the logits equal the steps with the kernels off to
    the dtype's rounding."""
    k, calls = _counted_kernel(monkeypatch)
    k.mm_min_rows = {torch.float32: 3, torch.bfloat16: 1}
    cfg, model = _debug_model(dtype)
    tokens = torch.randint(0, cfg.vocab_size, (16, 13), generator=torch.Generator().manual_seed(1))

    def decode_step(rows: int) -> torch.Tensor:
        cache = KVCache(cfg, rows, 32, dtype)
        with torch.inference_mode():
            model(tokens[:rows, :12], cache=cache)
            calls.clear()
            return model(tokens[:rows, 12:], cache=cache).logits.float()

    for rows in (1, 3, 8, 16):
        got = decode_step(rows)
        assert calls.count("moe") == cfg.n_layers, calls
        # q, k, v, o and the router per layer, and the LM head
        assert calls.count("mm") == (0 if rows < k.mm_min_rows[dtype] else 5 * cfg.n_layers + 1), calls
        with monkeypatch.context() as mp:
            mp.setattr(cpu, "kernel", lambda: None)
            want = decode_step(rows)
            assert not calls
        tol = {"rtol": 0.02, "atol": 0.02} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
        assert torch.allclose(got, want, **tol), (got - want).abs().max()


def test_compiled_bf16_decode_step_calls_the_kernel_as_opaque_ops(monkeypatch):
    """Traced (fullgraph, so any graph break fails) bf16 decode with the kernel as custom ops equals
    the eager step with the kernel, for two rows at different positions."""
    import torch._dynamo

    from moecoder.generate import decode_one_token, prefill

    k, calls = _counted_kernel(monkeypatch)
    monkeypatch.setattr(cpu, "READY", None)
    assert cpu.prepare_for_compile() is k
    cfg, model = _debug_model(torch.bfloat16)
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, backend="eager", fullgraph=True, dynamic=False)
    prompts = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([7, 4])
    caches = [KVCache(cfg, 2, 16, torch.bfloat16) for _ in range(2)]
    with torch.inference_mode():
        logits = [prefill(model, prompts, lengths, c) for c in caches]
        for i in range(4):
            tok = logits[0].argmax(-1)[:, None]
            calls.clear()
            traced = step(model, tok, caches[1])
            assert calls.count("moe") == cfg.n_layers and calls.count("mm") >= 4 * cfg.n_layers + 1, calls
            logits = [decode_one_token(model, tok, caches[0]), traced]
            assert torch.allclose(logits[1].float(), logits[0].float(), rtol=0.02, atol=0.02), f"step {i}"
    torch._dynamo.reset()


def test_mismatched_shapes_and_expert_ids_are_errors_not_reads_out_of_bounds(built):
    k = next(iter(built.values()))
    with pytest.raises(ValueError, match="shapes do not match"):
        k.mm(torch.ones(2, 8).bfloat16(), torch.ones(4, 9).bfloat16())
    x = torch.ones(2, 8).bfloat16()
    w13, w2 = torch.ones(3, 12, 8).bfloat16(), torch.ones(3, 8, 6).bfloat16()
    weights = torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="outside 0..2"):
        k.moe_swiglu(x, w13, w2, torch.tensor([[0, 1], [2, 3]]), weights)
    with pytest.raises(ValueError, match="shapes do not match"):
        k.moe_swiglu(x, w13, torch.ones(3, 8, 5).bfloat16(), torch.tensor([[0, 1], [1, 2]]), weights)
    with pytest.raises(ValueError, match="dtypes"):
        k.moe_swiglu(x.float(), w13, w2, torch.tensor([[0, 1], [1, 2]]), weights)
    with pytest.raises(ValueError, match="dtypes"):
        k.mm(torch.ones(2, 8), torch.ones(4, 8).bfloat16())
    with pytest.raises(ValueError, match="dtypes"):
        k.mm(torch.ones(2, 8).half(), torch.ones(4, 8).half())
    assert k.moe_swiglu(x, w13, w2, torch.tensor([[0, 1], [1, 2]]), weights).shape == (2, 8)
