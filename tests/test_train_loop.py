"""The training loop: LR per optimizer step, global-token loss normalisation, aux losses, schedules, CLI."""

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moecoder.config import get_preset
from moecoder.model import Transformer
from moecoder.train import loop
from moecoder.train.loader import TokenWindows
from moecoder.train.loop import IGNORE_INDEX, StepOptions, TrainConfig, TrainConfigError, train, train_step
from moecoder.train.optim import build_optimizer, param_groups, set_lr
from moecoder.train.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]

# The debug preset shaped so a Mixtral HF folder can express it (checkpoints are HF folders).
TINY_YAML = """\
model:
  preset: debug
  ffn_dim: 64
  norm_topk: true
"""


def tiny_cfg(**kw):
    return get_preset("debug").replace(ffn_dim=64, norm_topk=True, **kw)


def write_token_dir(path: Path, vocab: int = 256, n_train: int = 6000, n_val: int = 1500, seed: int = 0) -> Path:
    """A tokenised data folder in the moecoder-tokens-v1 layout: learnable arithmetic runs, eos-separated."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        toks: list[int] = []
        while len(toks) < n:
            start, stride, length = rng.integers(0, vocab), rng.integers(1, 4), rng.integers(4, 12)
            toks += [int(start + stride * i) % (vocab - 1) for i in range(length)] + [vocab - 1]
        (path / f"{split}-00000.bin").write_bytes(np.asarray(toks[:n], dtype="<u2").tobytes())
        splits[split] = {"shards": [{"file": f"{split}-00000.bin", "tokens": n}], "num_tokens": n, "num_docs": 1}
    index = {"format": "moecoder-tokens-v1", "dtype": "uint16", "vocab_size": vocab, "eos_id": vocab - 1,
             "splits": splits, "total_tokens": n_train + n_val}
    (path / "index.json").write_text(json.dumps(index))
    return path


def factory(data_dir):
    def make(split, *, seq_len, seed, rank, world_size):
        return TokenWindows(data_dir, split=split, seq_len=seq_len, seed=seed, rank=rank, world_size=world_size)

    return make


def cli_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return env


# --- the LR follows optimizer steps, not micro-batches ---

N_STEPS, BATCH = 6, 8


def assert_lr_independent_of_accumulation(lr_trace) -> None:
    """lr_trace(accum) -> LR the optimizer applied at each of N_STEPS steps; must not depend on accum."""
    ref = lr_trace(1)
    assert len(ref) == N_STEPS
    for accum in (4, 8):
        got = lr_trace(accum)
        assert got == ref, f"accumulation {accum}: LRs {got} != {ref} with accumulation 1"


def _sched() -> Schedule:
    return Schedule(peak=1e-3, min_lr=1e-4, warmup=2, total=N_STEPS)


def test_lr_after_n_steps_is_the_same_for_accumulation_1_4_8(tmp_path, monkeypatch):
    data = write_token_dir(tmp_path / "data")

    original = loop.train_step

    def real_trace(accum):
        applied = []

        def recording(model, optimizer, micro_batches, lr, opts):
            assert len(micro_batches) == accum
            res = original(model, optimizer, micro_batches, lr, opts)
            applied.append(optimizer.param_groups[0]["lr"])
            return res

        monkeypatch.setattr(loop, "train_step", recording)
        cfg = TrainConfig(steps=N_STEPS, batch_size=BATCH, micro_batch=BATCH // accum, seq_len=16, lr=1e-3,
                          min_lr=1e-4, warmup=2, eval_every=0, keep=0)
        train(cfg, tiny_cfg(), tmp_path / f"run{accum}", loader_factory=factory(data), stream=io.StringIO())
        return applied

    assert_lr_independent_of_accumulation(real_trace)
    lrs = real_trace(4)
    assert lrs == [_sched()(s) for s in range(N_STEPS)]
    assert lrs[-1] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + np.cos(np.pi * 3 / 4)))


def test_lr_check_catches_a_schedule_stepped_per_micro_batch(tmp_path):
    """The review's bug: advancing the schedule on every micro-batch. The same helper must reject it."""
    data = write_token_dir(tmp_path / "data")

    def buggy_trace(accum):
        torch.manual_seed(0)
        model = Transformer(tiny_cfg())
        model.init_weights(seed=0)
        opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
        windows = TokenWindows(data, seq_len=16)
        sched, micro_steps, applied = _sched(), 0, []
        for _ in range(N_STEPS):
            x, y = windows.next_batch(BATCH)
            for xm, ym in zip(x.split(BATCH // accum), y.split(BATCH // accum)):
                set_lr(opt, sched(micro_steps))  # BUG: one schedule step per micro-batch
                micro_steps += 1
                F.cross_entropy(model(xm).logits.flatten(0, 1), ym.flatten()).div(accum).backward()
            opt.step()
            opt.zero_grad()
            applied.append(opt.param_groups[0]["lr"])
        return applied

    with pytest.raises(AssertionError, match="accumulation 4"):
        assert_lr_independent_of_accumulation(buggy_trace)


# --- accumulation == one big batch ---


class GradRecorder(torch.optim.SGD):
    """SGD that keeps a copy of the (clipped) gradients it was asked to apply."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def _padded_batch(cfg, B=8, T=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    # Unequal target counts per micro-batch of 2: rows 0-1 keep 4+6 tokens, rows 6-7 all 32.
    y[0, 4:] = IGNORE_INDEX
    y[1, 6:] = IGNORE_INDEX
    y[3, 1:] = IGNORE_INDEX
    y[4, 9:] = IGNORE_INDEX
    return x, y


def _model_pair(cfg):
    torch.manual_seed(0)
    a = Transformer(cfg)
    a.init_weights(seed=3)
    return a, copy.deepcopy(a)


def test_accumulation_equals_one_big_batch_with_unequal_token_counts():
    cfg = tiny_cfg()
    x, y = _padded_batch(cfg)
    big, acc = _model_pair(cfg)
    opt_big, opt_acc = GradRecorder(big.parameters(), lr=0.1), GradRecorder(acc.parameters(), lr=0.1)
    opts = StepOptions(clip=0.0)
    r_big = train_step(big, opt_big, [(x, y)], 0.1, opts)
    r_acc = train_step(acc, opt_acc, list(zip(x.split(2), y.split(2))), 0.1, opts)

    assert r_acc.target_tokens == r_big.target_tokens == int((y != IGNORE_INDEX).sum())
    assert r_acc.loss == pytest.approx(r_big.loss, rel=1e-6)
    for g_big, g_acc in zip(opt_big.grads, opt_acc.grads):
        torch.testing.assert_close(g_acc, g_big, rtol=1e-5, atol=1e-7)
    for p_big, p_acc in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(p_acc, p_big, rtol=1e-5, atol=1e-7)

    # Averaging per micro-batch (the usual mistake) gives a different gradient on this batch.
    ref, _ = _model_pair(cfg)
    for xm, ym in zip(x.split(2), y.split(2)):
        F.cross_entropy(ref(xm).logits.flatten(0, 1), ym.flatten(), ignore_index=IGNORE_INDEX).div(4).backward()
    per_micro = [p.grad for p in ref.parameters()]
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(per_micro, opt_big.grads))


def test_clip_limits_the_applied_gradient_norm():
    cfg = tiny_cfg()
    x, y = _padded_batch(cfg)
    model, _ = _model_pair(cfg)
    opt = GradRecorder(model.parameters(), lr=0.1)
    res = train_step(model, opt, [(x, y)], 0.1, StepOptions(clip=1e-3))
    applied = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in opt.grads]))
    assert res.grad_norm > 1e-2  # the reported norm is the one before clipping
    assert float(applied) == pytest.approx(1e-3, rel=1e-3)


def test_aux_losses_reach_the_router_and_scale_with_their_coefficient():
    cfg = tiny_cfg()
    x, y = _padded_batch(cfg)

    def router_grad(lb, z):
        model, _ = _model_pair(cfg)
        opt = GradRecorder(model.parameters(), lr=0.0)
        res = train_step(model, opt, [(x, y)], 0.0, StepOptions(clip=0.0, lb_coef=lb, z_coef=z))
        names = [n for n, _ in model.named_parameters()]
        return opt.grads[names.index("layers.0.ffn.router.gate.weight")], res

    g0, res = router_grad(0.0, 0.0)
    g1, _ = router_grad(1.0, 0.0)
    g2, _ = router_grad(2.0, 0.0)
    torch.testing.assert_close(g2 - g0, 2 * (g1 - g0), rtol=1e-3, atol=1e-7)
    assert (g1 - g0).abs().max() > 1e-6
    gz, _ = router_grad(0.0, 1.0)
    assert (gz - g0).abs().max() > 1e-6
    assert res.lb_loss > 0 and res.z_loss > 0
    assert all(sum(c) == x.numel() * cfg.top_k for c in res.tokens_per_expert)


def test_bias_update_moves_load_towards_balance():
    cfg = tiny_cfg(routing_bias=True, score_func="sigmoid")
    x, y = _padded_batch(cfg)
    model, _ = _model_pair(cfg)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    res = train_step(model, opt, [(x, y)], 1e-3, StepOptions(bias_update_rate=0.01))
    routers = loop.moe_routers(model)
    assert len(routers) == len(res.tokens_per_expert) == cfg.n_layers
    for router, counts in zip(routers, res.tokens_per_expert):
        load = torch.tensor(counts, dtype=torch.float32)
        expected = 0.01 * torch.sign(load.mean() - load)
        torch.testing.assert_close(router.bias, expected)
        assert (router.bias != 0).any()


def test_bias_update_needs_a_routing_bias(tmp_path):
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=8, bias_update_rate=0.01, keep=0, eval_every=0)
    with pytest.raises(TrainConfigError, match="routing_bias"):
        train(cfg, tiny_cfg(), tmp_path, loader_factory=factory(write_token_dir(tmp_path / "d")))


def test_bf16_autocast_on_cpu_trains_with_fp32_weights():
    cfg = tiny_cfg()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (4, 16), generator=g)
    model, _ = _model_pair(cfg)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    opts = StepOptions(autocast_dtype=torch.bfloat16)
    losses = [train_step(model, opt, [(x, x.roll(-1, 1))], 3e-3, opts).loss for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).logits.dtype == torch.bfloat16


# --- schedules and optimizer groups ---


def test_cosine_and_wsd_schedules():
    cos = Schedule(peak=1.0, min_lr=0.1, warmup=10, total=110)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1)
    assert all(cos(s) >= cos(s + 1) for s in range(10, 120))
    wsd = Schedule(peak=1.0, min_lr=0.0, warmup=10, total=100, kind="wsd", decay_frac=0.2)
    assert wsd(50) == wsd(79) == 1.0
    assert wsd(90) == pytest.approx(0.5) and wsd(100) == 0.0
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule(peak=1.0, min_lr=0.0, warmup=0, total=10, kind="linear")


def test_no_weight_decay_on_norms_biases_embeddings():
    model = Transformer(tiny_cfg(qkv_bias=True, qk_norm="head"))
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert keep["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert "embed.weight" in kept and "norm.weight" in kept
    assert "layers.0.attn.q_proj.bias" in kept and "layers.0.attn.q_norm.weight" in kept
    assert {"lm_head.weight", "layers.0.attn.q_proj.weight", "layers.0.ffn.experts.w13"} <= decayed
    assert len(kept) + len(decayed) == len(names)
    tied = Transformer(tiny_cfg(tie_embeddings=True))
    decay, keep = param_groups(tied, 0.1)
    assert any(p is tied.embed.weight for p in keep["params"])
    assert not any(p is tied.embed.weight for p in decay["params"])


def test_train_config_validation():
    with pytest.raises(TrainConfigError, match="micro-batch 3 must divide"):
        TrainConfig(batch_size=8, micro_batch=3).validate()
    with pytest.raises(TrainConfigError, match="multiple of the world size 3"):
        TrainConfig(batch_size=8).validate(world_size=3)
    with pytest.raises(TrainConfigError, match="unknown training options: stepz"):
        TrainConfig.from_dict({"stepz": 3})
    assert TrainConfig.from_dict({"lr": "3e-4", "steps": 5.0}).lr == 3e-4
    with pytest.raises(TrainConfigError, match="steps"):
        TrainConfig.from_dict({"steps": "many"})
    assert TrainConfig(batch_size=32, micro_batch=4).accum_steps(world_size=2) == 4


# --- the CLI ---


def test_cli_trains_logs_evaluates_and_plots(tmp_path):
    data = write_token_dir(tmp_path / "data")
    (tmp_path / "tiny.yaml").write_text(TINY_YAML + "train:\n  lr: 3.0e-3\n  seq_len: 32\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moecoder", "train", "--config", str(tmp_path / "tiny.yaml"), "--data", str(data),
           "--out", str(out), "--steps", "30", "--batch-size", "8", "--micro-batch", "4", "--warmup", "3",
           "--eval-every", "15", "--save-every", "15", "--keep", "1", "--schedule", "wsd"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert "step 30/30" in p.stderr and "tok/s" in p.stderr and "eta" in p.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert {"loss", "lr", "grad_norm", "lb_loss", "z_loss", "tokens_per_s", "expert_util", "load_imbalance",
            "tokens_per_expert"} <= set(records[0])
    assert len(records[0]["tokens_per_expert"]) == 2 and sum(records[0]["tokens_per_expert"][0]) == 8 * 32 * 2
    assert [r["step"] for r in records if "eval_loss" in r] == [15, 30]
    assert records[-1]["eval_loss"] < records[0]["loss"] - 0.3  # it learns
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000030"]  # keep 1
    p = subprocess.run([sys.executable, "-m", "moecoder", "plot", str(out)], capture_output=True, text=True,
                       env=cli_env(), timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--micro-batch", "3"], "micro-batch 3 must divide"),
        (["--precision", "fp8"], "--precision must be one of"),
        (["--config", "nope"], "neither a preset"),
        (["--schedule", "linear"], "--schedule must be one of"),
        (["--data", "/nonexistent"], "data folder not found"),
        (["--seq-len", "4096"], "exceeds the model's max_seq_len"),
        (["--config", "vocab.yaml"], "tokenizer has 256 tokens but the model's vocab_size is 100"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    from moecoder.cli import main

    data = write_token_dir(tmp_path / "data", n_train=600, n_val=200)
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    (tmp_path / "vocab.yaml").write_text(TINY_YAML + "  vocab_size: 100\n")
    args = [str(tmp_path / a) if a.endswith(".yaml") else a for a in args]
    base = ["--config", str(tmp_path / "tiny.yaml"), "--data", str(data), "--out", str(tmp_path / "o"),
            "--batch-size", "8", "--seq-len", "8", "--steps", "2"]
    monkeypatch.setattr(sys, "argv", ["moecoder", "train", *base, *args])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
