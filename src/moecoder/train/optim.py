"""AdamW with decoupled weight decay and the usual no-decay parameter groups."""

from __future__ import annotations

import torch
from torch import nn

from ..model.attention import RMSNorm

# Modules whose parameters never get weight decay: decaying a norm's gain or an embedding
# row pulls it towards zero for no regularisation benefit.
_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, RMSNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (decayed) and norms/biases/embeddings (not decayed).

    Chosen by module type and rank, not by parameter name. A weight tied between the embedding
    and the LM head counts as an embedding.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if isinstance(module, _NO_DECAY_MODULES) or p.dim() < 2:
                no_decay.add(id(p))
    decay, keep = [], []
    for p in model.parameters():  # deduplicated, so a tied weight appears once
        if p.requires_grad:
            (keep if id(p) in no_decay else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`; the LR is overwritten every step by the loop.

    The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop (5.7x on CPU
    for the bench-mixtral weights) and is what transformers' Trainer uses by default.
    """
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
