"""Metrics, the end-to-end experiment and the command line."""

import dataclasses
import json
import sys

from . import config
from .config import log, parse_override, update_config
from .data import class_balance, make_dataset, split_dataset, standardize
from .model import init_model, parameter_count, predict_proba
from .train import bce, summarize_history, train_model


def confusion(labels, probs):
    tp = fp = tn = fn = 0
    for y, p in zip(labels, probs):
        pred = 1 if p >= config.CONFIG.threshold else 0
        if pred == 1 and y == 1:
            tp += 1
        elif pred == 1:
            fp += 1
        elif y == 0:
            tn += 1
        else:
            fn += 1
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def roc_auc(labels, probs):
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos = [p for y, p in zip(labels, probs) if y == 1]
    neg = [p for y, p in zip(labels, probs) if y == 0]
    if not pos or not neg:
        return None
    wins = 0.0
    for a in pos:
        for b in neg:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(pos) * len(neg))


def calibration_error(labels, probs):
    """Expected calibration error over equal-width probability bins."""
    bins = config.CONFIG.n_calibration_bins
    totals = [[0, 0.0, 0.0] for _ in range(bins)]
    for y, p in zip(labels, probs):
        k = min(bins - 1, int(p * bins))
        totals[k][0] += 1
        totals[k][1] += p
        totals[k][2] += y
    n = len(labels)
    return sum(abs(s_p / c - s_y / c) * c / n for c, s_p, s_y in totals if c)


def evaluate_model(model, data):
    """Classification metrics at the configured threshold."""
    labels = [y for _, y in data]
    probs = predict_proba(model, [x for x, _ in data])
    c = confusion(labels, probs)
    n = len(labels)
    precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
    recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": round((c["tp"] + c["tn"]) / n, 10) if n else 0.0,
        "precision": round(precision, 10),
        "recall": round(recall, 10),
        "f1": round(f1, 10),
        "log_loss": round(sum(bce(p, y) for y, p in zip(labels, probs)) / n, 10) if n else 0.0,
        "auc": None if roc_auc(labels, probs) is None else round(roc_auc(labels, probs), 10),
        "ece": round(calibration_error(labels, probs), 10) if n else 0.0,
        "confusion": c,
    }


def run_experiment():
    """Data -> model -> training -> evaluation with the current configuration; a JSON-ready dict."""
    data = make_dataset()
    train, test = split_dataset(data)
    train, test = standardize(train, test)
    model = init_model(len(train[0][0]))
    log(f"{len(train)} train / {len(test)} test examples, {parameter_count(model)} parameters")
    trained, history = train_model(model, train)
    return {
        "config": dataclasses.asdict(config.CONFIG),
        "n_params": parameter_count(trained),
        "class_balance": round(class_balance(train), 10),
        "history": history,
        "summary": summarize_history(history),
        "train": evaluate_model(trained, train),
        "test": evaluate_model(trained, test),
    }


def format_report(result):
    lines = [f"parameters: {result['n_params']}", f"{'split':<6} {'acc':>7} {'f1':>7} {'loss':>8} {'auc':>7}"]
    for split in ("train", "test"):
        m = result[split]
        auc = "-" if m["auc"] is None else f"{m['auc']:.3f}"
        lines.append(f"{split:<6} {m['accuracy']:>7.3f} {m['f1']:>7.3f} {m['log_loss']:>8.4f} {auc:>7}")
    s = result["summary"]
    lines.append(f"loss {s['first_loss']} -> {s['last_loss']} (best epoch {s['best_epoch']})")
    return "\n".join(lines)


def main(argv=None):
    """Command line: --set name=value (repeatable), --report for a table. Returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    report = False
    overrides = {}
    i = 0
    while i < len(argv):
        if argv[i] == "--set" and i + 1 < len(argv):
            name, value = parse_override(argv[i + 1])
            overrides[name] = value
            i += 2
        elif argv[i] == "--report":
            report = True
            i += 1
        else:
            print(f"unknown argument: {argv[i]}", file=sys.stderr)
            return 2
    if overrides:
        update_config(**overrides)
    result = run_experiment()
    print(format_report(result) if report else json.dumps(result, sort_keys=True))
    return 0
