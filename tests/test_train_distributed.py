"""torchrun with 2 CPU processes (gloo) reproduces the single-process loss trajectory, DDP and FSDP2.

DDP trains the debug preset; FSDP2 trains a MiniMax-shaped debug model with aux-loss-free bias updates
(expert loads all-reduced across ranks), stopping after step 3 and resuming.
"""

import io
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import cli_env, factory, write_token_dir

from moecoder.cli import main
from moecoder.config import get_preset
from moecoder.train import state as S
from moecoder.train.loop import TrainConfig, train

STEPS = 5


# A MiniMax-M2-style debug model with the selection-only routing bias (shared with test_train_fp16.py).
BIAS_MODEL_YAML = """\
model:
  preset: debug
  model_type: minimax_m2
  score_func: sigmoid
  routing_bias: true
  norm_topk: true
  qk_norm: full
  ffn_dim: 64
"""
BIAS_YAML = BIAS_MODEL_YAML + """\
train:
  bias_update_rate: 1.0e-3
"""


def _args(config, data, out, micro):
    # micro-batch 1 everywhere: the aux losses are per micro-batch means, so with one sequence per
    # micro-batch both runs average the same per-sequence terms and must agree.
    return ["train", "--config", str(config), "--data", str(data), "--out", str(out), "--steps", str(STEPS),
            "--batch-size", "4", "--micro-batch", str(micro), "--seq-len", "16", "--warmup", "2", "--lr", "3e-3",
            "--eval-every", str(STEPS), "--save-every", str(STEPS), "--keep", "1", "--device", "cpu"]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out):
    (step, folder), = S.list_checkpoints(out)
    assert step == STEPS and S.verify_checkpoint(folder) == STEPS
    return load_file(folder / S.MODEL_DIR / "model.safetensors")


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """The one-process reference per model config, run in-process (no interpreter start-up)."""
    tmp = tmp_path_factory.mktemp("single")
    data = write_token_dir(tmp / "data", n_train=3000, n_val=600)
    (tmp / "bias.yaml").write_text(BIAS_YAML)
    runs = {}

    def get(config):
        if config not in runs:
            out = tmp / f"run-{len(runs)}"
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(sys, "argv", ["moecoder", *_args(config, data, out, 1)])
                with pytest.raises(SystemExit) as exc:
                    main()
                assert exc.value.code in (0, None)
            runs[config] = (data, _records(out), _weights(out))
        return runs[config]

    return tmp, get


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(single_runs, tmp_path, parallel):
    tmp, get = single_runs
    config = "debug" if parallel == "ddp" else tmp / "bias.yaml"
    data, ref, ref_weights = get(config)
    out = tmp_path / parallel
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moecoder",
           *_args(config, data, out, 1), "--parallel", parallel]
    if parallel == "fsdp":
        # Stop after step 3 and resume: loads the full optimizer state into the sharded optimizer.
        p = subprocess.run([*cmd, "--stop-after", "3"], capture_output=True, text=True, env=cli_env(), timeout=120, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    if parallel == "fsdp":
        assert "resumed from" in p.stderr and "step_00000003 at step 3" in p.stderr
    got = _records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        assert b["target_tokens"] == a["target_tokens"]  # all-reduced: the global count
        for key in ("loss", "lb_loss", "z_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), (parallel, b["step"], key)
        assert b["lr"] == a["lr"]
    assert got[-1]["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], rel=2e-5)
    assert got[-1]["loss"] < got[0]["loss"]
    # The expert counts are all-reduced too: same weights at step 1, so the same global routing.
    assert got[0]["tokens_per_expert"] == ref[0]["tokens_per_expert"]
    assert all(sum(c) == 4 * 16 * 2 for c in got[0]["tokens_per_expert"])
    # Rank 0 wrote one full (unsharded) checkpoint with the single process's weights. Adam divides by
    # sqrt(v), so an element with a near-zero gradient can move by up to ~lr on float noise: atol 1e-4
    # (lr 3e-3, weights ~0.02). A wrong gradient scale shows in grad_norm above, which Adam would hide.
    weights = _weights(out)
    if parallel == "fsdp":
        biases = [k for k in weights if k.endswith("e_score_correction_bias")]
        assert biases and all(weights[k].abs().max() > 0 for k in biases)  # the bias updates ran and were saved
    assert weights.keys() == ref_weights.keys()
    for name, w in weights.items():
        torch.testing.assert_close(w, ref_weights[name], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"{parallel} {name}: {m}")
    if parallel == "ddp":
        # A 2-rank checkpoint resumes in one process (same global batch, same data position).
        log = io.StringIO()
        cfg = TrainConfig(steps=STEPS + 1, batch_size=4, micro_batch=1, seq_len=16, warmup=2, lr=3e-3,
                          eval_every=0, keep=1, device="cpu")
        res = train(cfg, get_preset("debug"), out, loader_factory=factory(data), stream=log)
        assert f"step_{STEPS:08d} at step {STEPS}" in log.getvalue() and "written by 2 ranks" in log.getvalue()
        assert res["step"] == STEPS + 1 and abs(res["loss"] - got[-1]["loss"]) < 0.5
