"""Training fast paths against their plain formulations: the fused, chunked LM head + cross-entropy
(model/loss.py) vs cross-entropy on full logits, the clip factor folded into fused AdamW vs
clip_grad_norm_ + step, and the grouped SwiGLU experts' backward vs autograd over the per-expert loop."""

import copy

import pytest
import torch
import torch.nn.functional as F

from moecoder.config import get_preset
from moecoder.model import Transformer
from moecoder.model import loss as loss_mod
from moecoder.model.grouped_swiglu import grouped_swiglu
from moecoder.model.loss import IGNORE_INDEX, _target_nll, linear_cross_entropy
from moecoder.train.loop import StepOptions, train_step
from moecoder.train.optim import clip_and_step


def _inputs(N=37, C=24, V=101, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, dtype=torch.float64).float()
    w = (torch.randn(V, C, generator=g) * 0.3).float()
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = IGNORE_INDEX
    return h, w, y


def _plain(h, w, y, scale):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    ce = F.cross_entropy(h @ w.t(), y, ignore_index=IGNORE_INDEX, reduction="sum")
    (ce * scale).backward()
    return ce.detach(), h.grad, w.grad


def _fused(h, w, y, scale, chunk=None, grad_out=None):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, ce = linear_cross_entropy(h, w, y, scale=scale, chunk=chunk)
    (loss if grad_out is None else loss * grad_out).backward()
    return loss.detach(), ce, h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 64])
def test_loss_and_grads_match_cross_entropy_on_full_logits_with_ignored_targets(chunk):
    h, w, y = _inputs()
    n_targets = int((y != IGNORE_INDEX).sum())
    scale = 1.0 / n_targets  # the loop's global token-count normalisation
    ce_ref, gh_ref, gw_ref = _plain(h, w, y, scale)
    loss, ce, gh, gw = _fused(h, w, y, scale, chunk=chunk)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(loss, ce_ref * scale, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-7)
    assert (gh[y == IGNORE_INDEX] == 0).all()  # padding positions get no gradient


def test_rescales_when_the_incoming_gradient_is_not_one():
    h, w, y = _inputs()
    _, gh_ref, gw_ref = _plain(h, w, y, 0.25 * 3.0)
    _, _, gh, gw = _fused(h, w, y, 0.25, grad_out=3.0)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-7)


def test_all_targets_ignored_gives_zero_loss_and_grads():
    h, w, y = _inputs(N=6)
    y[:] = IGNORE_INDEX
    loss, ce, gh, gw = _fused(h, w, y, 1.0, chunk=4)
    assert float(loss) == 0.0 and float(ce) == 0.0
    assert not gh.any() and not gw.any()


def test_tiny_target_probability_keeps_the_exact_loss():
    # The target's softmax probability underflows fp32 (loss ~ 200): the loss must stay finite and exact.
    h, _, y = _inputs(N=4, C=16, V=16, ignore_every=0)
    w = torch.eye(16)  # logits = h
    h[0, y[0]] = -150.0  # p_target = e^-150: 0 in fp32
    h[1, y[1]] = -80.0  # p_target ~ 1e-35: subnormal territory
    ce_ref, gh_ref, gw_ref = _plain(h, w, y, 1.0)
    _, ce, gh, gw = _fused(h, w, y, 1.0, chunk=2)
    assert float(ce_ref) > 100
    torch.testing.assert_close(ce, ce_ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)


def test_no_grad_computes_only_the_loss():
    h, w, y = _inputs()
    with torch.no_grad():
        loss, ce = linear_cross_entropy(h, w, y)
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(ce, ref, rtol=1e-6, atol=1e-5)
    assert not loss.requires_grad


def test_bf16_autocast_is_close_to_the_plain_autocast_formulation():
    h, w, y = _inputs(N=64, C=32, V=300)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(hr, wr).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(hf, wf, y, chunk=16)
    loss.backward()
    assert hf.grad.dtype == wf.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(hf.grad, hr.grad, rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(wf.grad, wr.grad, rtol=3e-2, atol=3e-3)


def _tiny_model(**kw):
    cfg = get_preset("debug").replace(ffn_dim=64, norm_topk=True, **kw)
    model = Transformer(cfg)
    model.init_weights(seed=1)
    return model


def _batch(model, B=4, T=12):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)
    y[1, 7:] = IGNORE_INDEX  # a right-padded row
    y[3, :2] = IGNORE_INDEX
    return x, y


@pytest.mark.parametrize("tied", [False, True])
def test_model_forward_with_targets_matches_logits_and_cross_entropy(tied):
    model = _tiny_model(tie_embeddings=tied)
    ref = copy.deepcopy(model)
    x, y = _batch(model)
    scale = 1.0 / int((y != IGNORE_INDEX).sum())
    out = model(x, targets_BT=y, ce_scale=scale)
    assert out.logits is None
    out.ce_loss.backward()
    ref_out = ref(x)
    ce_ref = F.cross_entropy(ref_out.logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    (ce_ref * scale).backward()
    torch.testing.assert_close(out.ce_sum, ce_ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.lb_loss, ref_out.lb_loss)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7, msg=name)


class _GradRecorder(torch.optim.SGD):
    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def test_train_step_matches_the_plain_loss_with_global_token_normalisation():
    model = _tiny_model()
    ref = copy.deepcopy(model)
    x, y = _batch(model)
    opt = _GradRecorder(model.parameters(), lr=0.0)
    res = train_step(model, opt, list(zip(x.split(2), y.split(2))), 0.0, StepOptions(clip=0.0))
    n = int((y != IGNORE_INDEX).sum())
    assert res.target_tokens == n
    total = 0.0
    for xm, ym in zip(x.split(2), y.split(2)):
        ce = F.cross_entropy(ref(xm).logits.flatten(0, 1), ym.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        (ce / n).backward()
        total += float(ce.detach())
    assert res.loss == pytest.approx(total / n, rel=1e-6)
    for name, g, p_ref in zip([n for n, _ in model.named_parameters()], opt.grads, ref.parameters()):
        torch.testing.assert_close(g, p_ref.grad, rtol=1e-5, atol=1e-7, msg=name)


# --- the clip factor folded into fused AdamW's step ---


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((64, 32), (32,), (7, 5, 3))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return ps


@pytest.mark.parametrize("max_norm", [0.5, 1e6, float("inf")])
def test_clip_folded_into_fused_adamw_equals_clip_then_step(max_norm):
    ref, ours = _params(), _params()
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    opt = torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(3):
        if step:
            for pr, po, fresh in zip(ref, ours, _params(step)):
                pr.grad, po.grad = fresh.grad.clone(), fresh.grad.clone()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt_ref.step()
        norm = clip_and_step(opt, ours, max_norm)
        torch.testing.assert_close(norm, norm_ref)
        assert not hasattr(opt, "grad_scale")
        for pr, po in zip(ref, ours):
            torch.testing.assert_close(po, pr, rtol=1e-6, atol=1e-7)


def test_clip_and_step_with_another_optimizer_clips_the_gradients():
    ps = _params()
    opt = torch.optim.SGD(ps, lr=0.0)
    norm = clip_and_step(opt, ps, 1e-3)
    assert float(norm) > 1.0
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ps]))
    assert float(clipped) == pytest.approx(1e-3, rel=1e-4)


# --- grouped SwiGLU experts with the hand-written backward ---


@pytest.mark.parametrize("counts", [[5, 0, 9, 3], [0, 0, 4, 0], [2, 2, 2, 2]])
def test_grouped_swiglu_matches_the_per_expert_loop_forward_and_backward(counts):
    g = torch.Generator().manual_seed(0)
    E, C, Fh = 4, 16, 24
    w13 = torch.randn(E, 2 * Fh, C, generator=g) * 0.2
    w2 = torch.randn(E, C, Fh, generator=g) * 0.2
    x = torch.randn(sum(counts), C, generator=g)
    dy = torch.randn(sum(counts), C, generator=g)

    def run(fn):
        xs, a, b = (t.clone().requires_grad_() for t in (x, w13, w2))
        y = fn(xs, a, b)
        y.backward(dy)
        return y.detach(), xs.grad, a.grad, b.grad

    def loop(xs, a, b):
        outs = []
        for e, xe in enumerate(xs.split(counts)):
            gate, up = F.linear(xe, a[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, b[e]))
        return torch.cat(outs)

    for got, want in zip(run(lambda xs, a, b: grouped_swiglu(xs, a, b, counts)), run(loop)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_exact_fallback_from_kept_logits():
    # The path taken off CPU (logits kept, no host sync): every row gets the exact value where p_y is tiny.
    z = torch.tensor([[0.0, -150.0, 0.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([1, 2])
    p_y = torch.softmax(z, 1)[torch.arange(2), y]
    nll = _target_nll(p_y, y, logits=z, h_nC=None, w_VC=None)
    torch.testing.assert_close(nll, F.cross_entropy(z, y, reduction="none"))


def test_cpu_workspace_is_reused_across_calls():
    h, w, y = _inputs()
    linear_cross_entropy(h, w, y, chunk=8)
    first = loss_mod._WORKSPACE[h.device].data_ptr()
    loss, _ = linear_cross_entropy(h.requires_grad_(), w, y, chunk=8)
    loss.backward()
    assert loss_mod._WORKSPACE[h.device].data_ptr() == first
