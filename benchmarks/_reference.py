"""The benchmarks' reference model: Mixtral-style, vocab 32000, hidden 512, intermediate 1024, 4 layers,
8 heads, 2 KV heads, 8 experts, top-2 (85.7M total / 48.0M active). The same random weights are loaded
into transformers and into moecoder through an HF checkpoint folder written once per run.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moecoder.kernels.cpu import median_time  # noqa: F401  (re-exported for the benchmark scripts)


def build_reference(dtype: torch.dtype, seed: int = 0):
    """Return (hf_model, moecoder_model, ckpt_dir) sharing identical weights, in eval mode."""
    import transformers as T

    from moecoder.checkpoint import load_checkpoint

    torch.manual_seed(seed)
    hf_cfg = T.MixtralConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
    )
    hf = T.MixtralForCausalLM(hf_cfg).eval()
    ckpt_dir = Path(tempfile.mkdtemp(prefix="moecoder-bench-"))
    hf.save_pretrained(ckpt_dir)
    hf = hf.to(dtype)
    ours = load_checkpoint(ckpt_dir, dtype=dtype).model.eval()
    return hf, ours, ckpt_dir


def weight_bytes_per_token(model, dtype_bytes: int) -> int:
    """Bytes of weights a batch-1 decode step reads: every dense weight, top_k experts per MoE layer,
    one embedding row."""
    cfg = model.cfg
    total = 0
    for name, p in model.named_parameters():
        if name == "embed.weight" and not cfg.tie_embeddings:
            total += cfg.dim
        elif ".experts." in name:
            total += p.numel() // cfg.n_experts * cfg.top_k
        else:
            total += p.numel()
    return total * dtype_bytes


def copy_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 10, device: str = "cpu") -> float:
    """Measured memory bandwidth in bytes/s of a large tensor copy (read + write counted)."""
    a = torch.empty(n_bytes // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        b.copy_(a)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n_bytes / statistics.median(times)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def threads_note() -> str:
    return f"torch threads={torch.get_num_threads()} cpus={os.cpu_count()} torch={torch.__version__}"
