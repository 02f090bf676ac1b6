"""The `moecoder` command line: one typer app, subcommands as typed functions.

Each area keeps its commands in its own module and is registered below; heavy imports
happen inside the commands so `moecoder --help` stays fast.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(help="moecoder: Mixture-of-Experts code models.", no_args_is_help=True, add_completion=False)


from .errors import UserError  # noqa: F401  (re-exported: commands raise moecoder.cli.UserError)


# --- registrations (one line per area) ---
from moecoder.train.data_cli import data_app, tokenizer_app  # noqa: E402  (D1: training data)
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
from moecoder.train.train_cli import plot_cmd, train_cmd  # noqa: E402  (D2: training loop)
app.command("train")(train_cmd)
app.command("plot")(plot_cmd)

from moecoder.serve.serve_cli import bench_app, serve_cmd  # noqa: E402  (E: serving)
app.command("serve")(serve_cmd)
app.add_typer(bench_app, name="bench")
from moecoder.evals.eval_cli import app as eval_app  # noqa: E402  (G: evaluation)
app.add_typer(eval_app, name="eval")

from moecoder.engine_cli import register as register_engine  # noqa: E402  (B: info, generate, demo)
register_engine(app)

def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:
        # moecoder's own input errors (ConfigError, CheckpointError, DataError, ...) are one line for
        # the user; any other ValueError is a bug and keeps its traceback.
        if not type(e).__module__.startswith("moecoder."):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
