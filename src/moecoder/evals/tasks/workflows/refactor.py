"""Workflow 2: refactor a ~470-line experiment script into a package (config, data, model, train, evaluate).

The review scored this 60% logically correct: after the split, a configuration update made in one
module was not seen in another. The script's `update_config` rebinds a module global, which is fine
in one file and silently wrong once other modules hold `from .config import CONFIG`. The checks test
imports (each module first, in a fresh interpreter), the import graph, the public API, fixed-seed
outputs against the original, and, per module, whether a configuration update is seen.
"""

from __future__ import annotations

import ast
import math
import posixpath
from typing import Any

from moecoder.evals.tasks.workflows.common import (
    data_dir,
    decide,
    make_prompts,
    read_tree,
    run_harness,
    syntax_verdict,
)
from moecoder.evals.types import Prompt, Status, Verdict

PACKAGE = "tinyml"
MODULES = ["", "config", "data", "model", "train", "evaluate"]  # "" is the package itself
API = {
    "": ["update_config", "run_experiment", "CONFIG"],
    "config": ["Config", "CONFIG", "update_config", "reset_config"],
    "data": ["make_dataset", "split_dataset", "standardize", "iterate_minibatches"],
    "model": ["init_model", "forward", "predict_proba", "backward", "parameter_count"],
    "train": ["train_model"],
    "evaluate": ["evaluate_model", "run_experiment", "main"],
}
# Touches every module: data (n_samples, noise), model (hidden_size, init_scale), train (epochs,
# learning_rate, batch_size), evaluate (threshold, n_calibration_bins).
CHANGES = {"n_samples": 120, "noise": 0.1, "hidden_size": 5, "init_scale": 0.7, "epochs": 6,
           "learning_rate": 0.1, "batch_size": 8, "threshold": 0.65, "n_calibration_bins": 4}


def close(a: Any, b: Any) -> bool:
    """Equal structure and values, floats to 1e-9 relative: a refactor may reorder float arithmetic."""
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool)
                and not isinstance(b, bool) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def module_file(module: str) -> str:
    return f"{PACKAGE}/__init__.py" if not module else f"{PACKAGE}/{module}.py"


def reroot(files: dict[str, str]) -> dict[str, str]:
    """`src/tinyml/config.py` -> `tinyml/config.py`: a package given under a prefix is moved to the top."""
    init = f"{PACKAGE}/__init__.py"
    if init in files:
        return files
    inits = [p for p in files if p.endswith("/" + init)]
    if len(inits) != 1:
        return files
    prefix = inits[0][: -len(init)]
    return {p.removeprefix(prefix) if p.startswith(prefix + PACKAGE + "/") else p: s for p, s in files.items()}


def import_graph(files: dict[str, str]) -> dict[str, set[str]]:
    """Module-level import edges between the package's own modules (function-level imports excluded:
    they are the usual way to break a cycle and run only at call time)."""
    mods = {p[:-3].replace("/", ".").removesuffix(".__init__"): p for p in files
            if p.startswith(PACKAGE + "/") and p.endswith(".py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        here = mod if is_pkg else mod.rpartition(".")[0]
        for node in _module_level_imports(ast.parse(files[path])):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import name`: an edge to pkg.name when that is a module, else to pkg.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]  # `import tinyml.data.x` still depends on tinyml.data
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def _module_level_imports(tree: ast.Module):
    """Import statements executed at import time: top level, and inside top-level if/try blocks
    (but not `if TYPE_CHECKING:`)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        path.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


class RefactorTask:
    """Split a monolithic experiment script into a package without changing its behaviour."""

    task_id = "workflow/multi-file-refactor"
    suite = "workflow"
    kind = "Refactoring"
    CHECKS = ("modules_import", "no_import_cycles", "api_complete", "same_outputs",
              "config_seen_by_data", "config_seen_by_model", "config_seen_by_train", "config_seen_by_evaluate")

    def __init__(self) -> None:
        self.root = data_dir("refactor")

    def original(self) -> str:
        return (self.root / "original" / "experiment.py").read_text()

    def prompts(self) -> dict[str, Prompt]:
        text = (self.root / "prompt.md").read_text().replace("{{ORIGINAL}}", self.original())
        return make_prompts(self.task_id, text)

    def evaluate(self, code: str | dict[str, str], sandbox: Any = None) -> Verdict:
        if isinstance(code, str):
            code = {module_file("evaluate"): code}  # a single file cannot be the package; it fails the checks
        files = reroot({posixpath.normpath(p): s for p, s in code.items()})
        early = syntax_verdict(files, len(self.CHECKS), [module_file(m) for m in MODULES])
        if early is not None:
            return early
        n_py = sum(p.endswith(".py") for p in files)
        base = Verdict(Status.FAIL, 0, len(self.CHECKS), syntax_ok=True, files_compiled=n_py, files_total=n_py)
        run_files = {**files, "_wf_harness.py": (self.root / "harness.py").read_text(),
                     "_wf_original.py": self.original()}
        common = {"package": PACKAGE, "original": "_wf_original.py"}
        m: dict[str, Any] = base.measurements

        def run(config: dict[str, Any]) -> dict[str, Any] | None:
            out = run_harness(sandbox, run_files, "_wf_harness.py", {**common, **config}, wall_s=60.0)
            bad = out.failure_status()
            if bad in (Status.TIMEOUT, Status.MEMORY):
                raise _RunFailed(bad, out.error_line())
            return out.report

        try:
            imports = run({"mode": "imports", "modules": MODULES}) or {}
            m["imports"] = {mod or PACKAGE: bool(imports.get(mod, {}).get("ok")) for mod in MODULES}
            m["import_cycle"] = find_cycle(import_graph(files))
            m["api"] = (run({"mode": "api", "api": API}) or {}).get("found", {})
            outputs = run({"mode": "outputs"}) or {}
            update = run({"mode": "update", "changes": CHANGES}) or {}
        except _RunFailed as e:
            base.status, base.detail = e.status, e.detail
            return base
        m["update_errors"] = {k: v["package"]["error"] for k, v in update.items()
                              if isinstance(v, dict) and "error" in v.get("package", {})}

        def same(part: dict[str, Any]) -> bool:
            return "value" in part["package"] and close(part["package"]["value"], part["original"])

        return decide([
            ("modules_import", lambda: all(m["imports"].values())),
            ("no_import_cycles", lambda: m["import_cycle"] is None),
            ("api_complete", lambda: all(set(m["api"][k]) == set(v) for k, v in API.items())),
            ("same_outputs", lambda: close(outputs["package"]["value"], outputs["original"])),
            ("config_seen_by_data", lambda: same(update["data"])),
            ("config_seen_by_model", lambda: same(update["model"])),
            ("config_seen_by_train", lambda: same(update["train"])),
            ("config_seen_by_evaluate", lambda: same(update["evaluate"])),
        ], base)

    def reference(self) -> dict[str, str]:
        return read_tree(self.root / "reference")

    def flawed(self) -> dict[str, dict[str, str]]:
        return {d.name: read_tree(d) for d in sorted((self.root / "flawed").iterdir()) if d.is_dir()}


class _RunFailed(Exception):
    def __init__(self, status: Status, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail
