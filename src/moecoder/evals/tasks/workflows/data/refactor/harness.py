"""Hidden checks' measuring side for the refactoring workflow. Runs next to the candidate's package.

Modes (JSON config on stdin): "imports" imports each module first in a fresh interpreter; "api" lists
which required names each module defines; "outputs" runs the experiment with the default
configuration in both the original script and the package; "update" changes the configuration
through the package and records each module's behaviour next to the original's after the same
change. It reports measurements only; the parent decides.
"""

import copy
import importlib
import importlib.util
import json
import subprocess
import sys
import traceback

CFG = json.loads(sys.stdin.read())  # read before any candidate code is imported
MARKER = CFG["report_marker"]
sys.path.insert(0, ".")


def report(obj):
    print(MARKER, json.dumps(obj, sort_keys=True, default=repr), flush=True)


def load_original():
    spec = importlib.util.spec_from_file_location("_wf_original", CFG["original"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def attempt(fn):
    try:
        return {"value": fn()}
    except BaseException:  # noqa: BLE001 (candidate code may raise anything)
        return {"error": traceback.format_exc(limit=2)[-300:]}


def main():
    pkg = CFG["package"]
    mode = CFG["mode"]
    if mode == "imports":
        # Each module imported first, in its own fresh interpreter (import order exposes cycles).
        results = {}
        for mod in CFG["modules"]:
            name = f"{pkg}.{mod}" if mod else pkg
            try:
                p = subprocess.run([sys.executable, "-B", "-c", f"import {name}"], capture_output=True, text=True,
                                   timeout=30, check=False)
                results[mod] = {"ok": p.returncode == 0, "error": p.stderr.strip().splitlines()[-1:]}
            except subprocess.TimeoutExpired:
                results[mod] = {"ok": False, "error": ["timeout"]}
        return report(results)
    if mode == "api":
        found = {}
        for mod_name, names in CFG["api"].items():
            try:
                mod = importlib.import_module(f"{pkg}.{mod_name}" if mod_name else pkg)
                found[mod_name] = [n for n in names if hasattr(mod, n)]
            except BaseException:  # noqa: BLE001 (candidate code may raise anything)
                found[mod_name] = []
        return report({"found": found})
    orig = load_original()
    try:
        config = importlib.import_module(f"{pkg}.config")
        data = importlib.import_module(f"{pkg}.data")
        model = importlib.import_module(f"{pkg}.model")
        train = importlib.import_module(f"{pkg}.train")
        evaluate = importlib.import_module(f"{pkg}.evaluate")
    except BaseException:  # noqa: BLE001 (candidate code may raise anything)
        return report({"import_error": traceback.format_exc(limit=2)[-300:]})
    if mode == "outputs":
        return report({"original": orig.run_experiment(), "package": attempt(evaluate.run_experiment)})
    if mode == "update":
        changes = CFG["changes"]
        orig.update_config(**changes)
        updated = attempt(lambda: config.update_config(**changes) is not None)
        # Inputs for train/evaluate come from the original, so each measurement isolates one module.
        o_data = orig.make_dataset()
        o_train, o_test = orig.standardize(*orig.split_dataset(o_data))
        o_model = orig.init_model(len(o_train[0][0]))
        o_trained, o_hist = orig.train_model(o_model, o_train)
        out = {"update_call": updated}
        out["data"] = {"original": [o_data, orig.split_dataset(o_data)],
                       "package": attempt(lambda: [data.make_dataset(), data.split_dataset(copy.deepcopy(o_data))])}
        out["model"] = {"original": o_model, "package": attempt(lambda: model.init_model(len(o_train[0][0])))}
        out["train"] = {"original": [o_trained, o_hist],
                        "package": attempt(lambda: list(train.train_model(copy.deepcopy(o_model), o_train)))}
        out["evaluate"] = {"original": orig.evaluate_model(o_trained, o_test),
                           "package": attempt(lambda: evaluate.evaluate_model(o_trained, o_test))}
        return report(out)
    report({"error": f"unknown mode {mode}"})


main()
