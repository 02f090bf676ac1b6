"""Gradient-accumulating, mixed-precision, DDP-aware training loop (reference solution)."""

import contextlib
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel


def _windows(batches, accum_steps):
    """Group micro-batches into windows of `accum_steps` (the last one may be shorter)."""
    it = iter(batches)
    while True:
        window = list(itertools.islice(it, accum_steps))
        if not window:
            return
        yield window


def train(model, batches, optimizer, scheduler, *, accum_steps, use_amp=True, max_grad_norm=None, device="cpu"):
    device = torch.device(device)
    model.to(device)
    ddp = dist.is_available() and dist.is_initialized()
    net = DistributedDataParallel(model) if ddp else model
    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype is torch.float16)
    losses = []
    net.train()
    for window in _windows(batches, accum_steps):
        total = 0.0
        for i, (inputs, targets) in enumerate(window):
            inputs, targets = inputs.to(device), targets.to(device)
            last = i == len(window) - 1
            # Gradients are all-reduced only on the window's last backward: one sync per optimizer step.
            sync = contextlib.nullcontext() if (last or not ddp) else net.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    logits = net(inputs)
                    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
                # Divide by the window's real size so a short trailing window is still a mean.
                scaler.scale(loss / len(window)).backward()
            total += loss.item()
        if max_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()  # once per optimizer step, never per micro-batch
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / len(window))
    return losses
