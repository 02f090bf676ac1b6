"""moecoder: Mixture-of-Experts code models, from checkpoint to served and evaluated model."""

__version__ = "0.1.0"
