"""Hidden checks' measuring side for the training-loop workflow. Runs next to the candidate's train_loop.py.

Reads its configuration (JSON) on stdin, drives `train_loop.train` through three scenarios and prints
one report line of measurements. It decides nothing: the parent applies the check rules.
"""

import copy
import json
import math
import os
import sys
import tempfile
import traceback

CFG = json.loads(sys.stdin.read())  # read before any candidate code is imported
MARKER = CFG["report_marker"]

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.nn.parallel
import torch.nn.parallel.distributed
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

torch.set_num_threads(1)
V, T, D, B = 32, 16, 32, 4
STATS = {"ddp_wraps": 0, "synced_forwards": set()}


class TinyLM(nn.Module):
    """One pre-norm causal attention block; records whether autocast was on in each training forward."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.02)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.head = nn.Linear(D, V)
        self.record = True
        self.forwards = 0
        self.autocast_flags = []

    def forward(self, x):
        if self.record:
            self.forwards += 1
            self.autocast_flags.append(torch.is_autocast_enabled("cpu"))
            STATS["current_forward"] = (id(self), self.forwards)
        h = self.tok(x) + self.pos[: x.size(1)]
        q, k, v = self.qkv(self.ln1(h)).view(x.size(0), x.size(1), 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(x.size(0), x.size(1), D))
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln_f(h))


def _counting_hook(state, bucket):
    STATS["synced_forwards"].add(STATS.get("current_forward"))
    return allreduce_hook(None, bucket)


class CountingDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that counts wraps and the backward passes whose gradients were all-reduced."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        STATS["ddp_wraps"] += 1
        self.register_comm_hook(None, _counting_hook)


torch.nn.parallel.DistributedDataParallel = CountingDDP
torch.nn.parallel.distributed.DistributedDataParallel = CountingDDP


def micro_batches(n, seed):
    """Learnable micro-batches: each sequence counts up by a per-sequence stride modulo V."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        start = torch.randint(0, V, (B, 1), generator=g)
        stride = torch.randint(1, 3, (B, 1), generator=g)
        seq = (start + stride * torch.arange(T + 1)) % V
        yield seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def mean_loss(model, batches):
    model.record = False
    losses = [F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)) for x, y in batches]
    model.record = True
    return torch.stack(losses).mean()


def instrument(model, optimizer, scheduler):
    """Wrap optimizer.step / scheduler.step to record what happens at each optimizer step."""
    log = {"lrs": [], "grads": [], "params": [], "sched_calls": 0}
    inner_step, inner_sched = optimizer.step, scheduler.step

    def step(*a, **k):
        log["lrs"].append(optimizer.param_groups[0]["lr"])
        log["grads"].append([None if p.grad is None else p.grad.detach().clone() for p in model.parameters()])
        log["params"].append([p.detach().clone() for p in model.parameters()])
        return inner_step(*a, **k)

    def sched_step(*a, **k):
        log["sched_calls"] += 1
        return inner_sched(*a, **k)

    optimizer.step, scheduler.step = step, sched_step
    return log


def grad_rel_error(model_template, params_before, window, recorded):
    """Max relative difference between a recorded gradient and the big-batch gradient at the same weights."""
    ref = copy.deepcopy(model_template)
    with torch.no_grad():
        for p, v in zip(ref.parameters(), params_before):
            p.copy_(v)
    ref.zero_grad()
    mean_loss(ref, window).backward()
    worst = 0.0
    for p, g in zip(ref.parameters(), recorded):
        if g is None:
            return math.inf
        worst = max(worst, ((g - p.grad).norm() / (p.grad.norm() + 1e-12)).item())
    return worst


def scenario_main(train, p):
    torch.manual_seed(0)
    model = TinyLM()
    held_out = list(micro_batches(4, seed=999))
    before = mean_loss(model, held_out).item()
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / p["warmup"]) * max(0.1, 1.0 - k / p["decay_steps"]))
    log = instrument(model, opt, sched)
    synced_before = len(STATS["synced_forwards"])
    train(model, micro_batches(p["n_micro"], seed=1), opt, sched, accum_steps=p["accum"], use_amp=True,
          max_grad_norm=1.0, device="cpu")
    after = mean_loss(model, held_out).item()
    return {
        "loss_before": before, "loss_after": after, "optimizer_steps": len(log["lrs"]), "lrs": log["lrs"],
        "sched_calls": log["sched_calls"], "forwards": model.forwards,
        "autocast_forwards": sum(model.autocast_flags), "ddp_wraps": STATS["ddp_wraps"],
        "synced_backwards": len(STATS["synced_forwards"]) - synced_before,
    }


def scenario_grads(train, n_micro, accum):
    """SGD, fp32, no clipping: compare each optimizer step's gradient with the big-batch gradient."""
    torch.manual_seed(1)
    model = TinyLM()
    template = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    log = instrument(model, opt, sched)
    data = list(micro_batches(n_micro, seed=2))
    train(model, iter(data), opt, sched, accum_steps=accum, use_amp=False, max_grad_norm=None, device="cpu")
    windows = [data[i:i + accum] for i in range(0, n_micro, accum)]
    errors = [grad_rel_error(template, log["params"][i], windows[i], log["grads"][i])
              for i in range(min(len(windows), len(log["grads"])))]
    return {"optimizer_steps": len(log["grads"]), "grad_rel_errors": errors}


def init_distributed(tmp):
    """World size 1 on gloo; inside a sandbox without sockets, torch's in-process "threaded" backend
    (same DDP code path, collectives done in memory; for one rank the result is identical)."""
    try:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1)
        return "gloo"
    except RuntimeError:
        import torch.testing._internal.distributed.multi_threaded_pg as threaded_pg

        threaded_pg._install_threaded_pg()
        dist.init_process_group("threaded", store=dist.HashStore(), rank=0, world_size=1)
        return "threaded"


def main():
    p = CFG["params"]
    with tempfile.TemporaryDirectory() as tmp:
        report = {"backend": init_distributed(tmp)}
        try:
            from train_loop import train
        except BaseException:  # noqa: BLE001 (the candidate's import may raise anything, SystemExit included)
            report["import_error"] = traceback.format_exc(limit=3)[-400:]
            print(MARKER, json.dumps(report), flush=True)
            return
        for name, run in [("main", lambda: scenario_main(train, p)),
                          ("full_window", lambda: scenario_grads(train, p["accum"], p["accum"])),
                          ("partial_window", lambda: scenario_grads(train, p["partial_n_micro"], p["accum"]))]:
            try:
                report[name] = run()
            except BaseException:  # noqa: BLE001 (candidate code may raise anything)
                report[name] = {"error": traceback.format_exc(limit=3)[-400:]}
        dist.destroy_process_group()
    print(MARKER, json.dumps(report), flush=True)


main()
