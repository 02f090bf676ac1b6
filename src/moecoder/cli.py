"""The `moecoder` command line: one typer app, subcommands as typed functions.

Each area keeps its commands in its own module and is registered below; heavy imports
happen inside the commands so `moecoder --help` stays fast.
"""

from __future__ import annotations

import sys

import typer

from .engine_cli import register as register_engine
from .errors import UserError
from .evals.eval_cli import app as eval_app
from .serve.serve_cli import bench_app, serve_cmd
from .train.data_cli import data_app, tokenizer_app
from .train.train_cli import plot_cmd, train_cmd

__all__ = ["UserError", "app", "main"]  # commands raise moecoder.cli.UserError

app = typer.Typer(help="moecoder: Mixture-of-Experts code models.", no_args_is_help=True, add_completion=False)
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
app.command("train")(train_cmd)
app.command("plot")(plot_cmd)
app.command("serve")(serve_cmd)
app.add_typer(bench_app, name="bench")
app.add_typer(eval_app, name="eval")
register_engine(app)  # info, generate, demo


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
