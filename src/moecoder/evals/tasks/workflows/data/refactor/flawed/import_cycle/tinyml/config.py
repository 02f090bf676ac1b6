"""Experiment configuration: one shared, mutable Config object."""

import dataclasses
import sys
from dataclasses import dataclass


@dataclass
class Config:
    seed: int = 7
    # data
    n_samples: int = 240
    noise: float = 0.2
    test_fraction: float = 0.25
    poly_features: bool = True
    # model
    hidden_size: int = 8
    init_scale: float = 1.0
    # training
    learning_rate: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 25
    batch_size: int = 16
    lr_decay: float = 0.97
    grad_clip: float = 5.0
    # evaluation
    threshold: float = 0.5
    n_calibration_bins: int = 5
    # logging
    log_every: int = 5
    verbose: bool = False


CONFIG = Config()


def update_config(**changes):
    """Apply `changes` to the shared configuration and return it. Unknown names are an error."""
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    # Mutate in place: other modules hold a reference to this very object (`from .config import CONFIG`),
    # so rebinding the name here would leave them reading a stale copy.
    for name, value in changes.items():
        setattr(CONFIG, name, value)
    return CONFIG


def reset_config():
    """Back to the defaults."""
    defaults = Config()
    for f in dataclasses.fields(Config):
        setattr(CONFIG, f.name, getattr(defaults, f.name))
    return CONFIG


def parse_override(text):
    """'name=value' -> (name, typed value), typed after the field's default."""
    if "=" not in text:
        raise ValueError(f"expected name=value, got {text!r}")
    name, raw = text.split("=", 1)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if name not in fields:
        raise ValueError(f"unknown config field: {name}")
    default = fields[name].default
    if isinstance(default, bool):
        value = raw.lower() in ("1", "true", "yes", "on")
    elif isinstance(default, int):
        value = int(raw)
    elif isinstance(default, float):
        value = float(raw)
    else:
        value = raw
    return name, value


def log(message):
    if CONFIG.verbose:
        print(message, file=sys.stderr)
