"""Checkpoints: exact resume after SIGKILL, manifest checks, fallback to the previous good checkpoint."""

import io
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import cli_env, factory, tiny_cfg, write_token_dir

from moecoder.train import state as S
from moecoder.train.loop import TrainConfig, train

STEPS = 24


def _cmd(data, out):
    return [sys.executable, "-m", "moecoder", "train", "--config", "debug", "--data", str(data), "--out", str(out),
            "--steps", str(STEPS), "--batch-size", "4", "--micro-batch", "2", "--seq-len", "16", "--warmup", "3",
            "--save-every", "1", "--keep", "3", "--eval-every", "8", "--seed", "7", "--device", "cpu"]


def _final_weights(out):
    folder = S.checkpoint_root(out) / S.step_dir_name(STEPS) / S.MODEL_DIR
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tmp_path):
    data = write_token_dir(tmp_path / "data")
    env = cli_env()
    ref = subprocess.run(_cmd(data, tmp_path / "ref"), capture_output=True, text=True, env=env, timeout=180, check=False)
    assert ref.returncode == 0, ref.stderr

    kill_after = random.randrange(2, STEPS - 4)
    print(f"killing after step {kill_after}")  # shown on failure, to reproduce
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (S.checkpoint_root(out) / S.step_dir_name(STEPS)).exists()

    resumed = subprocess.run(_cmd(data, out), capture_output=True, text=True, env=env, timeout=180, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    want, got = _final_weights(tmp_path / "ref"), _final_weights(out)
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after resume (killed after step {kill_after})"
    # The resumed run's log has every step exactly once, with the reference's losses.
    ref_log = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    got_log = (out / "metrics.jsonl").read_text().splitlines()
    def losses(lines):
        return [(json.loads(x)["step"], json.loads(x)["loss"]) for x in lines]

    assert losses(got_log) == losses(ref_log)


def _short_run(tmp_path, steps, stream=None):
    cfg = TrainConfig(steps=steps, batch_size=2, seq_len=8, warmup=1, save_every=1, keep=3, eval_every=0)
    return train(cfg, tiny_cfg(), tmp_path / "run", loader_factory=factory(tmp_path / "data"),
                 stream=stream or io.StringIO())


def test_corrupt_or_partial_checkpoint_is_named_and_resume_falls_back(tmp_path):
    write_token_dir(tmp_path / "data", n_train=800, n_val=200)
    _short_run(tmp_path, 4)
    out = tmp_path / "run"
    assert [s for s, _ in S.list_checkpoints(out)] == [2, 3, 4]  # keep 3
    for _, folder in S.list_checkpoints(out):
        S.verify_checkpoint(folder)

    newest = S.checkpoint_root(out) / S.step_dir_name(4)
    state_file = newest / S.TRAIN_STATE
    blob = bytearray(state_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    state_file.write_bytes(bytes(blob))
    with pytest.raises(S.CheckpointError, match=r"step_00000004 is corrupt: sha256 of train_state.pt"):
        S.verify_checkpoint(newest)

    partial = S.checkpoint_root(out) / S.step_dir_name(3)
    (partial / S.MANIFEST).unlink()  # as if killed before the manifest was written
    with pytest.raises(S.CheckpointError, match=r"step_00000003 has no manifest.json"):
        S.verify_checkpoint(partial)

    warnings = []
    assert S.latest_good_checkpoint(out, warn=warnings.append) == S.checkpoint_root(out) / S.step_dir_name(2)
    assert "step_00000004" in warnings[0] and "step_00000003" in warnings[1]

    log = io.StringIO()
    result = _short_run(tmp_path, 5, stream=log)
    assert "falling back" in log.getvalue()
    assert f"resumed from {S.checkpoint_root(out) / S.step_dir_name(2)} at step 2" in log.getvalue()
    assert result["step"] == 5
    assert [s for s, _ in S.list_checkpoints(out)] == [3, 4, 5]  # re-saved 3 and 4 replace the bad ones
    for _, folder in S.list_checkpoints(out):
        S.verify_checkpoint(folder)


def test_missing_model_file_is_detected(tmp_path):
    write_token_dir(tmp_path / "data", n_train=800, n_val=200)
    _short_run(tmp_path, 1)
    folder = S.checkpoint_root(tmp_path / "run") / S.step_dir_name(1)
    next((folder / S.MODEL_DIR).glob("*.safetensors")).unlink()
    with pytest.raises(S.CheckpointError, match=r"is missing model/model.safetensors"):
        S.verify_checkpoint(folder)
    assert S.latest_good_checkpoint(tmp_path / "run", warn=lambda m: None) is None


def test_resume_refuses_a_different_model_config(tmp_path):
    from moecoder.train.loop import TrainConfigError

    write_token_dir(tmp_path / "data", n_train=800, n_val=200)
    _short_run(tmp_path, 1)
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=8, keep=1, eval_every=0)
    with pytest.raises(TrainConfigError, match="different model config"):
        train(cfg, tiny_cfg(n_layers=3), tmp_path / "run", loader_factory=factory(tmp_path / "data"),
              stream=io.StringIO())
    # --no-resume refuses to mix a fresh run with old checkpoints; in a clean folder it starts over.
    with pytest.raises(TrainConfigError, match="already holds checkpoints"):
        train(cfg, tiny_cfg(n_layers=3), tmp_path / "run", loader_factory=factory(tmp_path / "data"),
              resume=False, stream=io.StringIO())
    res = train(cfg, tiny_cfg(n_layers=3), tmp_path / "run2", loader_factory=factory(tmp_path / "data"),
                resume=False, stream=io.StringIO())
    assert res["step"] == 2


def test_router_bias_updates_survive_resume_exactly(tmp_path):
    """Aux-loss-free bias lives in the HF folder (e_score_correction_bias) and must round-trip exactly."""
    write_token_dir(tmp_path / "data", n_train=800, n_val=200)
    model_cfg = tiny_cfg(model_type="minimax_m2", score_func="sigmoid", routing_bias=True, qk_norm="full")

    def run(out, log=None, **kw):
        cfg = TrainConfig(steps=4, batch_size=2, seq_len=8, warmup=1, save_every=1, keep=2, eval_every=0,
                          bias_update_rate=1e-2, **kw)
        return train(cfg, model_cfg, tmp_path / out, loader_factory=factory(tmp_path / "data"),
                     stream=log or io.StringIO())["model"].state_dict()

    want = run("straight")
    run("split", stop_after=2)
    log = io.StringIO()
    got = run("split", log)
    assert "step_00000002 at step 2" in log.getvalue()  # resumed, not restarted
    assert any(k.endswith("router.bias") and v.abs().max() > 0 for k, v in want.items())
    for k in want:
        assert torch.equal(want[k], got[k]), k
