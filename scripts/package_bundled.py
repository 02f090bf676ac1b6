"""Package a training run as the bundled default model, with its model card.

    .venv/bin/python scripts/package_bundled.py --run runs/bundled --corpus runs/corpus \
        [--eval-run runs/main/workflows --eval-run runs/main/humaneval --eval-run runs/main/mbpp ...]

Copies the newest good checkpoint's HF folder to src/moecoder/assets/default-model in bf16 (the
loader converts to the dtype asked for), writes loss.png and README.md (the model card) from the
run's metrics, the corpus statistics and, when given, evaluation runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "src" / "moecoder" / "assets" / "default-model"


def _metrics(run: Path) -> tuple[list[dict], float]:
    """Per-step records (the last record of a step wins: resumed runs redo a few steps) and the
    total compute time including redone steps."""
    by_step: dict[int, dict] = {}
    total_s = 0.0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        total_s += rec.get("step_time_s", 0.0)
        by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)], total_s


def _newest_checkpoint(run: Path) -> Path:
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    if not ckpts:
        sys.exit(f"error: no checkpoints in {run / 'checkpoints'}")
    return ckpts[-1]


def _eval_rows(eval_runs: list[Path]) -> str:
    if not eval_runs:
        return "Not evaluated yet.\n"
    from moecoder.evals.report import load_summary, markdown_report

    text = markdown_report([load_summary(d) for d in eval_runs], title="bundled model", review=True)
    return text.split("\n", 1)[1]  # drop the report's own title line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--eval-run", type=Path, action="append", default=[])
    ap.add_argument("--max-seq-len", type=int, default=8192,
                    help="context the packaged config allows (RoPE has no hard limit; trained at shorter windows)")
    ap.add_argument("--out", type=Path, default=ASSET)
    args = ap.parse_args()

    from moecoder.checkpoint import load_checkpoint, save_checkpoint
    from moecoder.train.plot import plot_run

    ckpt = _newest_checkpoint(args.run)
    loaded = load_checkpoint(ckpt / "model", dtype=torch.bfloat16)
    model = loaded.model
    model.cfg.max_seq_len = args.max_seq_len
    records, total_s = _metrics(args.run)
    evals = [r for r in records if "eval_loss" in r]
    train_state = json.loads((ckpt / "manifest.json").read_text()) if (ckpt / "manifest.json").exists() else {}
    step = int(ckpt.name.split("_")[1])
    kept = [r for r in records if r["step"] <= step]
    tokens_seen = sum(r.get("target_tokens", 0) for r in kept)
    index = json.loads((args.corpus / "tokens" / "index.json").read_text())
    stats = json.loads((args.corpus / "text" / "stats.json").read_text())

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model"
        save_checkpoint(model, staged, tokenizer_dir=ckpt / "model")
        png = plot_run(args.run, Path(tmp) / "loss.png")
        shutil.copy(png, staged / "loss.png")
        licences = "\n".join(
            f"| {name} | {v['files']} | {v['bytes'] / 1e6:.2f} |"
            for name, v in sorted(stats["licences"].items(), key=lambda kv: -kv[1]["bytes"]))
        n_params = sum(p.numel() for p in model.parameters())
        cfg_json = json.dumps({k: v for k, v in model.cfg.to_dict().items()}, indent=1)
        last_eval = evals[-1] if evals else {}
        card = CARD.format(
            n_params=n_params / 1e6, step=step, tokens_seen=tokens_seen, total_h=total_s / 3600,
            kept_h=sum(r.get("step_time_s", 0.0) for r in kept) / 3600,
            val_loss=last_eval.get("eval_loss", float("nan")), val_ppl=last_eval.get("eval_ppl", float("nan")),
            val_step=last_eval.get("step", "n/a"), train_loss=kept[-1]["loss"],
            train_tokens=index["splits"]["train"]["num_tokens"], val_tokens=index["splits"]["val"]["num_tokens"],
            files=stats["files_kept"], mbytes=stats["bytes_kept"] / 1e6, sources="\n".join(f"- `{s}`" for s in stats["sources"]),
            licences=licences, cfg=cfg_json, evals=_eval_rows(args.eval_run), max_seq_len=args.max_seq_len,
            manifest_files=len(train_state.get("files", {})) if isinstance(train_state, dict) else 0,
        )
        (staged / "README.md").write_text(card)
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staged, args.out)
    print(f"packaged {ckpt} -> {args.out}")


CARD = """# moecoder default model (bundled)

A small Mixture-of-Experts code model trained from scratch on this machine's Python sources by
`moecoder train`, so that `moecoder generate`, `moecoder serve` and `moecoder eval` have a real
model to run offline. **It is weak at coding**: it has seen a few million tokens and completes
Python with plausible-looking but mostly wrong code. Its evaluation scores below are the honest
result of that; do not use it for anything but trying the system end to end.

## Model

- Mixtral-style MoE decoder (`model_type: mixtral`): {n_params:.1f}M parameters, 8 experts, top-2,
  tied embeddings; weights stored in bf16 (`model.safetensors`).
- Trained with 256-token windows; `max_seq_len` is set to {max_seq_len} so long prompts run
  (RoPE has no hard limit), but quality beyond the training length is poor.

```json
{cfg}
```

## Data

{files} files, {mbytes:.1f} MB of Python source (exact de-duplication by sha256, 32 B..1 MB per file,
UTF-8 only), from the interpreter's standard library and site-packages of the machine that trained it:
{sources}

Tokenizer: byte-level BPE, vocabulary 8192, trained on the train split (`moecoder tokenizer train`).
Tokens: {train_tokens:,} train / {val_tokens:,} validation (split by file hash, 1%).

Licences as declared by each package's metadata (stdlib: PSF-2.0). Most are permissive; MPL-2.0
and "LGPL with exceptions" files are weak-copyleft and are a small share:

| Licence (as declared) | Files | MB |
|---|---|---|
{licences}

## Training

- `configs/bundled.yaml`: AdamW (no decay on norms/biases/embeddings), WSD schedule (warmup 100,
  peak 2e-3, decay over the last 20% to 2e-4), global batch 16 x 256 tokens, fp32 on CPU,
  load-balancing loss 0.01 and router z-loss 0.001.
- Steps: {step}; target tokens seen: {tokens_seen:,}.
- Wall time: {kept_h:.2f} h of step time for the kept steps ({total_h:.2f} h including steps redone
  after a resume), on 2 shared CPU cores with one intra-op thread.
- Final training loss {train_loss:.3f}; validation loss {val_loss:.3f} (perplexity {val_ppl:.1f}) at step {val_step}.

![loss and learning rate](loss.png)

Reproduce:

```bash
moecoder data build --out runs/corpus/text --max-bytes 60000000
moecoder tokenizer train --data runs/corpus/text --out runs/corpus/tokenizer --vocab-size 8192
moecoder data tokenize --data runs/corpus/text --tokenizer runs/corpus/tokenizer --out runs/corpus/tokens --workers 2
OMP_NUM_THREADS=1 moecoder train --config configs/bundled.yaml --data runs/corpus/tokens --out runs/bundled \\
    --steps {step} --tokenizer runs/corpus/tokens/tokenizer
python scripts/package_bundled.py --run runs/bundled --corpus runs/corpus
```

## Evaluation

Measured with `moecoder eval run --backend local --allow-exec --usd-per-hour 0.10`, greedy, one sample
per task: the workflows (`instruct-files@1` template) and HumanEval (`completion@1`) by `make run`; MBPP's
test split (499 of its 500 tasks: the loader leaves out Mbpp/367, whose tests build objects of the solution's own
classes, which the trusted side cannot check) and HumanEval+, both with `completion@1` (the original MBPP prompt with its three
asserts; the function prefix), from the data files in `../shared/data/`:

```bash
moecoder eval run --suite mbpp --data ../shared/data/mbpp.jsonl --template completion@1 \\
    --usd-per-hour 0.10 --allow-exec --out runs/main/mbpp
moecoder eval run --suite humaneval+ --data ../shared/data/HumanEvalPlus.jsonl.gz --template completion@1 \\
    --usd-per-hour 0.10 --allow-exec --out runs/main/humanevalplus
```

The model never answers in the multi-file format the workflows ask for (every workflow sample is
`extract`); it passes no HumanEval, HumanEval+ or MBPP task. Most of its HumanEval completions compile; on
MBPP's prose prompts it writes unrelated code up to the 1024-token limit, so none of those answers parses.
That is the honest floor this system measures from.

{evals}
"""


if __name__ == "__main__":
    main()
