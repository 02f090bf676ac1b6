"""The review's three workflows: references pass every check, flawed solutions score exactly as designed.

Candidate code runs in the project sandbox (engineer F's), the pipeline against a real, throwaway
PostgreSQL started once for this module.
"""

from __future__ import annotations

import pytest

from moecoder.evals.tasks.workflows import load_workflows
from moecoder.evals.tasks.workflows.common import single_file
from moecoder.evals.tasks.workflows.pg import ThrowawayPostgres
from moecoder.evals.tasks.workflows.pipeline import PipelineTask, expected_rows
from moecoder.evals.tasks.workflows.refactor import RefactorTask, close, find_cycle, import_graph, reroot
from moecoder.evals.tasks.workflows.training_loop import TrainingLoopTask, scheduled_lr
from moecoder.evals.types import Status


@pytest.fixture(scope="module")
def sandbox():
    from moecoder.evals.sandbox import IsolationTier, Sandbox

    return Sandbox(opt_in=True, min_tier=IsolationTier.NONE)


@pytest.fixture(scope="module")
def pg():
    with ThrowawayPostgres() as server:
        yield server


def failed(verdict) -> set[str]:
    return {name for name, ok in verdict.measurements["checks"].items() if not ok}


# ---- workflow 1: training loop -------------------------------------------------------------------


def test_training_loop_reference_passes_every_check(sandbox):
    task = TrainingLoopTask()
    v = task.evaluate(task.reference(), sandbox)
    assert v.status is Status.PASS, v.detail
    assert (v.checks_passed, v.checks_total) == (8, 8)
    assert v.measurements["main"]["lrs"] == pytest.approx([scheduled_lr(k) for k in range(6)])
    assert v.measurements["backend"] == "gloo"  # DDP on gloo over the sample's private loopback


@pytest.mark.parametrize("name, passed, failing", [
    # The review's bug. Stepping the schedule 4x too often also ends warmup/decay early, so training stalls.
    ("lr_per_microbatch", 5, {"scheduler_steps_per_optimizer_step", "lr_schedule_values", "loss_decreases"}),
    ("loss_not_scaled", 6, {"grad_equals_big_batch", "partial_window"}),
])
def test_training_loop_flawed_solutions_score_exactly(sandbox, name, passed, failing):
    task = TrainingLoopTask()
    v = task.evaluate(task.flawed()[name], sandbox)
    assert v.status is Status.FAIL and v.syntax_ok
    assert (v.checks_passed, v.checks_total) == (passed, 8)
    assert failed(v) == failing


def test_training_loop_checks_are_independent(sandbox):
    # Three unrelated bugs in one mutant, each caught by its own check and by no other.
    task = TrainingLoopTask()
    src = task.reference()["train_loop.py"]
    for old, new in [
        ("sync = contextlib.nullcontext() if (last or not ddp) else net.no_sync()", "sync = contextlib.nullcontext()"),
        ("with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):", "with contextlib.nullcontext():"),
        ("        if not window:\n", "        if len(window) < accum_steps:\n"),  # drops the trailing partial window
    ]:
        src = _mutate(src, old, new)
    v = task.evaluate(src, sandbox)
    assert failed(v) == {"ddp_sync_once_per_step", "mixed_precision", "partial_window"}
    assert (v.checks_passed, v.checks_total) == (5, 8)


# ---- workflow 2: multi-file refactor -------------------------------------------------------------


def test_refactor_reference_passes_every_check(sandbox):
    task = RefactorTask()
    v = task.evaluate(task.reference(), sandbox)
    assert v.status is Status.PASS, v.detail
    assert (v.checks_passed, v.checks_total) == (8, 8)
    assert (v.files_compiled, v.files_total) == (7, 7)


@pytest.mark.parametrize("name, passed, failing", [
    # The review's bug: update_config rebinds CONFIG; data/model/train hold the old object via
    # `from .config import CONFIG`, evaluate reads config.CONFIG and sees the update.
    ("config_rebound", 5, {"config_seen_by_data", "config_seen_by_model", "config_seen_by_train"}),
    # train <-> evaluate imported at module level: runs (module objects resolve late) but is a cycle.
    ("import_cycle", 7, {"no_import_cycles"}),
])
def test_refactor_flawed_solutions_score_exactly(sandbox, name, passed, failing):
    task = RefactorTask()
    v = task.evaluate(task.flawed()[name], sandbox)
    assert (v.checks_passed, v.checks_total) == (passed, 8)
    assert failed(v) == failing


def test_refactor_unimportable_package_fails_every_check(sandbox):
    # model <-> train through `from .x import name` at module level: importing either first fails.
    task = RefactorTask()
    files = task.reference()
    files["tinyml/model.py"] = "from .train import bce\n" + files["tinyml/model.py"]
    v = task.evaluate(files, sandbox)
    assert v.status is Status.FAIL and v.syntax_ok
    assert (v.checks_passed, v.checks_total) == (0, 8)
    assert not any(v.measurements["imports"].values())


def test_import_graph_finds_cycles_and_ignores_function_level_imports():
    files = {
        "tinyml/__init__.py": "from .config import CONFIG\n",
        "tinyml/config.py": "CONFIG = 1\n",
        "tinyml/data.py": "from . import model\nfrom .config import CONFIG\n",
        "tinyml/model.py": "import tinyml.data\n",
        "tinyml/train.py": "def f():\n    from . import evaluate\n",
        "tinyml/evaluate.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import train\n"
                              "from .train import f\n",
    }
    graph = import_graph(files)
    assert graph["tinyml.data"] == {"tinyml.model", "tinyml.config"}
    assert graph["tinyml.train"] == set() and graph["tinyml.evaluate"] == {"tinyml.train"}
    assert find_cycle(graph) == ["tinyml.data", "tinyml.model", "tinyml.data"]
    files["tinyml/model.py"] = "X = 1\n"
    assert find_cycle(import_graph(files)) is None


# ---- workflow 3: real-time pipeline ---------------------------------------------------------------


def test_pipeline_reference_passes_every_check(sandbox, pg):
    task = PipelineTask(pg)
    v = task.evaluate(task.reference(), sandbox)
    assert v.status is Status.PASS, (v.detail, v.measurements)
    assert (v.checks_passed, v.checks_total) == (6, 6)
    assert v.measurements["insert_round_trips"] <= 2 and v.measurements["connections_opened"] <= 4
    # The crash run committed mid-stream, so the replay really started from committed offsets.
    assert any(v.measurements["resume_run"]["resumed_from"].values())


def test_pipeline_flawed_no_batching_no_pool_scores_exactly(sandbox, pg):
    task = PipelineTask(pg)
    v = task.evaluate(task.flawed()["no_batching_no_pool"], sandbox)
    assert (v.checks_passed, v.checks_total) == (4, 6)
    assert failed(v) == {"batched_inserts", "pooled_connections"}
    assert v.measurements["insert_round_trips"] == v.measurements["rows"] == v.measurements["expected_rows"]


def test_pipeline_without_a_server_is_an_infra_verdict(sandbox, tmp_path):
    (tmp_path / "sock").mkdir()
    task = PipelineTask(ThrowawayPostgres(root=tmp_path, user="nobody"))  # nothing listens on that socket
    v = task.evaluate(task.reference(), sandbox)
    assert v.status is Status.INFRA and v.detail.startswith("PostgreSQL:")


def _mutate(source: str, old: str, new: str) -> str:
    assert old in source
    return source.replace(old, new)


@pytest.mark.parametrize("mutation, failing", [
    # Offsets committed as messages arrive, before their windows are written: lost on crash.
    (("                consumed[msg.partition()] = msg.offset() + 1\n",
      ("                consumed[msg.partition()] = msg.offset() + 1\n"
       "                consumer.commit(message=msg, asynchronous=False)\n")),
     {"commit_after_durable", "replay_no_duplicates"}),
    # Not idempotent: the replay hits the primary key and the pipeline dies.
    (("\n    ON CONFLICT (sensor, window_start) DO NOTHING", ""), {"replay_no_duplicates"}),
    # Late events counted instead of dropped: wrong rows, and the commit check sees non-final values.
    (("        if self.watermark is not None and ts < self.watermark:", "        if False:"),
     {"aggregates_correct", "commit_after_durable"}),
    # Overwriting final rows on replay replaces them with partial aggregates.
    (("DO NOTHING", "DO UPDATE SET event_count = EXCLUDED.event_count, value_sum = EXCLUDED.value_sum"),
     {"replay_no_duplicates"}),
])
def test_pipeline_commit_and_replay_checks_catch_mutants(sandbox, pg, mutation, failing):
    task = PipelineTask(pg)
    v = task.evaluate(_mutate(task.reference()["pipeline.py"], *mutation), sandbox)
    assert failed(v) == failing


def test_expected_rows_semantics():
    t0 = 1_767_225_600_000  # a minute boundary
    msgs = [
        {"partition": 0, "offset": 0, "key": "a", "value": '{"value": 1.0}', "ts": t0 + 10_000},
        {"partition": 0, "offset": 1, "key": "a", "value": '{"value": 2.0}', "ts": t0 + 200_000},
        {"partition": 0, "offset": 2, "key": "a", "value": '{"value": 4.0}', "ts": t0 + 150_000},  # out of order, kept
        {"partition": 0, "offset": 3, "key": "a", "value": '{"value": 8.0}', "ts": t0 + 100_000},  # late: dropped
        {"partition": 1, "offset": 0, "eof": True},
    ]
    rows = {r["start_ms"] - t0: (r["count"], r["sum"], r["min"], r["max"]) for r in expected_rows(msgs)}
    # Event at +10 s lies in the windows starting at -240 s ... 0 s; +200 s in -60 s ... +180 s.
    assert sorted(rows) == [s * 1000 for s in (-240, -180, -120, -60, 0, 60, 120, 180)]
    assert rows[0] == (3, 7.0, 1.0, 4.0)
    assert rows[-240_000] == (1, 1.0, 1.0, 1.0)
    assert rows[180_000] == (1, 2.0, 2.0, 2.0)


# ---- shared: syntax verdicts, prompts, registry ---------------------------------------------------


def test_garbage_and_syntax_errors_get_syntax_verdicts(sandbox):
    train, refactor, pipeline = load_workflows()
    v = train.evaluate("def train(model, batches:\n    pass\n", sandbox)
    assert (v.status, v.syntax_ok, v.files_compiled, v.files_total) == (Status.SYNTAX, False, 0, 1)
    assert v.checks_total == 8 and v.checks_passed == 0 and "train_loop.py" in v.detail

    files = refactor.reference()
    files["tinyml/model.py"] = "def init_model(:\n"
    v = refactor.evaluate(files, sandbox)
    assert (v.status, v.files_compiled, v.files_total) == (Status.SYNTAX, 6, 7)

    v = pipeline.evaluate({"README.md": "I cannot help with that."}, sandbox)
    assert v.status is Status.EXTRACT and v.checks_total == 6

    v = refactor.evaluate({"tinyml/__init__.py": ""}, sandbox)  # compiles, but the package is missing files
    assert v.status is Status.FAIL and v.syntax_ok and "tinyml/config.py" in v.detail

    with pytest.raises(ValueError, match="pass a moecoder.evals.sandbox.Sandbox"):
        train.evaluate(train.reference(), None)  # candidate code never runs outside the sandbox


def test_load_workflows_prompts_carry_the_contracts():
    tasks = load_workflows()
    assert [t.kind for t in tasks] == ["Code generation", "Refactoring", "Data engineering"]
    assert len({t.task_id for t in tasks}) == 3 and all(t.suite == "workflow" for t in tasks)
    texts = [t.prompts()["instruction"].text for t in tasks]
    assert "def train(model, batches, optimizer, scheduler, *, accum_steps" in texts[0]
    assert "def update_config(**changes):" in texts[1] and "{{ORIGINAL}}" not in texts[1]
    assert "def run_pipeline(consumer_config: dict, topic: str, dsn: str" in texts[2]
    for t in tasks:
        p = t.prompts()["instruction"]
        assert p.messages == [{"role": "user", "content": p.text}] and p.task_id == t.task_id
        # Completion style: the continuation alone is the answer, read as files (the prompt is prose).
        c = t.prompts()["completion"]
        assert c.text == p.text and c.continues == "files" and c.program("### a.py\n") == "### a.py\n"


def test_answer_files_are_normalised_before_checks():
    # A single-file task accepts its one Python file under another name; other files stay.
    assert single_file({"train.py": "x = 1", "NOTES.md": "n"}, "train_loop.py") == {"train_loop.py": "x = 1",
                                                                                   "NOTES.md": "n"}
    assert single_file({"a.py": "", "b.py": ""}, "train_loop.py") == {"a.py": "", "b.py": ""}
    assert single_file("y = 2", "pipeline.py") == {"pipeline.py": "y = 2"}
    # A package written under a prefix is moved to the top; unrelated files are left alone.
    files = {"src/tinyml/__init__.py": "", "src/tinyml/config.py": "C = 1", "README.md": "r"}
    assert reroot(files) == {"tinyml/__init__.py": "", "tinyml/config.py": "C = 1", "README.md": "r"}
    assert reroot({"tinyml/__init__.py": ""}) == {"tinyml/__init__.py": ""}


def test_reference_answers_survive_the_documented_multi_file_format():
    # What a model following the prompt would send back, through the project's extractor.
    from moecoder.evals.extract import extract_files
    from moecoder.evals.templates import DEFAULT_TEMPLATE, get_template

    template = get_template(DEFAULT_TEMPLATE["workflows"])
    for task in load_workflows():
        assert template.render(task).messages[-1]["content"] == task.prompts()["instruction"].text
        files = {p: c for p, c in task.reference().items() if p.endswith(".py")}
        answer = "Here you go.\n\n" + "\n".join(f"### {p}\n```python\n{c}```\n" for p, c in files.items())
        assert extract_files(answer) == files


def test_refactor_output_comparison_tolerates_float_reordering_only():
    a = {"loss": 0.1 + 0.2, "n": 3, "hist": [1.0, {"x": None}]}
    assert close(a, {"loss": 0.3, "n": 3, "hist": [1.0, {"x": None}]})
    assert not close(a, {"loss": 0.3001, "n": 3, "hist": [1.0, {"x": None}]})
    assert not close(a, {"loss": 0.3, "n": 3, "hist": [1.0]})
    assert not close({"n": 3}, {"n": "3"}) and not close({"a": 1}, {"b": 1}) and not close(True, 1.0)
