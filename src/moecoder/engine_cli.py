"""`moecoder info`, `moecoder generate` and `moecoder demo` (the main job, `make run`).

Heavy imports (torch, the model) happen inside the commands so `moecoder --help` stays fast.
Bad input of any kind (unknown preset, missing folder, bad flag values, unknown flags) is
reported as one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer
from typer.core import TyperCommand

from .config import PRESETS
from .errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
BUNDLED_MODEL = Path(__file__).parent / "assets" / "default-model"
DEMO_PRESET = "review-270b-a40b"
DEMO_PROMPT = "def fibonacci(n):\n"


class OneLineErrors(TyperCommand):
    """Usage errors (unknown flag, bad value, missing argument) as one line instead of a panel."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except typer.TyperException as e:
            if getattr(e, "exit_code", None) != 2:  # usage errors exit 2; leave anything else alone
                raise
            raise UserError(f"{e.format_message()} (see: {ctx.command_path} --help)") from None


def register(app: typer.Typer) -> None:
    """Add info, generate and demo to the main app."""
    app.command("info", cls=OneLineErrors)(info_cmd)
    app.command("generate", cls=OneLineErrors)(generate_cmd)
    app.command("demo", cls=OneLineErrors)(demo_cmd)


# --- info ---


def _resolve_config(target: str):
    """A preset name, or a checkpoint folder (read from its config.json)."""
    from .checkpoint import CheckpointError, read_config
    from .config import ConfigError, get_preset

    if target in PRESETS:
        return get_preset(target)
    if Path(target).is_dir():
        try:
            return read_config(target)
        except (CheckpointError, ConfigError) as e:
            raise UserError(str(e)) from None
    raise UserError(f"{target!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder")


def sizing_table(name: str, cfg, context: int):
    """A rich Table of the sizing figures of one config."""
    from rich.table import Table

    from .sizing import CONVENTIONS, human, human_bytes, size_model

    s = size_model(cfg, context)
    moe = (f"{cfg.n_experts} experts, top-{cfg.top_k}" + (f" + {cfg.n_shared_experts} shared"
                                                          if cfg.n_shared_experts else "")) if cfg.n_experts else "dense"
    t = Table(title=f"{name}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads}/{cfg.n_kv_heads} heads, {moe}",
              caption=CONVENTIONS, caption_justify="left", show_header=True)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("exact", justify="right", style="dim")
    t.add_row("total parameters", human(s.total_params), f"{s.total_params:,}")
    t.add_row("active parameters / token", human(s.active_params), f"{s.active_params:,}")
    non_emb = s.active_params - s.embedding_params
    t.add_row("  active, without embedding + LM head", human(non_emb), f"{non_emb:,}")
    t.add_row(f"forward FLOPs / token @ {context:,} ctx", human(s.flops_per_token, "FLOP"), f"{s.flops_per_token:,}")
    t.add_row("  of which attention", human(s.attention_flops_per_token, "FLOP"), f"{s.attention_flops_per_token:,}")
    for fmt, n in s.weight_bytes.items():
        t.add_row(f"weights @ {fmt}", human_bytes(n), f"{int(n):,}")
    t.add_row("KV cache / token (bf16)", human_bytes(s.kv_bytes_per_token), f"{s.kv_bytes_per_token:,}")
    seq = s.kv_bytes_per_token * context
    t.add_row(f"KV cache / sequence @ {context:,} ctx", human_bytes(seq), f"{seq:,}")
    return t, s


def info_cmd(
    target: str = typer.Argument(..., help=f"A preset ({', '.join(PRESETS)}) or a checkpoint folder."),
    context: int = typer.Option(4096, "--context", help="Context length (keys attended) for the FLOPs figure."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """Parameters (total, active), forward FLOPs per token, weight and KV-cache memory of a model."""
    from rich.console import Console

    from .sizing import CONVENTIONS

    if context <= 0:
        raise UserError(f"--context must be a positive number of tokens, got {context}")
    cfg = _resolve_config(target)
    table, s = sizing_table(target, cfg, context)
    if as_json:
        print(json.dumps({"model": target, "config": cfg.to_dict(), **s.to_dict(), "conventions": CONVENTIONS},
                         indent=2))
    else:
        Console().print(table)


# --- generate ---


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def _load(model_dir: Path, dtype: str, device: str):
    """(LoadedCheckpoint, Tokenizer) from a folder, errors as UserError."""
    import torch

    from .checkpoint import CheckpointError, load_checkpoint
    from .config import ConfigError
    from .tokenizer import Tokenizer, TokenizerError

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not model_dir.is_dir():
        raise UserError(f"model folder {model_dir} does not exist")
    try:
        tok = Tokenizer.from_dir(model_dir)
        ckpt = load_checkpoint(model_dir, dtype=getattr(torch, dtype), device=_pick_device(device))
    except (CheckpointError, ConfigError, TokenizerError) as e:
        raise UserError(str(e)) from None
    return ckpt, tok


def default_model() -> Path:
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    raise UserError("no bundled model in this install; pass --model DIR (a checkpoint folder with a tokenizer)")


def _run_generation(ckpt, tok, prompt: str, *, chat: bool, stream: bool, max_new_tokens: int, temperature: float,
                    top_k: int | None, top_p: float | None, seed: int | None, stop: list[str],
                    out=None) -> dict:
    """Encode, generate (streaming pieces to `out` as they come when stream=True), return stats."""
    from .generate import GenerationError, SamplingParams, text_events
    from .tokenizer import ChatTemplateError

    out = out or sys.stdout
    try:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if chat:
            ids = tok.encode_chat([{"role": "user", "content": prompt}])
        else:
            ids = tok.encode(prompt)
        eos = list(ckpt.eos_token_ids) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        t0 = time.perf_counter()
        n_tokens, finish, pieces = 0, None, []
        for _, tok_id, piece, fin in text_events(ckpt.model, tok, [ids], max_new_tokens, params, eos, stop):
            n_tokens += tok_id is not None
            finish = fin or finish
            if stream:
                out.write(piece)
                out.flush()
            else:
                pieces.append(piece)
        out.write("".join(pieces))
        out.write("\n")
        out.flush()
        seconds = time.perf_counter() - t0
    except (GenerationError, ChatTemplateError) as e:
        raise UserError(str(e)) from None
    return {"prompt_tokens": len(ids), "new_tokens": n_tokens, "seconds": seconds, "finish_reason": finish}


def generate_cmd(
    prompt: str = typer.Option(..., "--prompt", "-p",
                               help="The prompt text (the user message with --chat); '-' reads standard input."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Checkpoint folder (default: bundled model)."),
    stream: bool = typer.Option(False, "--stream", help="Print text as it is generated."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample among the k most likely tokens."),
    top_p: float | None = typer.Option(None, "--top-p", help="Sample from the smallest set covering p."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling (reproducible output)."),
    stop: list[str] = typer.Option([], "--stop", help="Stop at this string (repeatable); it is not printed."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt as a user message in the chat template."),
    dtype: str = typer.Option("float32", "--dtype", help=f"Weights dtype: {', '.join(DTYPES)}."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's)."),
) -> None:
    """Generate a completion of --prompt with a checkpoint folder's model and tokenizer."""
    _set_threads(threads)
    if prompt == "-":
        prompt = sys.stdin.read()
    model_dir = model if model is not None else default_model()
    ckpt, tok = _load(model_dir, dtype, device)
    stats = _run_generation(ckpt, tok, prompt, chat=chat, stream=stream, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop)
    print(_stats_line(stats), file=sys.stderr)


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _stats_line(stats: dict) -> str:
    n = stats["new_tokens"]
    speed = f"{n} new tokens, {n / stats['seconds']:.1f} tok/s, " if n else ""
    return (f"[{stats['prompt_tokens']} prompt tokens, {speed}{stats['seconds']:.2f} s, "
            f"finish: {stats['finish_reason']}]")


# --- demo ---


def cache_dir() -> Path:
    """$MOECODER_CACHE, else $XDG_CACHE_HOME/moecoder, else ~/.cache/moecoder."""
    if os.environ.get("MOECODER_CACHE"):
        return Path(os.environ["MOECODER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moecoder"


def _stdlib_sources(limit_bytes: int) -> list[str]:
    """Python source text from the standard library (offline, always present), sorted for reproducibility."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    if not texts:
        raise UserError(f"found no Python sources under {root} to train the demo tokenizer on")
    return texts


def build_demo_model(target: Path, vocab_size: int = 2048, corpus_bytes: int = 1_500_000) -> Path:
    """A debug-sized MoE with random weights and a byte-level BPE trained on stdlib sources.

    Written with save_checkpoint, which renames a finished folder into place (atomic).
    """
    import tempfile

    import torch

    from .checkpoint import save_checkpoint
    from .config import get_preset
    from .model import Transformer
    from .tokenizer import train_byte_bpe

    with tempfile.TemporaryDirectory(prefix="moecoder-demo-tok-") as tok_dir:
        tok = train_byte_bpe(_stdlib_sources(corpus_bytes), vocab_size, tok_dir)
        # norm_topk: Mixtral renormalises its top-k weights, so the saved folder means the same in transformers.
        cfg = get_preset("debug").replace(vocab_size=tok.vocab_size, max_seq_len=1024, norm_topk=True)
        torch.manual_seed(0)
        model = Transformer(cfg)
        model.init_weights(std=0.05, seed=0)
        ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
        return save_checkpoint(model, target, tokenizer_dir=tok_dir, extra_config=ids)


def demo_cmd(
    prompt: str = typer.Option(DEMO_PROMPT, "--prompt", "-p", help="Prompt to complete."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Most tokens to generate."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild the cached random demo model."),
) -> None:
    """The main job: size the 270B-A40B review model, then stream a completion from a local model.

    Uses the bundled model when this install has one; otherwise builds (once, cached) a small
    random-weight MoE with a tokenizer trained on Python's standard library. Works offline.
    """
    from rich.console import Console

    # The demo models are tiny: one thread decodes fastest, and several threads spinning on a
    # busy machine can be 10x slower than one.
    _set_threads(1)
    console = Console()
    table, _ = sizing_table(DEMO_PRESET, _resolve_config(DEMO_PRESET), 4096)
    console.print(table)
    console.print()

    if (BUNDLED_MODEL / "config.json").is_file():
        model_dir, note = BUNDLED_MODEL, "bundled model"
        ckpt, tok = _load(model_dir, "float32", "auto")
    else:
        model_dir = cache_dir() / "demo-model"
        note = "random weights, so the text is noise: the point is the pipeline"
        ckpt = tok = None
        if not rebuild and (model_dir / "config.json").is_file():
            try:
                ckpt, tok = _load(model_dir, "float32", "auto")
            except UserError as e:  # a damaged cache is rebuilt, not reported
                console.print(f"[dim]cached demo model unusable ({e}); rebuilding[/dim]")
        if ckpt is None:
            console.print(f"[dim]No bundled model: building a random-weight debug MoE in {model_dir} ...[/dim]")
            t0 = time.perf_counter()
            try:
                build_demo_model(model_dir)
            except OSError as e:
                raise UserError(f"cannot write the demo model to {model_dir}: {e} (set MOECODER_CACHE)") from None
            console.print(f"[dim]built in {time.perf_counter() - t0:.1f} s[/dim]")
            ckpt, tok = _load(model_dir, "float32", "auto")
    n_params = sum(p.numel() for p in ckpt.model.parameters())
    console.print(f"[bold]Generating[/bold] with {model_dir} ({n_params / 1e6:.2f}M params; {note}), "
                  f"temperature 0.8, top-p 0.95, seed {seed}:")
    console.print(f"[bold cyan]{prompt}[/bold cyan]", end="")
    stats = _run_generation(ckpt, tok, prompt, chat=False, stream=True, max_new_tokens=max_new_tokens,
                            temperature=0.8, top_k=None, top_p=0.95, seed=seed, stop=[])
    console.print(f"[dim]{_stats_line(stats)}[/dim]")
