"""Shared by the parity tests: how a tiny random transformers model is made to look trained."""

import torch


def randomise(model):
    """Norm weights around 1, other weights large enough that greedy tokens and expert choices are
    not near-ties, and the routing correction biases (zero at init) random. Returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.2)
    return model
