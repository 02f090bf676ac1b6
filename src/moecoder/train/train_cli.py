"""`moecoder train` and `moecoder plot`.

`--config` is a preset name (`debug`, `bench-mixtral`, ...) or a YAML file:

    model:            # a preset plus field overrides (any ModelConfig field)
      preset: debug
      n_layers: 4
    train:            # any TrainConfig field; command-line options override these
      steps: 2000
      lr: 1.0e-3
      schedule: wsd

Launch with torchrun for data parallel: `torchrun --nproc_per_node=N -m moecoder train ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..errors import UserError


def _load_config(spec: str) -> tuple[Any, dict[str, Any]]:
    """(ModelConfig, training options from the YAML) for a preset name or a YAML path."""
    from ..config import PRESETS, ConfigError, ModelConfig, get_preset

    path = Path(spec)
    if spec in PRESETS and not path.is_file():
        return get_preset(spec), {}
    if not path.is_file():
        raise UserError(f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    try:
        import yaml
    except ImportError:
        raise UserError("YAML configs need PyYAML: pip install 'moecoder[train]'") from None
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or set(doc) - {"model", "train"}:
        raise UserError(f"{path}: expected a mapping with keys 'model' and/or 'train'")
    model = dict(doc.get("model") or {})
    preset = model.pop("preset", None)
    try:
        if preset is not None:
            cfg = get_preset(str(preset)).replace(**_check_fields(ModelConfig, model, path))
        else:
            cfg = ModelConfig.from_dict(model)
    except ConfigError as e:
        raise UserError(f"{path}: {e}") from None
    train = doc.get("train") or {}
    if not isinstance(train, dict):
        raise UserError(f"{path}: 'train' must be a mapping")
    return cfg, train


def _check_fields(cls, d: dict, path) -> dict:
    import dataclasses

    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise UserError(f"{path}: unknown model fields: {', '.join(unknown)}")
    return d


def train_cmd(
    config: str = typer.Option(..., "--config", help="Preset name or YAML file (model + train sections)."),
    data: Path = typer.Option(..., "--data", help="Tokenised data folder (index.json + shards)."),
    out: Path = typer.Option(..., "--out", help="Run folder: metrics.jsonl, checkpoints/, tb/."),
    steps: int | None = typer.Option(None, help="Optimizer steps."),
    batch_size: int | None = typer.Option(None, help="Global batch in sequences (all ranks and micro-batches)."),
    micro_batch: int | None = typer.Option(None, help="Sequences per forward on one rank (accumulation)."),
    seq_len: int | None = typer.Option(None, help="Tokens per sequence."),
    lr: float | None = typer.Option(None, help="Peak learning rate."),
    min_lr: float | None = typer.Option(None, help="Final learning rate."),
    warmup: int | None = typer.Option(None, help="Linear warmup steps."),
    schedule: str | None = typer.Option(None, help="cosine | wsd."),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay (not on norms, biases, embeddings)."),
    clip: float | None = typer.Option(None, help="Max global grad norm (0: off)."),
    precision: str | None = typer.Option(
        None, help="fp32 | bf16 (autocast; recommended for mixed precision) | fp16 (autocast + GradScaler; "
                   "on CPU for testing the loss-scaling path or comparing with a GPU run, not for speed)."),
    lb_coef: float | None = typer.Option(None, help="Load-balancing loss coefficient."),
    z_coef: float | None = typer.Option(None, help="Router z-loss coefficient."),
    bias_update_rate: float | None = typer.Option(None, help="Aux-loss-free router bias step (needs routing_bias)."),
    eval_every: int | None = typer.Option(None, help="Eval on the val split every N steps (0: never)."),
    save_every: int | None = typer.Option(None, help="Checkpoint every N steps (always at the end)."),
    keep: int | None = typer.Option(None, help="Checkpoints kept (0: none written)."),
    seed: int | None = typer.Option(None, help="Seed of the init and the data order."),
    stop_after: int | None = typer.Option(None, help="Stop, saved, after this step (schedule spans --steps)."),
    log_every: int | None = typer.Option(None, help="Progress line every N steps."),
    parallel: str | None = typer.Option(None, help="ddp | fsdp (FSDP2), under torchrun."),
    device: str | None = typer.Option(None, help="cpu | cuda (default: cuda when available)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the newest good checkpoint."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Tokenizer folder copied into each checkpoint."),
) -> None:
    """Train a model on a tokenised data folder; resumable, DDP/FSDP2 under torchrun."""
    from ..checkpoint import CheckpointError
    from ..train.data import DataError
    from . import distributed as D
    from .loop import TrainConfig, TrainConfigError, token_windows_factory, train

    model_cfg, from_yaml = _load_config(config)
    options = {
        "steps": steps, "batch_size": batch_size, "micro_batch": micro_batch, "seq_len": seq_len, "lr": lr,
        "min_lr": min_lr, "warmup": warmup, "schedule": schedule, "weight_decay": weight_decay, "clip": clip,
        "precision": precision, "lb_coef": lb_coef, "z_coef": z_coef, "bias_update_rate": bias_update_rate,
        "eval_every": eval_every, "save_every": save_every, "keep": keep, "seed": seed, "stop_after": stop_after,
        "log_every": log_every, "parallel": parallel, "device": device,
    }
    given = {k: v for k, v in options.items() if v is not None}
    try:
        cfg = TrainConfig.from_dict({**from_yaml, **given})
        if cfg.seq_len > model_cfg.max_seq_len:
            raise TrainConfigError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
        if not data.is_dir():
            raise DataError(f"data folder not found: {data}")
        train(cfg, model_cfg, out, loader_factory=token_windows_factory(data), resume=resume, tokenizer_dir=tokenizer)
    except (TrainConfigError, DataError, CheckpointError, FloatingPointError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    finally:
        D.shutdown()


def plot_cmd(run_dir: Path = typer.Argument(..., help="A training run folder (with metrics.jsonl).")) -> None:
    """Write RUN_DIR/loss.png: train and eval loss with the learning rate."""
    from .plot import plot_run

    try:
        path = plot_run(run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    print(path)
