"""Model math: attention, MoE and the decoder."""

from .attention import KVCache, RMSNorm
from .moe import MoE, RouterStats
from .transformer import ForwardOutput, Transformer

__all__ = ["ForwardOutput", "KVCache", "MoE", "RMSNorm", "RouterStats", "Transformer"]
