"""Hugging Face checkpoint folders: load into, and save from, moecoder models."""

from .config_hf import from_hf_config, to_hf_config
from .formats import SUPPORTED, CheckpointError
from .hf import LoadedCheckpoint, load_checkpoint, read_config, save_checkpoint

__all__ = [
    "SUPPORTED",
    "CheckpointError",
    "LoadedCheckpoint",
    "from_hf_config",
    "load_checkpoint",
    "read_config",
    "save_checkpoint",
    "to_hf_config",
]
