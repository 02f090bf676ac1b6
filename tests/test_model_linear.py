"""The fp32 detour for many-row bf16/fp16 products on CPU (model/linear.py): same results as the
native kernel, used only where it applies."""

import pytest
import torch
import torch.nn.functional as F

from moecoder.config import get_preset
from moecoder.generate import prefill
from moecoder.model import KVCache, Transformer
from moecoder.model import linear as linear_mod
from moecoder.model.grouped_swiglu import grouped_swiglu


@pytest.fixture
def detour(monkeypatch):
    """Force the measured decision to 'faster', so the detour runs on any machine."""
    calls = []

    def faster(dtype):
        calls.append(dtype)
        return True

    monkeypatch.setattr(linear_mod, "_fp32_product_is_faster", faster)
    return calls


def _ulp_close(a, b, ref):
    """Both results within one bf16 rounding of the fp64 reference (different summation orders)."""
    tol = ref.abs().clamp_min(1e-3) * 2**-7
    return bool(((a.double() - ref).abs() <= tol).all() and ((b.double() - ref).abs() <= tol).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_detour_matches_the_native_kernel(detour, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 96, generator=g).to(dtype)
    w, b = torch.randn(48, 96, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    with torch.inference_mode():
        out = linear_mod.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double())
    assert out.dtype == dtype and detour == [dtype]
    assert _ulp_close(out, F.linear(x, w, b), ref)


def test_detour_is_not_used_for_few_rows_training_autocast_or_fp32(detour):
    w = torch.randn(16, 32).bfloat16()
    with torch.inference_mode():
        assert not linear_mod.use_fp32_product(torch.randn(8, 32).bfloat16(), 8)  # decode-sized
        assert not linear_mod.use_fp32_product(torch.randn(64, 32), 64)  # already fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not linear_mod.use_fp32_product(torch.randn(64, 32).bfloat16(), 64)
    x = torch.randn(64, 32).bfloat16().requires_grad_()
    assert not linear_mod.use_fp32_product(x, 64)  # autograd on: training numerics unchanged
    linear_mod.linear(x, w).sum().backward()
    assert x.grad is not None and detour == []


def test_the_decision_is_measured_once_per_dtype():
    linear_mod._fp32_product_is_faster.cache_clear()
    first = linear_mod._fp32_product_is_faster(torch.bfloat16)
    assert linear_mod._fp32_product_is_faster(torch.bfloat16) is first
    assert linear_mod._fp32_product_is_faster.cache_info().misses == 1


def test_grouped_experts_detour_matches(detour):
    g = torch.Generator().manual_seed(1)
    counts = [70, 0, 5, 90]  # two segments take the detour, one is too short, one is empty
    x = torch.randn(sum(counts), 32, generator=g).bfloat16()
    w13, w2 = torch.randn(4, 48, 32, generator=g).bfloat16(), torch.randn(4, 32, 24, generator=g).bfloat16()
    with torch.inference_mode():
        fast = grouped_swiglu(x, w13, w2, counts)
    with torch.enable_grad():  # autograd on: the native kernel
        native = grouped_swiglu(x, w13, w2, counts)
    assert detour  # the detour was considered (and forced on)
    assert (fast.float() - native.float()).abs().max() <= 0.05 * native.float().abs().max()


def test_bf16_prefill_with_the_detour_matches_native(detour, monkeypatch):
    model = Transformer(get_preset("debug").replace(norm_topk=True))
    model.init_weights(std=0.1, seed=0)
    model = model.to(torch.bfloat16).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 80), generator=torch.Generator().manual_seed(2))

    def run():
        with torch.inference_mode():
            return prefill(model, ids, torch.tensor([80, 80]), KVCache(model.cfg, 2, 96, torch.bfloat16)).float()

    fast = run()
    monkeypatch.setattr(linear_mod, "_fp32_product_is_faster", lambda dtype: False)
    native = run()
    assert len(detour) > 0
    assert (fast - native).abs().max() <= 0.05 * native.abs().max()
    assert torch.equal(fast.argmax(-1), native.argmax(-1))


def test_compiled_single_row_half_product_matches_the_native_kernel():
    """Under torch.compile a 16-bit one-row product is a fused multiply-and-sum (fp32 accumulation)."""
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(300, 64, generator=g).bfloat16(), torch.randn(300, generator=g).bfloat16()
    step = torch.compile(linear_mod.linear, dynamic=False, fullgraph=True)
    for x in (torch.randn(1, 1, 64, generator=g).bfloat16(), torch.randn(64, generator=g).bfloat16()):
        with torch.inference_mode():
            out = step(x, w, b)
        ref = F.linear(x.double(), w.double(), b.double())
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape
        assert _ulp_close(out, F.linear(x, w, b), ref)
