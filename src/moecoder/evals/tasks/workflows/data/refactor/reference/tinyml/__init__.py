"""The experiment as a package: config, data, model, train, evaluate."""

from .config import CONFIG, Config, reset_config, update_config
from .evaluate import main, run_experiment

__all__ = ["CONFIG", "Config", "main", "reset_config", "run_experiment", "update_config"]
