"""Training metrics: JSONL and TensorBoard events, and what a resume does to both."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moecoder.train.metrics import MetricsLogger, read_metrics, tensorboard_scalars


def _records(steps):
    return [{"step": s, "loss": 10.0 - s, "lr": 1e-3 * s, "tokens_per_expert": [[1, 2]], "expert_util": 1.0,
             **({"eval_loss": 9.5 - s, "eval_ppl": 2.0 ** s} if s % 2 == 0 else {})} for s in steps]


def _scalars(run_dir):
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_mirror_the_jsonl(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, total_steps=4)
    for r in _records([1, 2, 3, 4]):
        log.log(r)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    scalars = _scalars(tmp_path)
    assert set(scalars) == {"train/loss", "train/lr", "train/expert_util", "eval/loss", "eval/ppl"}
    assert scalars["train/loss"] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    assert [s for s, _ in scalars["eval/loss"]] == [2, 4]
    assert tensorboard_scalars({"step": 1, "flag": True, "name": "x", "loss": 1}) == {"train/loss": 1.0}


def test_resume_drops_what_a_killed_run_logged_past_the_checkpoint(tmp_path):
    first = MetricsLogger(tmp_path, enabled=True, total_steps=6)
    for r in _records([1, 2, 3, 4, 5]):  # killed after logging step 5; the checkpoint is at step 3
        first.log(r)
    first.close()
    resumed = MetricsLogger(tmp_path, enabled=True, total_steps=6, resume_step=3)
    for r in _records([4, 5, 6]):
        resumed.log({**r, "loss": r["loss"] + 100})  # the resumed run's values differ
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 106.0), (5, 105.0), (6, 104.0)]
    assert _scalars(tmp_path)["train/loss"] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 106.0), (5, 105.0), (6, 104.0)]


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", enabled=False, total_steps=2)
    log.log({"step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()
