"""The review's three workflows as executable evaluation tasks.

Each workflow has a prompt, hidden executable checks (a harness that measures inside the sandbox,
rules applied on the trusted side), a reference solution that passes every check, and flawed
solutions reproducing the failures the review reports:

- training loop (Code generation): LR schedule stepped per micro-batch -> 5/8 checks
- multi-file refactor (Refactoring): shared config rebound in one module, stale in others -> 5/8
- real-time pipeline (Data engineering): no batching, no connection pooling -> 4/6
"""

from __future__ import annotations

from moecoder.evals.types import Task


def load_workflows() -> list[Task]:
    """The three workflow tasks. The pipeline task starts a throwaway PostgreSQL on first evaluate()."""
    from moecoder.evals.tasks.workflows.pipeline import PipelineTask
    from moecoder.evals.tasks.workflows.refactor import RefactorTask
    from moecoder.evals.tasks.workflows.training_loop import TrainingLoopTask

    return [TrainingLoopTask(), RefactorTask(), PipelineTask()]


__all__ = ["load_workflows"]
