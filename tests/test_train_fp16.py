"""fp16 training (autocast + GradScaler) on CPU: it trains, skips and backs off on inf/NaN gradients
without touching the weights or the LR schedule, clips the true (unscaled) gradients, resumes bitwise
with the scaler's state, and the fused LM head + cross-entropy gives the plain formulation's gradients.

torch runs fp16 autocast and GradScaler on CPU, so the loss-scaling path a GPU run takes is tested here.
"""

import copy
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_train_distributed import BIAS_MODEL_YAML
from test_train_loop import TINY_YAML, cli_env, factory, tiny_cfg, write_token_dir

from moecoder.model import Transformer
from moecoder.model import loss as loss_mod
from moecoder.model import transformer as transformer_mod
from moecoder.model.loss import IGNORE_INDEX, linear_cross_entropy
from moecoder.train import distributed as D
from moecoder.train import loop
from moecoder.train import state as S
from moecoder.train.loop import StepOptions, TrainConfig, train, train_step
from moecoder.train.optim import build_optimizer, scaled_clip_and_step

FP16 = torch.float16


def _model(cfg=None, seed=3):
    torch.manual_seed(0)
    m = Transformer(cfg or tiny_cfg())
    m.init_weights(seed=seed)
    return m


def _batch(cfg, B=4, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = x.roll(-1, 1)
    y[1, 10:] = IGNORE_INDEX  # a right-padded row
    return x, y


def _scaler(**kw):
    return torch.amp.GradScaler("cpu", **kw)


class _GradRecorder(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it was handed (after unscale and clip)."""

    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def _poison(param: torch.Tensor, value: float):
    """A hook that puts `value` (inf/NaN) into one element of `param`'s gradient."""

    def hook(grad):
        grad = grad.clone()
        grad.view(-1)[0] = value
        return grad

    return param.register_hook(hook)


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _fp16_cfg(**kw):
    base = {"steps": 12, "batch_size": 4, "seq_len": 16, "lr": 3e-3, "min_lr": 3e-4, "warmup": 2, "eval_every": 0,
            "keep": 0, "precision": "fp16", "device": "cpu", "seed": 5}
    return TrainConfig(**{**base, **kw})


# --- it trains ---


def test_fp16_run_trains_with_fp32_master_weights_and_logs_the_loss_scale(tmp_path, monkeypatch):
    data = write_token_dir(tmp_path / "data")
    # A short growth interval, so the logged scale moves within the run.
    monkeypatch.setattr(loop, "_grad_scaler", lambda info: _scaler(growth_interval=10))
    cfg = _fp16_cfg(steps=40, batch_size=8, seq_len=32, warmup=3)
    res = train(cfg, tiny_cfg(), tmp_path / "run", loader_factory=factory(data), stream=io.StringIO())
    model = res["model"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    with torch.autocast("cpu", dtype=FP16):
        assert model(torch.zeros(1, 4, dtype=torch.long)).logits.dtype == FP16  # fp16 compute
    recs = _records(tmp_path / "run")
    assert [r["step"] for r in recs] == list(range(1, 41))
    losses = [r["loss"] for r in recs]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < losses[0] - 1.0
    assert not any(r["skipped"] for r in recs)
    # The scale each step's backward used: 2**16, doubled after every 10 clean steps.
    assert [r["loss_scale"] for r in recs] == [2.0 ** (16 + i // 10) for i in range(40)]
    assert all(math.isfinite(r["grad_norm"]) for r in recs)


def test_cli_accepts_fp16_on_cpu(tmp_path, monkeypatch):
    from moecoder.cli import main

    data = write_token_dir(tmp_path / "data", n_train=1500, n_val=400)
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["moecoder", "train", "--config", str(tmp_path / "tiny.yaml"), "--data",
                                      str(data), "--out", str(out), "--steps", "4", "--batch-size", "4",
                                      "--seq-len", "16", "--eval-every", "4", "--keep", "1",
                                      "--precision", "fp16", "--device", "cpu"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code in (0, None)
    recs = _records(out)
    assert len(recs) == 4 and recs[0]["loss_scale"] == 65536.0 and math.isfinite(recs[-1]["eval_loss"])
    state = S.load_train_state(S.checkpoint_root(out) / S.step_dir_name(4))
    assert state["scaler"]["scale"] == 65536.0 and state["scaler"]["_growth_tracker"] == 4


# --- an inf/NaN gradient: the update is skipped, the scale backs off ---


def _snapshot(model, optimizer):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    opt = {id(p): {k: v.clone() for k, v in st.items()} for p, st in optimizer.state.items()}
    return params, buffers, opt


@pytest.mark.parametrize("fused", [True, False])  # the folded fast path and unscale_ + clip_grad_norm_
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_inf_or_nan_gradient_skips_the_update_and_backs_off_the_scale(fused, value):
    cfg = tiny_cfg(routing_bias=True, score_func="sigmoid")
    model = _model(cfg)
    x, y = _batch(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)
    scaler = _scaler()
    opts = StepOptions(clip=1.0, autocast_dtype=FP16, scaler=scaler, bias_update_rate=0.01)
    first = train_step(model, optimizer, [(x, y)], 1e-3, opts)  # an optimizer state to keep unchanged
    assert not first.skipped and first.loss_scale == 65536.0 and math.isfinite(first.grad_norm)
    before = _snapshot(model, optimizer)
    assert any(b.abs().sum() > 0 for n, b in before[1].items() if "bias" in n)  # the router bias moved once

    handle = _poison(model.layers[0].ffn.router.gate.weight, value)
    try:
        res = train_step(model, optimizer, [(x, y)], 1e-3, opts)
    finally:
        handle.remove()
    assert res.skipped and res.loss_scale == 65536.0 and not math.isfinite(res.grad_norm)
    assert math.isfinite(res.loss)  # the forward was fine; only the gradient was poisoned
    assert scaler.get_scale() == 32768.0
    after = _snapshot(model, optimizer)
    for name, p in before[0].items():
        assert torch.equal(after[0][name], p), name  # weights bitwise unchanged
    for name, b in before[1].items():
        assert torch.equal(after[1][name], b), name  # router biases too
    for key, st in before[2].items():
        for k, v in st.items():
            assert torch.equal(after[2][key][k], v), k  # moments and AdamW's step count unchanged
    assert all(p.grad is None for p in model.parameters())

    # The next clean step runs at the backed-off scale and counts as AdamW's second update.
    res = train_step(model, optimizer, [(x, y)], 1e-3, opts)
    assert not res.skipped and res.loss_scale == 32768.0 and scaler.get_scale() == 32768.0
    assert {float(st["step"]) for st in optimizer.state.values()} == {2.0}
    assert any(not torch.equal(p, before[0][n]) for n, p in model.named_parameters())


def test_a_skipped_step_keeps_its_lr_slot_and_the_run_continues(tmp_path, monkeypatch):
    """The LR stays schedule(step) for the loop's step number: a skipped step uses up its LR (torch's
    convention), the following steps are not shifted; AdamW's own step count is the updates applied."""
    data = write_token_dir(tmp_path / "data", n_train=3000, n_val=200)
    original = loop.train_step
    applied = []

    def poisoned_at_step_5(model, optimizer, micro_batches, lr, opts):
        handle = _poison(D.unwrap(model).embed.weight, float("nan")) if len(applied) == 4 else None
        try:
            res = original(model, optimizer, micro_batches, lr, opts)
        finally:
            if handle is not None:
                handle.remove()
        applied.append(optimizer.param_groups[0]["lr"])
        return res

    monkeypatch.setattr(loop, "train_step", poisoned_at_step_5)
    cfg = _fp16_cfg(steps=8, keep=1, save_every=0)
    log = io.StringIO()
    train(cfg, tiny_cfg(), tmp_path / "run", loader_factory=factory(data), stream=log)
    assert applied == [cfg.schedule_fn()(s) for s in range(8)]
    recs = _records(tmp_path / "run")
    assert [r["lr"] for r in recs] == applied
    assert [r["skipped"] for r in recs] == [False] * 4 + [True] + [False] * 3
    assert recs[4]["grad_norm"] is None and all(r["grad_norm"] > 0 for i, r in enumerate(recs) if i != 4)
    assert [r["loss_scale"] for r in recs] == [65536.0] * 5 + [32768.0] * 3
    assert "step 5: inf/NaN gradients at loss scale 65536; update skipped" in log.getvalue()
    state = S.load_train_state(S.checkpoint_root(tmp_path / "run") / S.step_dir_name(8))
    assert state["step"] == 8
    assert {float(st["step"]) for st in state["optimizer"]["state"].values()} == {7.0}  # 8 steps, 7 updates
    assert state["scaler"]["scale"] == 32768.0 and state["scaler"]["_growth_tracker"] == 3


def test_gradients_inf_whatever_the_scale_stop_the_run(tmp_path, monkeypatch):
    data = write_token_dir(tmp_path / "data", n_train=3000, n_val=200)
    original = loop.train_step

    def always_nan(model, optimizer, micro_batches, lr, opts):
        handle = _poison(D.unwrap(model).embed.weight, float("nan"))
        try:
            return original(model, optimizer, micro_batches, lr, opts)
        finally:
            handle.remove()

    monkeypatch.setattr(loop, "train_step", always_nan)
    monkeypatch.setattr(loop, "MAX_SKIPPED_IN_A_ROW", 3)
    with pytest.raises(FloatingPointError, match="inf/NaN gradients for 3 steps in a row"):
        train(_fp16_cfg(steps=8), tiny_cfg(), tmp_path / "run", loader_factory=factory(data), stream=io.StringIO())
    assert [r["skipped"] for r in _records(tmp_path / "run")] == [True, True]


# --- the scaler's state is part of the checkpoint: exact resume ---


class _Crash(Exception):
    pass


def test_interrupted_fp16_run_resumes_bitwise_equal_to_an_uninterrupted_one(tmp_path, monkeypatch):
    """A NaN gradient at step 2 backs the scale off to 2**15; with a growth interval of 5 the scaler
    checkpointed at step 6 holds (scale 2**15, 4 clean steps), so it grows after step 7. A resume that
    restarted the scaler (2**16, 0 steps) would log different scales from step 7 on."""
    data = write_token_dir(tmp_path / "data", n_train=4000, n_val=200)
    original = loop.train_step
    monkeypatch.setattr(loop, "_grad_scaler", lambda info: _scaler(growth_interval=5))

    def run(out, poison_call=None, crash_call=None):
        calls = []

        def step(model, optimizer, micro_batches, lr, opts):
            n = len(calls)
            calls.append(n)
            if n == crash_call:
                raise _Crash
            handle = _poison(D.unwrap(model).embed.weight, float("nan")) if n == poison_call else None
            try:
                return original(model, optimizer, micro_batches, lr, opts)
            finally:
                if handle is not None:
                    handle.remove()

        monkeypatch.setattr(loop, "train_step", step)
        cfg = _fp16_cfg(steps=12, save_every=3, keep=2, micro_batch=2)
        return train(cfg, tiny_cfg(), out, loader_factory=factory(data), stream=io.StringIO())

    ref = tmp_path / "ref"
    run(ref, poison_call=1)
    out = tmp_path / "killed"
    with pytest.raises(_Crash):
        run(out, poison_call=1, crash_call=7)  # dies during step 8; the newest checkpoint is step 6
    assert [r["step"] for r in _records(out)] == list(range(1, 8))
    saved = S.load_train_state(S.checkpoint_root(out) / S.step_dir_name(6))["scaler"]
    assert saved["scale"] == 32768.0 and saved["_growth_tracker"] == 4
    run(out)  # resumes at step 6: steps 7-12 again

    want, got = _records(ref), _records(out)
    keys = ("step", "loss", "lr", "grad_norm", "lb_loss", "z_loss", "loss_scale", "skipped", "tokens_per_expert")
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in want]
    assert [r["loss_scale"] for r in want] == [65536.0] * 2 + [32768.0] * 5 + [65536.0] * 5
    final = S.MODEL_DIR + "/model.safetensors"
    w_ref = load_file(S.checkpoint_root(ref) / S.step_dir_name(12) / final)
    w_got = load_file(S.checkpoint_root(out) / S.step_dir_name(12) / final)
    assert w_ref.keys() == w_got.keys() and w_ref
    for name in w_ref:
        assert torch.equal(w_ref[name], w_got[name]), name
    st_ref = S.load_train_state(S.checkpoint_root(ref) / S.step_dir_name(12))
    st_got = S.load_train_state(S.checkpoint_root(out) / S.step_dir_name(12))
    assert st_got["scaler"] == st_ref["scaler"]
    for name, st in st_ref["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(st_got["optimizer"]["state"][name][k], v), (name, k)


# --- clipping applies to the true gradients ---


def _params(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((64, 32), (32,), (7, 5, 3))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return ps


def _ready_scaler(init_scale):
    scaler = _scaler(init_scale=init_scale)
    scaler.scale(torch.ones(()))  # what a backward's scaler.scale(loss) does first: create the scale tensor
    return scaler


@pytest.mark.parametrize("max_norm", [0.5, 1e6, float("inf")])
@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_scaled_clip_and_step_equals_clipping_the_true_gradients_then_stepping(max_norm, kind):
    """Reference: clip_grad_norm_ on the true gradients + AdamW; ours gets them times the loss scale."""
    make = {"lr": 1e-2, "weight_decay": 0.1, "fused": kind == "fused", "foreach": None if kind == "fused" else True}
    ref, ours = _params(), _params()
    opt_ref, opt = torch.optim.AdamW(ref, **make), torch.optim.AdamW(ours, **make)
    scaler = _ready_scaler(2.0 ** 16)
    for step in range(3):  # three steps with different gradients: Adam sees the clip factors' ratios
        if step:
            for pr, po, fresh in zip(ref, ours, _params(step, scale=3.0 * (step + 1))):
                pr.grad, po.grad = fresh.grad.clone(), fresh.grad.clone()
        s = scaler.get_scale()
        for p in ours:
            p.grad.mul_(s)  # what backward of the scaled loss leaves (a power of two: exact)
        norm_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt_ref.step()
        norm, skipped = scaled_clip_and_step(scaler, opt, ours, max_norm)
        assert not skipped
        torch.testing.assert_close(norm, norm_ref, rtol=1e-6, atol=0)
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        for pr, po in zip(ref, ours):
            torch.testing.assert_close(po, pr, rtol=1e-6, atol=1e-7)


def test_scaled_clip_with_sgd_applies_exactly_the_clipped_true_gradient():
    """SGD's update is the gradient itself: the applied one has norm max_norm, not max_norm / scale."""
    ps = _params()
    true = [p.grad.clone() for p in ps]
    start = [p.detach().clone() for p in ps]
    scaler = _ready_scaler(2.0 ** 10)
    for p in ps:
        p.grad.mul_(2.0 ** 10)
    norm, skipped = scaled_clip_and_step(scaler, torch.optim.SGD(ps, lr=1.0), ps, 0.5)
    true_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in true]))
    assert not skipped and float(norm) == pytest.approx(float(true_norm), rel=1e-6) and float(norm) > 10
    for p, p0, g in zip(ps, start, true):
        # atol: p0 - p cancels most of p's bits (|p| ~ 1, its ulp ~ 1e-7)
        torch.testing.assert_close(p0 - p, g * (0.5 / (true_norm + 1e-6)), rtol=1e-5, atol=3e-7)


def test_train_step_fp16_clips_the_unscaled_gradients():
    cfg = tiny_cfg()
    x, y = _batch(cfg)
    model = _model(cfg)
    opt = _GradRecorder(model.parameters(), lr=0.0)
    res = train_step(model, opt, [(x, y)], 0.0, StepOptions(clip=1e-3, autocast_dtype=FP16, scaler=_scaler()))
    applied = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in opt.grads]))
    assert res.grad_norm > 0.1  # the true norm before clipping (the scaled one is 65536x that)
    assert float(applied) == pytest.approx(1e-3, rel=1e-3)


def test_train_step_fp16_fused_adamw_fast_path_matches_unscale_clip_then_step():
    """Three clipped fp16 steps of train_step with fused AdamW (unscale and clip folded into its kernel),
    each against the reference from the same state: the gradients train_step hands an optimizer after
    GradScaler.unscale_ + clip_grad_norm_ (a recording SGD), then a plain fused AdamW step on them."""
    cfg = tiny_cfg()
    model = _model(cfg)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.1)
    assert opt.defaults["fused"]
    scaler = _scaler()
    for i in range(3):
        x, y = _batch(cfg, seed=i)
        ref_model, ref_opt = copy.deepcopy((model, opt))  # one memo: ref_opt holds ref_model's parameters
        rec_model = copy.deepcopy(model)
        rec = _GradRecorder(rec_model.parameters(), lr=0.0)
        r_rec = train_step(rec_model, rec, [(x, y)], 3e-3,
                           StepOptions(clip=0.5, autocast_dtype=FP16, scaler=_scaler(init_scale=scaler.get_scale())))
        for p, g in zip(ref_model.parameters(), rec.grads):
            p.grad = g
        ref_opt.step()

        res = train_step(model, opt, [(x, y)], 3e-3, StepOptions(clip=0.5, autocast_dtype=FP16, scaler=scaler))
        assert res.loss == r_rec.loss and res.grad_norm > 0.5 and not res.skipped
        assert res.grad_norm == pytest.approx(r_rec.grad_norm, rel=1e-6)
        for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"step {i + 1} {name}")


# --- the fused LM head + cross-entropy under fp16 and a GradScaler ---


def test_fused_ce_fp16_with_the_loss_scale_matches_the_plain_autocast_formulation():
    g = torch.Generator().manual_seed(0)
    N, C, V = 96, 32, 300
    h = torch.randn(N, C, generator=g)
    w = torch.randn(V, C, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = IGNORE_INDEX
    n = int((y != IGNORE_INDEX).sum())
    loss_scale = 2.0 ** 16
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=FP16):
        ref = F.cross_entropy(F.linear(hr, wr).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")
    (ref / n * loss_scale).backward()
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=FP16):
        loss, ce = linear_cross_entropy(hf, wf, y, scale=loss_scale / n, chunk=16)
    (loss / loss_scale * loss_scale).backward()  # train_step's incoming gradient: exactly 1
    assert hf.grad.dtype == wf.grad.dtype == torch.float32
    torch.testing.assert_close(ce, ref.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(hf.grad, hr.grad, rtol=1e-2, atol=1e-2 * float(hr.grad.abs().max()))
    torch.testing.assert_close(wf.grad, wr.grad, rtol=1e-2, atol=1e-2 * float(wr.grad.abs().max()))
    assert loss_mod.fused_ce_supported("cpu")
    with torch.autocast("cpu", dtype=FP16):
        assert loss_mod.fused_ce_supported("cpu")


def test_fp16_fused_ce_needs_the_loss_scale_in_its_scale_against_underflow():
    """8192 tokens: 1/tokens x gradient falls below fp16's normal range. With the loss scale in `scale`
    (what train_step does) the fused gradients are as accurate as the plain autocast formulation's
    (grad_h bitwise nearly everywhere: the same fp16 operands); scaling the returned loss instead, as
    GradScaler.scale would, forms them unscaled in fp16 and loses ~8x accuracy to underflow."""
    g = torch.Generator().manual_seed(0)
    N, C, V = 8192, 32, 300
    h, w = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    S = 2.0 ** 16
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    (F.cross_entropy(hr @ wr.t(), y, reduction="sum") / N).backward()

    def run(fn):
        hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=FP16):
            out = fn(hf, wf)
        out.backward()
        return hf.grad / S, wf.grad / S

    def err(got, want):
        return float((got.double() - want).norm() / want.norm())

    plain_h, plain_w = run(lambda a, b: F.cross_entropy(F.linear(a, b).float(), y, reduction="sum") / N * S)
    ours_h, ours_w = run(lambda a, b: linear_cross_entropy(a, b, y, scale=S / N)[0] / S * S)
    naive_h, _ = run(lambda a, b: linear_cross_entropy(a, b, y, scale=1 / N)[0] * S)
    assert err(ours_h, hr.grad) <= 1.01 * err(plain_h, hr.grad) and err(ours_h, hr.grad) < 1e-3
    assert err(ours_w, wr.grad) <= 1.01 * err(plain_w, wr.grad)
    assert float((ours_h == plain_h).float().mean()) > 0.99
    assert err(naive_h, hr.grad) > 4 * err(ours_h, hr.grad) and (naive_h == 0).any()


def test_fused_ce_under_a_grad_scaler_matches_the_plain_formulation_through_train_step(monkeypatch):
    """fp16 autocast + GradScaler, two micro-batches, padding: the unscaled gradients (and the loss)
    with the fused head equal those of the plain logits + cross-entropy within fp16 rounding."""
    cfg = tiny_cfg()
    x, y = _batch(cfg, B=4, T=16)
    fused = _model(cfg)
    plain = copy.deepcopy(fused)

    def grads(model, use_fused):
        with monkeypatch.context() as m:
            if not use_fused:
                m.setattr(transformer_mod, "fused_ce_supported", lambda device_type: False)
            opt = _GradRecorder(model.parameters(), lr=0.0)
            res = train_step(model, opt, list(zip(x.split(2), y.split(2))), 0.0,
                             StepOptions(clip=0.0, autocast_dtype=FP16, scaler=_scaler()))
        return res, opt.grads

    calls = []
    real = loss_mod._LinearCrossEntropy.apply
    monkeypatch.setattr(loss_mod._LinearCrossEntropy, "apply", lambda *a: calls.append(a[3]) or real(*a))
    r_fused, g_fused = grads(fused, True)
    assert calls and all(s > 1 for s in calls)  # the fused function ran, with the loss scale in its scale
    n_calls = len(calls)
    r_plain, g_plain = grads(plain, False)
    assert len(calls) == n_calls  # the reference never went through it
    assert not r_fused.skipped and not r_plain.skipped
    assert r_fused.loss == pytest.approx(r_plain.loss, rel=1e-3)
    assert r_fused.grad_norm == pytest.approx(r_plain.grad_norm, rel=1e-2)
    for (name, _), a, b in zip(fused.named_parameters(), g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()) + 1e-8, msg=name)


# --- FSDP2: ShardedGradScaler on 2 gloo ranks ---


# Runs `train` (under torchrun or not) with a NaN put into one gradient element at one step, after the
# backward (and DDP's all-reduce): on the last rank only, or on every rank with POISON_ALL_RANKS=1.
DRIVER = """\
import os, sys
from pathlib import Path
from moecoder.cli import main
from moecoder.train import loop

poison_call = int(os.environ["POISON_CALL"])
this_rank = (os.environ.get("POISON_ALL_RANKS") == "1"
             or int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1)
real = loop.scaled_clip_and_step
calls = []

def poisoned(scaler, optimizer, params, max_norm):
    params = list(params)
    if len(calls) == poison_call and this_rank:
        g = params[0].grad
        (g.to_local() if hasattr(g, "to_local") else g).view(-1)[0] = float("nan")
    calls.append(1)
    return real(scaler, optimizer, params, max_norm)

loop.scaled_clip_and_step = poisoned
sys.argv = ["moecoder", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_ranks_skip_together_and_match_one_process(tmp_path, parallel):
    """DDP: an inf/NaN gradient is all-reduced onto every rank, so every rank sees it (poisoned on all
    ranks after the all-reduce here); each runs torch.amp.GradScaler and skips alike.
    FSDP2: a NaN in the last rank's gradient shard only: the inf check is all-reduced (ShardedGradScaler;
    DTensor's handler of the check op does too), so both ranks skip the step (a rank that stepped alone
    would leave its shards, and router biases, apart from the one-process run's) and back off the same
    scale; the rest matches one process. Also runs fused AdamW on DTensors under a GradScaler, which
    torch 2.13 cannot do through GradScaler's fused-kernel path (see optim.scaled_clip_and_step)."""
    data = write_token_dir(tmp_path / "data", n_train=3000, n_val=600)
    (tmp_path / "bias.yaml").write_text(BIAS_MODEL_YAML)
    (tmp_path / "driver.py").write_text(DRIVER)
    args = ["train", "--config", str(tmp_path / "bias.yaml"), "--data", str(data), "--steps", "5",
            "--batch-size", "4", "--micro-batch", "1", "--seq-len", "16", "--warmup", "2", "--lr", "3e-3",
            "--eval-every", "0", "--save-every", "5", "--keep", "1", "--device", "cpu", "--precision", "fp16",
            "--bias-update-rate", "1e-3"]
    env = {**cli_env(), "POISON_CALL": "2", "POISON_ALL_RANKS": "1" if parallel == "ddp" else "0"}
    single = subprocess.run([sys.executable, str(tmp_path / "driver.py"), *args, "--out", str(tmp_path / "one")],
                            check=False, capture_output=True, text=True, env=env, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "driver.py"), *args, "--out", str(tmp_path / "two"), "--parallel", parallel],
                       check=False, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    ref, got = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["skipped"] for r in got] == [r["skipped"] for r in ref] == [False, False, True, False, False]
    assert [r["loss_scale"] for r in got] == [r["loss_scale"] for r in ref] == [65536.0] * 3 + [32768.0] * 2
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5), b["step"]
        if a["grad_norm"] is not None:
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-5), b["step"]

    def weights(out):
        (_, folder), = S.list_checkpoints(out)
        state = S.load_train_state(folder)
        return load_file(folder / S.MODEL_DIR / "model.safetensors"), state

    (w_ref, st_ref), (w_got, st_got) = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert st_got["scaler"] == st_ref["scaler"]
    assert {float(s["step"]) for s in st_got["optimizer"]["state"].values()} == {4.0}  # 5 steps, 4 updates
    assert w_got.keys() == w_ref.keys()
    for name, w in w_got.items():  # tolerance as in test_train_distributed (Adam on float noise)
        torch.testing.assert_close(w, w_ref[name], rtol=1e-4, atol=1e-4, msg=name)
