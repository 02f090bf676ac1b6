"""`moecoder eval run|report|compare`: the evaluation command line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from moecoder.errors import UserError

app = typer.Typer(help="Evaluate models: run suites, write reports, compare runs.", no_args_is_help=True)

SUITES = ("humaneval", "humaneval+", "mbpp", "workflows", "swebench-lite")
EXECUTES = {"humaneval", "humaneval+", "mbpp", "workflows"}  # suites that run model code in the local sandbox


def load_tasks(suite: str, data: str | None) -> tuple[list[Any], str | None]:
    """Tasks of a suite and the data file they came from (its sha256 goes into run.json)."""
    if suite == "swebench-lite":
        from moecoder.evals.swebench import load_instances

        if not data:
            raise UserError("--suite swebench-lite needs --data PATH (a JSON/JSONL file of SWE-bench instances)")
        return load_instances(data), data
    try:
        if suite == "workflows":
            from moecoder.evals.tasks.workflows import load_workflows

            if data:
                raise UserError("--suite workflows takes no --data (its tasks ship with moecoder)")
            return load_workflows(), None
        from moecoder.evals.tasks import functional
    except ImportError as e:
        raise UserError(f"suite {suite} is not available in this build: {e}") from None
    try:
        if suite == "humaneval":
            path = data or str(functional.humaneval_data_path())
            return functional.load_humaneval(path), path
        if not data:
            raise UserError(f"--suite {suite} needs --data PATH (the benchmark's JSONL file)")
        loader = functional.load_humaneval_plus if suite == "humaneval+" else functional.load_mbpp
        return loader(data), data
    except (OSError, ValueError) as e:  # missing file, checksum mismatch, malformed rows
        raise UserError(f"cannot load {suite}: {e}") from None


def make_sandbox(min_tier: str | None) -> tuple[Any, str]:
    """The sandbox every execution goes through; refuses when the host cannot reach `min_tier`."""
    from moecoder.evals.sandbox import IsolationTier, Sandbox, SandboxRefused

    tier = None
    if min_tier:
        try:
            tier = IsolationTier[min_tier.upper()]
        except KeyError:
            names = ", ".join(t.name.lower() for t in IsolationTier)
            raise UserError(f"unknown --min-tier {min_tier!r}; choose one of: {names}") from None
    try:
        sandbox = Sandbox(min_tier=tier, opt_in=True) if tier is not None else Sandbox(opt_in=True)
    except SandboxRefused as e:
        raise UserError(f"sandbox refused: {e}") from None
    t = getattr(sandbox, "tier", None)
    return sandbox, str(getattr(t, "name", t)).lower()


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", s).strip("_") or "model"


@app.command("run")
def run_cmd(
    suite: str = typer.Option(..., help=f"One of: {', '.join(SUITES)}."),
    backend: str = typer.Option("local", help="local (a moecoder checkpoint folder) or openai (HTTP API)."),
    model: str = typer.Option(None, help="openai: model name. local: checkpoint folder (default: bundled model)."),
    base_url: str = typer.Option("https://api.openai.com/v1", help="OpenAI-compatible API base URL."),
    api_key_env: str = typer.Option(None, help="Name of the environment variable holding the API key."),
    api: str = typer.Option(None, help="chat or completions (default: chat for instruction templates)."),
    data: Path = typer.Option(None, help="Dataset file (JSON/JSONL) instead of the suite's default."),
    limit: int = typer.Option(None, help="Only the first N tasks."),
    samples: int = typer.Option(1, help="Samples per task (pass@k needs k <= samples)."),
    temperature: float = typer.Option(0.0),
    top_p: float = typer.Option(1.0),
    max_tokens: int = typer.Option(1024, help="Maximum output tokens per sample."),
    seed: int = typer.Option(None, help="Sampling seed (sample i uses seed + i)."),
    template: str = typer.Option(None, help="Prompt template id, e.g. instruct-md@1 (default per suite)."),
    out: Path = typer.Option(None, help="Run directory (default runs/<suite>__<model>); re-run to resume."),
    allow_exec: bool = typer.Option(False, "--allow-exec", help="Allow executing model-written code in the sandbox."),
    generate_only: bool = typer.Option(False, "--generate-only", help="Only generate (fill the cache); no execution."),
    min_tier: str = typer.Option(None, help="Refuse to run below this sandbox isolation tier."),
    concurrency: int = typer.Option(4, help="Requests in flight at once."),
    timeout: float = typer.Option(120.0, help="Per-request timeout, seconds."),
    max_retries: int = typer.Option(4, help="Retries on 429/5xx/timeouts before a sample is marked infra."),
    max_usd: float = typer.Option(None, help="Spending cap in USD; the run stops cleanly when reached."),
    usd_per_hour: float = typer.Option(None, help="Local backend: price of the hardware per hour."),
    prices: Path = typer.Option(None, help="Price table (TOML) merged over the defaults."),
    device: str = typer.Option("cpu", help="Local backend: torch device."),
) -> None:
    """Generate answers for a suite, extract code, evaluate it in the sandbox, append results to RUN_DIR."""
    from moecoder.evals.backends.base import BackendError, Sampling, make_backend
    from moecoder.evals.prices import PriceError, PriceTable
    from moecoder.evals.runner import RunConfig, RunError, Runner
    from moecoder.evals.templates import DEFAULT_TEMPLATE, UnknownTemplate, get_template

    if suite not in SUITES:
        raise UserError(f"unknown suite {suite!r}; choose one of: {', '.join(SUITES)}")
    if suite in EXECUTES and not allow_exec and not generate_only:
        raise UserError(f"suite {suite} executes model-written code; pass --allow-exec to run it in the sandbox "
                        "(or --generate-only to only generate)")
    try:
        tmpl = get_template(template or DEFAULT_TEMPLATE[suite])
        table = PriceTable.load(prices)
    except (UnknownTemplate, PriceError) as e:
        raise UserError(str(e)) from None
    tasks, data_path = load_tasks(suite, str(data) if data else None)
    if not tasks:
        raise UserError(f"suite {suite} has no tasks")

    if backend == "openai":
        if not model:
            raise UserError("--backend openai needs --model NAME")
        kwargs: dict[str, Any] = {
            "model": model, "base_url": base_url, "api_key_env": api_key_env, "timeout": timeout,
            "api": api or ("chat" if tmpl.style == "instruction" else "completions"), "max_retries": max_retries}
    elif backend == "local":
        kwargs = {"model_dir": model, "chat": tmpl.style == "instruction", "device": device}
    else:
        raise UserError(f"unknown backend {backend!r}; choose local or openai")

    sandbox, tier = None, None
    if suite in EXECUTES and not generate_only:
        sandbox, tier = make_sandbox(min_tier)
    try:
        be = make_backend(backend, **kwargs)
    except BackendError as e:
        raise UserError(str(e)) from None
    if template is None and backend == "local" and suite in ("humaneval", "humaneval+", "mbpp") \
            and not be.tokenizer.has_chat_template:
        # A base model (no chat template) is asked to continue the function, as HumanEval was designed, or to
        # answer MBPP's original [BEGIN] prompt.
        tmpl = get_template("completion@1")
    run_dir = out or Path("runs") / f"{_slug(suite)}__{_slug(be.model)}"
    finalize = None
    if suite == "swebench-lite" and not generate_only:
        from moecoder.evals.swebench import grade

        def finalize(d: Path, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            if not allow_exec:
                from moecoder.evals.swebench import write_predictions

                write_predictions(d, recs, be.model)
                (d / "swebench.json").write_text('{"graded": false, "reason": "skipped: grading needs --allow-exec"}\n')
                return recs
            return grade(d, recs, be.model, str(data), max_workers=concurrency)[0]

    cfg = RunConfig(suite=suite, out_dir=run_dir, template=tmpl,
                    sampling=Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed),
                    samples=samples, limit=limit, concurrency=concurrency, max_usd=max_usd,
                    usd_per_hour=usd_per_hour, generate_only=generate_only, data_path=data_path,
                    sandbox_tier=tier)
    done = [0]

    def progress(rec: dict[str, Any]) -> None:
        done[0] += 1
        typer.echo(f"[{done[0]}] {rec['task_id']} #{rec['sample']}: {rec['status']}", err=True)

    try:
        runner = Runner(cfg, be, tasks, sandbox=sandbox, prices=table, finalize=finalize, on_record=progress)
        result = runner.run()
    except (RunError, BackendError) as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        raise UserError(f"interrupted; re-run the same command to resume ({run_dir})") from None
    finally:
        be.close()
    typer.echo(f"{result.state}: {result.new_samples} new samples, {result.requests} requests, "
               f"{result.cached_generations} cached generations, spent ${result.spent_usd:.4f} -> {run_dir}")
    if result.state == "complete":
        from moecoder.evals.report import load_summary, markdown_report

        typer.echo(markdown_report([load_summary(run_dir)]))


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory written by `moecoder eval run`."),
    html: bool = typer.Option(False, "--html", help="Also write report.html (tables and plots)."),
    review: bool = typer.Option(False, "--review", help="Add the review's published figures for comparison."),
) -> None:
    """Print the Markdown report of a run and write report.md (and report.html) into it."""
    from moecoder.evals.report import html_report, load_summary, markdown_report
    from moecoder.evals.runner import RunError

    try:
        s = load_summary(run_dir)
    except RunError as e:
        raise UserError(str(e)) from None
    md = markdown_report([s], review=review)
    _write(run_dir / "report.md", md)
    if html:
        _write(run_dir / "report.html", html_report([s], review=review))
        typer.echo(f"wrote {run_dir / 'report.html'}", err=True)
    typer.echo(md)


@app.command("compare")
def compare_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Two or more run directories."),
    html: Path = typer.Option(None, help="Also write an HTML comparison to this file."),
    review: bool = typer.Option(False, "--review", help="Add the review's published figures for comparison."),
) -> None:
    """Compare runs side by side: the review's model table plus per-run details."""
    from moecoder.evals.report import html_report, load_summary, markdown_report
    from moecoder.evals.runner import RunError

    try:
        runs = [load_summary(d) for d in run_dirs]
    except RunError as e:
        raise UserError(str(e)) from None
    if html:
        _write(html, html_report(runs, "moecoder comparison", review))
    typer.echo(markdown_report(runs, "moecoder comparison", review))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
