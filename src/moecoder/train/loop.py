"""The training loop: set LR -> micro-steps -> clip -> optimizer step -> log -> maybe eval/checkpoint.

Shape legend: B sequences, T tokens, V vocabulary, L MoE layers, E experts.

Two invariants the tests pin down:
- The LR is `schedule(optimizer_step)`, set once per optimizer step, never per micro-batch. An
  optimizer step is one iteration of the loop (one global batch, one metrics record, the step number
  of checkpoints), whether or not fp16's GradScaler skips its update for inf/NaN gradients: a skipped
  step uses up its LR like any other (torch's convention: the scheduler steps on regardless), so the
  LR never depends on how many steps were skipped, and a resumed run gets the same LR from the same
  step number. Only AdamW's own step count (its bias correction) counts the updates actually applied.
- The cross-entropy of a step is the sum over every target token of the *global* batch (all
  micro-batches, all ranks) divided by the number of those tokens, so accumulation k on n ranks
  gives the gradient of one big batch even when micro-batches hold different token counts.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..model import Transformer
from ..model.loss import IGNORE_INDEX
from . import distributed as D
from .metrics import MetricsLogger
from .optim import build_optimizer, clip_and_step, scaled_clip_and_step, set_lr
from .schedule import SCHEDULES, Schedule

PRECISIONS = ("fp32", "bf16", "fp16")


class TrainConfigError(ValueError):
    """Inconsistent training options; the message is one line for the user."""


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # global batch, in sequences (all ranks, all micro-batches)
    micro_batch: int | None = None  # sequences per forward on one rank; None: the whole per-rank batch
    seq_len: int = 256
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 100
    schedule: str = "cosine"  # "cosine" | "wsd"
    decay_frac: float = 0.2  # wsd: fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: str = "fp32"  # "fp32" | "bf16" (autocast) | "fp16" (autocast + GradScaler)
    lb_coef: float = 0.01  # load-balancing loss coefficient
    z_coef: float = 0.001  # router z-loss coefficient
    bias_update_rate: float = 0.0  # aux-loss-free balancing: router bias step per optimizer step (0: off)
    eval_every: int = 100  # 0: never
    eval_batches: int = 4  # per-rank batches of the val split per eval
    save_every: int = 100  # 0: only at the end
    keep: int = 3  # checkpoints kept; 0: write none
    seed: int = 0
    stop_after: int | None = None  # end (with a checkpoint) after this step; the schedule still spans `steps`
    log_every: int = 1  # progress line every N steps (metrics.jsonl gets every step)
    parallel: str = "ddp"  # "ddp" | "fsdp" (FSDP2) when launched with torchrun
    device: str | None = None  # None: CUDA when available

    def validate(self, world_size: int = 1) -> None:
        if self.steps <= 0:
            raise TrainConfigError(f"--steps must be positive, got {self.steps}")
        if self.seq_len <= 0:
            raise TrainConfigError(f"--seq-len must be positive, got {self.seq_len}")
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.parallel not in D.PARALLEL_MODES:
            raise TrainConfigError(f"parallel must be one of {', '.join(D.PARALLEL_MODES)}, got {self.parallel!r}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise TrainConfigError(f"need 0 < --lr and 0 <= --min-lr <= --lr, got lr={self.lr} min_lr={self.min_lr}")
        if min(self.warmup, self.clip, self.weight_decay, self.bias_update_rate, self.keep, self.save_every,
               self.eval_every) < 0:
            raise TrainConfigError("--warmup, --clip, --weight-decay, --bias-update-rate, --keep, --save-every "
                                   "and --eval-every must be >= 0")
        if self.batch_size <= 0 or self.batch_size % world_size:
            raise TrainConfigError(f"--batch-size {self.batch_size} must be a positive multiple of the "
                                   f"world size {world_size}")
        local = self.batch_size // world_size
        micro = self.micro_batch or local
        if micro <= 0 or local % micro:
            raise TrainConfigError(f"--micro-batch {micro} must divide the per-rank batch {local} "
                                   f"(--batch-size {self.batch_size} / {world_size} ranks)")

    def accum_steps(self, world_size: int) -> int:
        local = self.batch_size // world_size
        return local // (self.micro_batch or local)

    def schedule_fn(self) -> Schedule:
        return Schedule(peak=self.lr, min_lr=self.min_lr, warmup=self.warmup, total=self.steps,
                        kind=self.schedule, decay_frac=self.decay_frac)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(defaults))
        if unknown:
            raise TrainConfigError(f"unknown training options: {', '.join(unknown)}")
        out = {}
        for k, v in d.items():
            kind = type(defaults[k]) if defaults[k] is not None else (int if k in _OPTIONAL_INTS else str)
            try:
                # YAML reads 3e-4 as a string; ints are fine where floats are expected.
                out[k] = v if v is None else (kind(v) if kind is not int else _as_int(v))
            except (TypeError, ValueError):
                raise TrainConfigError(f"training option {k}={v!r} is not a valid {kind.__name__}") from None
        return cls(**out)


_OPTIONAL_INTS = ("micro_batch", "stop_after")


def _as_int(v) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(v)
    return int(v)


@dataclass
class StepOptions:
    """What `train_step` needs besides the model, optimizer and data."""

    clip: float = 1.0
    lb_coef: float = 0.0
    z_coef: float = 0.0
    bias_update_rate: float = 0.0
    autocast_dtype: torch.dtype | None = None
    scaler: Any = None  # torch.amp.GradScaler for fp16
    world_size: int = 1


@dataclass
class StepResult:
    loss: float  # mean cross-entropy per target token over the global batch
    lb_loss: float  # mean over micro-batches and ranks (sum over layers)
    z_loss: float
    grad_norm: float  # of the true (unscaled) gradients, before clipping; inf/NaN on a skipped step
    target_tokens: int  # global
    tokens_per_expert: list[list[int]]  # [L][E], global
    loss_scale: float | None = None  # fp16: the GradScaler scale this step's backward used
    skipped: bool = False  # fp16: inf/NaN gradients, no update (parameters, optimizer, router biases unchanged)


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The router of every MoE layer, in layer order (the order of ForwardOutput.router)."""
    return [block.ffn.router for block in D.unwrap(model).layers if block.is_moe]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    opts: StepOptions,
) -> StepResult:
    """One optimizer step over this rank's micro-batches [(x_BT, y_BT), ...]; y uses IGNORE_INDEX for padding.

    With `opts.scaler` (fp16) the backward runs on the loss times the GradScaler's scale; the clip
    applies to the true gradients and the update (and the router bias update) is skipped when a
    gradient is inf/NaN (`StepResult.skipped`).
    """
    set_lr(optimizer, lr)
    scaler = opts.scaler
    # The loss scale goes into the cross-entropy's own scale, so the fused LM head forms its fp16
    # gradients at the scaled magnitude, as the plain formulation's backward does (model/loss.py);
    # dividing its loss by the scale again (a power of two: exact) hands it a gradient of exactly 1
    # from scaler.scale(loss).backward(), and leaves every other gradient as scaler.scale makes it.
    loss_scale = scaler.get_scale() if scaler is not None else 1.0
    device = micro_batches[0][0].device
    n_micro = len(micro_batches)
    # The loss denominator is the global target-token count, known before any backward.
    n_targets = D.all_reduce_sum(sum((y != IGNORE_INDEX).sum() for _, y in micro_batches).to(torch.float64))
    n_targets = max(int(n_targets.item()), 1)
    # DDP/FSDP average gradients over ranks; multiplying by world_size turns that average back into a sum.
    ce_scale = opts.world_size / n_targets
    ce_sum = torch.zeros((), device=device, dtype=torch.float64)
    aux_sum = torch.zeros(2, device=device, dtype=torch.float64)
    counts_LE = None
    for i, (x_BT, y_BT) in enumerate(micro_batches):
        with D.grad_sync(model, enabled=i == n_micro - 1):
            with torch.autocast(device.type, dtype=opts.autocast_dtype, enabled=opts.autocast_dtype is not None):
                # The LM head and cross-entropy run fused inside the model: no [B, T, V] logits.
                out = model(x_BT, targets_BT=y_BT, ce_scale=ce_scale * loss_scale)
            loss = out.ce_loss / loss_scale if loss_scale != 1.0 else out.ce_loss
            if out.router:
                lb, z = out.lb_loss, out.z_loss
                loss = loss + (opts.lb_coef * lb + opts.z_coef * z) / n_micro
                aux_sum += torch.stack([lb.detach(), z.detach()]).double()
                c = torch.stack([s.tokens_per_expert for s in out.router])
                counts_LE = c if counts_LE is None else counts_LE + c
            (scaler.scale(loss) if scaler is not None else loss).backward()
        ce_sum += out.ce_sum.double()

    max_norm = opts.clip if opts.clip > 0 else float("inf")
    skipped = False
    if scaler is not None:
        grad_norm, skipped = scaled_clip_and_step(scaler, optimizer, model.parameters(), max_norm)
    else:
        grad_norm = clip_and_step(optimizer, model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    optimizer.zero_grad(set_to_none=True)

    # One all-reduce for everything we log.
    stats = torch.cat([ce_sum.view(1), aux_sum / n_micro])
    stats = D.all_reduce_sum(stats)
    counts = []
    if counts_LE is not None:
        counts_LE = D.all_reduce_sum(counts_LE)
        if opts.bias_update_rate > 0 and not skipped:
            _update_router_bias(model, counts_LE, opts.bias_update_rate)
        counts = counts_LE.tolist()
    return StepResult(
        loss=float(stats[0]) / n_targets,
        lb_loss=float(stats[1]) / opts.world_size,
        z_loss=float(stats[2]) / opts.world_size,
        grad_norm=float(grad_norm),
        target_tokens=n_targets,
        tokens_per_expert=counts,
        loss_scale=loss_scale if scaler is not None else None,
        skipped=skipped,
    )


@torch.no_grad()
def _update_router_bias(model: nn.Module, counts_LE: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing: raise the selection bias of under-loaded experts, lower over-loaded ones."""
    for router, counts_E in zip(moe_routers(model), counts_LE):
        if router.bias is not None:
            load = counts_E.float()
            router.bias += rate * torch.sign(load.mean() - load).to(router.bias.device)


def routing_summary(tokens_per_expert: list[list[int]]) -> dict[str, float]:
    """Utilisation (share of experts that got any token) and imbalance (max load / mean load), layer means."""
    if not tokens_per_expert:
        return {}
    c = torch.tensor(tokens_per_expert, dtype=torch.float64)
    util = (c > 0).double().mean(dim=1)
    imbalance = c.max(dim=1).values / c.mean(dim=1).clamp_min(1e-9)
    return {"expert_util": float(util.mean()), "load_imbalance": float(imbalance.mean())}


@torch.no_grad()
def evaluate(model: nn.Module, batches, autocast_dtype: torch.dtype | None) -> float:
    """Mean cross-entropy per target token over `batches` on every rank (summed across ranks)."""
    was_training = model.training
    model.eval()
    totals = None
    for x_BT, y_BT in batches:
        with torch.autocast(x_BT.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            ce = model(x_BT, targets_BT=y_BT).ce_sum
        t = torch.stack([ce.double(), (y_BT != IGNORE_INDEX).sum().double()])
        totals = t if totals is None else totals + t
    model.train(was_training)
    totals = D.all_reduce_sum(totals)
    return float(totals[0] / totals[1].clamp_min(1))


# --- the run ---

LoaderFactory = Callable[..., Any]  # (split, *, seq_len, seed, rank, world_size) -> loader with next_batch/state_dict


def token_windows_factory(data_dir: str | Path) -> LoaderFactory:
    """Loaders over a token-shard folder built by `moecoder data` (moecoder.train.loader.TokenWindows)."""

    def make(split: str, *, seq_len: int, seed: int, rank: int, world_size: int):
        from .loader import TokenWindows

        return TokenWindows(data_dir, split=split, seq_len=seq_len, seed=seed, rank=rank, world_size=world_size)

    return make


def _autocast_dtype(precision: str) -> torch.dtype | None:
    # fp16 runs on CPU too (torch supports fp16 autocast and GradScaler there): not for speed, but the
    # same loss-scaling path as a GPU run, so it can be tested and compared without one.
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# fp16 only: this many skipped steps in a row (the scale divided by 2**N) means the gradients are
# inf/NaN whatever the scale (a diverged run, a bug), not an overflow the scaler can back off from.
MAX_SKIPPED_IN_A_ROW = 30


def _grad_scaler(info: D.DistInfo):
    if info.parallel_sharded:
        # Ranks hold different gradient shards: the inf/nan check must be agreed across ranks.
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(info.device.type)
    return torch.amp.GradScaler(info.device.type)


def _split(x_BT: torch.Tensor, y_BT: torch.Tensor, micro: int, device: torch.device):
    return [(x.to(device), y.to(device)) for x, y in zip(x_BT.split(micro), y_BT.split(micro))]


def _full_model_state(model: nn.Module, info: D.DistInfo) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not info.enabled:
        return D.unwrap(model).state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optimizer_state(model, optimizer, info: D.DistInfo) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # Keys are parameter names, so the state loads into 1 process, DDP or FSDP2 alike.
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True) if info.enabled else None
    return get_optimizer_state_dict(model, optimizer, options=opts)


def _load_optimizer_state(model, optimizer, state: dict, info: D.DistInfo) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True) if info.enabled else None
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=opts)


def _save(out_dir, step, *, model, optimizer, scaler, loader, model_cfg, cfg, info, tokenizer_dir, log) -> None:
    from . import state as S

    model_state = _full_model_state(model, info)  # collective under FSDP2
    optim_state = _optimizer_state(model, optimizer, info)  # collective when distributed
    per_rank = D.all_gather_objects({"rng": S.rng_state(), "loader": loader.state_dict()})
    if info.is_main:
        if info.parallel_sharded:
            plain = Transformer(model_cfg)
            plain.load_state_dict(model_state)
        else:
            plain = D.unwrap(model)
        train_state = {
            "step": step,
            "optimizer": optim_state,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ranks": per_rank,
            "world_size": info.world_size,
            "model_config": model_cfg.to_dict(),
            "train_config": dataclasses.asdict(cfg),
        }
        path = S.save_training_checkpoint(out_dir, step, model_to_save=plain, train_state=train_state,
                                          keep=cfg.keep, tokenizer_dir=tokenizer_dir)
        log(f"saved checkpoint {path}")
    D.barrier()


def _find_resume_checkpoint(out_dir, info: D.DistInfo, log) -> Path | None:
    from . import state as S

    found = S.latest_good_checkpoint(out_dir, warn=log) if info.is_main else None
    return D.broadcast_object(found)


def train(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    out_dir: str | Path,
    *,
    loader_factory: LoaderFactory,
    resume: bool = True,
    tokenizer_dir: str | Path | None = None,
    stream=None,
) -> dict[str, Any]:
    """Train `model_cfg` from scratch or from the newest good checkpoint in `out_dir`.

    Launch with plain python for one process or with torchrun for DDP/FSDP2. Returns a summary:
    final step, last loss, last eval loss, last checkpoint folder and the (wrapped) model.
    """
    from . import state as S

    info = D.init_distributed(cfg.device)
    info.parallel_sharded = info.enabled and cfg.parallel == "fsdp"
    cfg.validate(info.world_size)
    if cfg.bias_update_rate > 0 and not model_cfg.routing_bias:
        raise TrainConfigError("--bias-update-rate needs a model config with routing_bias: true")
    if cfg.keep:
        from ..checkpoint import to_hf_config

        to_hf_config(model_cfg)  # a config the HF format cannot express fails now, not at the first save
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    amp_dtype = _autocast_dtype(cfg.precision)
    local_batch = cfg.batch_size // info.world_size
    micro = cfg.micro_batch or local_batch

    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    model.init_weights(seed=cfg.seed)
    loader = loader_factory("train", seq_len=cfg.seq_len, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    data_vocab = getattr(loader, "vocab_size", None)
    if data_vocab is not None and data_vocab > model_cfg.vocab_size:
        raise TrainConfigError(f"the data's tokenizer has {data_vocab} tokens but the model's vocab_size is "
                               f"{model_cfg.vocab_size}; set vocab_size in the config's model section")

    def log(msg: str) -> None:
        if info.is_main:
            print(msg, file=stream or sys.stderr, flush=True)

    if not resume and S.list_checkpoints(out_dir):
        # Old checkpoints with higher step numbers would outlive (and prune) the new run's.
        raise TrainConfigError(f"--no-resume: {S.checkpoint_root(out_dir)} already holds checkpoints; "
                               f"delete them or use another --out")
    ckpt = _find_resume_checkpoint(out_dir, info, log) if resume else None
    state = None
    if ckpt is not None:
        state = S.load_train_state(ckpt)
        if state["model_config"] != model_cfg.to_dict():
            raise TrainConfigError(f"checkpoint {ckpt} was trained with a different model config; "
                                   f"use another --out or --no-resume")
        if state["world_size"] != info.world_size:
            # Allowed: the optimizer state is unsharded and the loader position counts global windows,
            # so the run continues on the same data; only bitwise equality with the old layout is lost.
            log(f"note: checkpoint {ckpt} was written by {state['world_size']} ranks, this run has "
                f"{info.world_size}")
        S.load_model_weights(model, ckpt)

    model.to(info.device)
    model = D.wrap_model(model, cfg.parallel, info)
    model.train()
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    scaler = _grad_scaler(info) if cfg.precision == "fp16" else None
    start = 0
    if state is not None:
        _load_optimizer_state(model, optimizer, state["optimizer"], info)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        mine = state["ranks"][min(info.rank, len(state["ranks"]) - 1)]
        loader.load_state_dict(mine["loader"])
        S.set_rng_state(mine["rng"])
        start = int(state["step"])
        log(f"resumed from {ckpt} at step {start}")

    schedule = cfg.schedule_fn()
    opts = StepOptions(clip=cfg.clip, lb_coef=cfg.lb_coef, z_coef=cfg.z_coef,
                       bias_update_rate=cfg.bias_update_rate, autocast_dtype=amp_dtype, scaler=scaler,
                       world_size=info.world_size)
    metrics = MetricsLogger(out_dir, enabled=info.is_main, total_steps=cfg.steps, resume_step=start,
                            progress_every=cfg.log_every, stream=stream)
    if start == 0 and info.is_main:
        log(f"training {sum(p.numel() for p in D.unwrap(model).parameters()) / 1e6:.1f}M params on "
            f"{info.world_size} x {info.device.type} ({cfg.parallel if info.enabled else 'single'}), "
            f"global batch {cfg.batch_size} x {cfg.seq_len}, accumulation {cfg.accum_steps(info.world_size)}")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last: dict[str, Any] = {"step": start}
    last_ckpt = ckpt
    skipped_in_a_row = 0
    try:
        end = min(cfg.steps, cfg.stop_after or cfg.steps)
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = schedule(step)  # the LR of optimizer step number `step`
            x_BT, y_BT = loader.next_batch(local_batch)
            res = train_step(model, optimizer, _split(x_BT, y_BT, micro, info.device), lr, opts)
            done = step + 1
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            record = {"step": done, "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
                      "lb_loss": res.lb_loss, "z_loss": res.z_loss, "target_tokens": res.target_tokens,
                      "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
                      **routing_summary(res.tokens_per_expert), "tokens_per_expert": res.tokens_per_expert}
            if not math.isfinite(res.loss):
                raise FloatingPointError(f"loss is {res.loss} at step {done}; lower --lr or use fp32")
            if res.loss_scale is not None:
                record.update(loss_scale=res.loss_scale, skipped=res.skipped)
            if res.skipped:
                record["grad_norm"] = None  # inf/NaN, which JSON cannot hold
                skipped_in_a_row += 1
                metrics.message(f"step {done}: inf/NaN gradients at loss scale {res.loss_scale:g}; update skipped")
                if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise FloatingPointError(f"inf/NaN gradients for {skipped_in_a_row} steps in a row (at step "
                                             f"{done}) whatever the loss scale; lower --lr or use bf16")
            else:
                skipped_in_a_row = 0
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                val = loader_factory("val", seq_len=cfg.seq_len, seed=cfg.seed, rank=info.rank,
                                     world_size=info.world_size)
                batches = (_split(*val.next_batch(local_batch), micro, info.device)
                           for _ in range(cfg.eval_batches))
                eval_loss = evaluate(model, (b for group in batches for b in group), amp_dtype)
                record.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50.0)))
            metrics.log(record)
            metrics.progress(done, res.loss, lr, record["tokens_per_s"])
            last = record
            if cfg.keep and ((cfg.save_every and done % cfg.save_every == 0) or done == end):
                _save(out_dir, done, model=model, optimizer=optimizer, scaler=scaler, loader=loader,
                      model_cfg=model_cfg, cfg=cfg, info=info, tokenizer_dir=tokenizer_dir, log=metrics.message)
                last_ckpt = S.checkpoint_root(out_dir) / S.step_dir_name(done)
    finally:
        metrics.close()
    return {"step": last["step"], "loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
            "checkpoint": str(last_ckpt) if last_ckpt else None, "model": model}
