"""Shared by the parity tests: how a tiny random transformers model is made to look trained."""

import torch

from moecoder.model import KVCache


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


def greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Plain greedy decoding of a moecoder model through the KV cache: prefill, then one token at a time."""
    cache = KVCache(model.cfg, prompt.shape[0], prompt.shape[1] + n, next(model.parameters()).dtype)
    out = []
    with torch.no_grad():
        logits = model(prompt, cache=cache).logits[:, -1]
        for _ in range(n):
            tok = logits.argmax(-1, keepdim=True)
            out.append(tok)
            logits = model(tok, cache=cache).logits[:, -1]
    return torch.cat(out, 1)
