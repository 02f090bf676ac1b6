#!/usr/bin/env python3
"""Tiny end-to-end experiment: synthetic two-moons data, a one-hidden-layer MLP trained with SGD,
and an evaluation report. Pure Python (no numpy) so it runs anywhere.

Usage:
    python experiment.py                       # default configuration
    python experiment.py --set epochs=5 --set hidden_size=4
    python experiment.py --report              # human-readable table instead of JSON
"""

import dataclasses
import json
import math
import random
import sys
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


@dataclass
class Config:
    seed: int = 7
    # data
    n_samples: int = 240
    noise: float = 0.2
    test_fraction: float = 0.25
    poly_features: bool = True
    # model
    hidden_size: int = 8
    init_scale: float = 1.0
    # training
    learning_rate: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 25
    batch_size: int = 16
    lr_decay: float = 0.97
    grad_clip: float = 5.0
    # evaluation
    threshold: float = 0.5
    n_calibration_bins: int = 5
    # logging
    log_every: int = 5
    verbose: bool = False


CONFIG = Config()


def update_config(**changes):
    """Apply `changes` to the global configuration and return it. Unknown names are an error."""
    global CONFIG
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    CONFIG = dataclasses.replace(CONFIG, **changes)
    return CONFIG


def reset_config():
    """Back to the defaults."""
    global CONFIG
    CONFIG = Config()
    return CONFIG


def parse_override(text):
    """'name=value' -> (name, typed value), typed after the field's default."""
    if "=" not in text:
        raise ValueError(f"expected name=value, got {text!r}")
    name, raw = text.split("=", 1)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if name not in fields:
        raise ValueError(f"unknown config field: {name}")
    default = fields[name].default
    if isinstance(default, bool):
        value = raw.lower() in ("1", "true", "yes", "on")
    elif isinstance(default, int):
        value = int(raw)
    elif isinstance(default, float):
        value = float(raw)
    else:
        value = raw
    return name, value


def log(message):
    if CONFIG.verbose:
        print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def make_moons(n, noise, rng):
    """Two interleaving half circles, labels 0 and 1."""
    points = []
    n_outer = n // 2
    n_inner = n - n_outer
    for i in range(n_outer):
        angle = math.pi * i / max(1, n_outer - 1)
        x, y = math.cos(angle), math.sin(angle)
        points.append(([x + rng.gauss(0.0, noise), y + rng.gauss(0.0, noise)], 0))
    for i in range(n_inner):
        angle = math.pi * i / max(1, n_inner - 1)
        x, y = 1.0 - math.cos(angle), 0.5 - math.sin(angle)
        points.append(([x + rng.gauss(0.0, noise), y + rng.gauss(0.0, noise)], 1))
    return points


def feature_map(xy):
    """Optionally add quadratic terms, which lets a small MLP bend its boundary faster."""
    x, y = xy
    if not CONFIG.poly_features:
        return [x, y]
    return [x, y, x * y, x * x, y * y]


def make_dataset(n_samples=None):
    """The full synthetic dataset as a list of (features, label)."""
    n = CONFIG.n_samples if n_samples is None else n_samples
    rng = random.Random(CONFIG.seed)
    return [(feature_map(xy), label) for xy, label in make_moons(n, CONFIG.noise, rng)]


def split_dataset(data):
    """Shuffle deterministically, then split off the test fraction."""
    rng = random.Random(CONFIG.seed + 1)
    order = list(range(len(data)))
    rng.shuffle(order)
    n_test = round(len(data) * CONFIG.test_fraction)
    test = [data[i] for i in order[:n_test]]
    train = [data[i] for i in order[n_test:]]
    return train, test


def feature_stats(data):
    """Per-feature mean and standard deviation."""
    n_features = len(data[0][0])
    means, stds = [], []
    for j in range(n_features):
        column = [x[j] for x, _ in data]
        mean = sum(column) / len(column)
        var = sum((v - mean) ** 2 for v in column) / len(column)
        means.append(mean)
        stds.append(math.sqrt(var) if var > 0 else 1.0)
    return means, stds


def standardize(train, test):
    """Scale both splits with the train split's statistics."""
    means, stds = feature_stats(train)

    def apply(rows):
        return [([(v - m) / s for v, m, s in zip(x, means, stds)], label) for x, label in rows]

    return apply(train), apply(test)


def iterate_minibatches(data, epoch):
    """Shuffled mini-batches for one epoch; the shuffle depends on the seed and the epoch."""
    rng = random.Random(CONFIG.seed * 1000 + epoch)
    order = list(range(len(data)))
    rng.shuffle(order)
    for start in range(0, len(order), CONFIG.batch_size):
        yield [data[i] for i in order[start:start + CONFIG.batch_size]]


def class_balance(data):
    positives = sum(label for _, label in data)
    return positives / len(data) if data else 0.0


# ---------------------------------------------------------------------------------------------------
# Model: one hidden tanh layer, sigmoid output
# ---------------------------------------------------------------------------------------------------


def init_model(n_inputs=None):
    """Weights drawn from a seeded generator, scaled by 1/sqrt(fan_in)."""
    n_in = (5 if CONFIG.poly_features else 2) if n_inputs is None else n_inputs
    rng = random.Random(CONFIG.seed + 2)
    h = CONFIG.hidden_size
    s1 = CONFIG.init_scale / math.sqrt(n_in)
    s2 = CONFIG.init_scale / math.sqrt(h)
    return {
        "W1": [[rng.gauss(0.0, s1) for _ in range(n_in)] for _ in range(h)],
        "b1": [0.0] * h,
        "W2": [rng.gauss(0.0, s2) for _ in range(h)],
        "b2": 0.0,
    }


def sigmoid(z):
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def forward(model, x):
    """Hidden activations and the probability of class 1."""
    hidden = [math.tanh(sum(w * v for w, v in zip(row, x)) + b) for row, b in zip(model["W1"], model["b1"])]
    z = sum(w * a for w, a in zip(model["W2"], hidden)) + model["b2"]
    return hidden, sigmoid(z)


def predict_proba(model, xs):
    return [forward(model, x)[1] for x in xs]


def backward(model, x, y):
    """Gradients of the binary cross-entropy of one example."""
    hidden, p = forward(model, x)
    dz = p - y
    g_w2 = [dz * a for a in hidden]
    g_b2 = dz
    g_w1, g_b1 = [], []
    for j, a in enumerate(hidden):
        da = dz * model["W2"][j] * (1.0 - a * a)
        g_w1.append([da * v for v in x])
        g_b1.append(da)
    return {"W1": g_w1, "b1": g_b1, "W2": g_w2, "b2": g_b2}


def zeros_like(model):
    return {
        "W1": [[0.0] * len(row) for row in model["W1"]],
        "b1": [0.0] * len(model["b1"]),
        "W2": [0.0] * len(model["W2"]),
        "b2": 0.0,
    }


def add_scaled(target, source, scale):
    """target += scale * source, in place, for every parameter."""
    for i, row in enumerate(source["W1"]):
        for j, v in enumerate(row):
            target["W1"][i][j] += scale * v
    for i, v in enumerate(source["b1"]):
        target["b1"][i] += scale * v
    for i, v in enumerate(source["W2"]):
        target["W2"][i] += scale * v
    target["b2"] += scale * source["b2"]


def grad_norm(grads):
    total = sum(v * v for row in grads["W1"] for v in row)
    total += sum(v * v for v in grads["b1"]) + sum(v * v for v in grads["W2"]) + grads["b2"] ** 2
    return math.sqrt(total)


def parameter_count(model):
    return sum(len(row) for row in model["W1"]) + len(model["b1"]) + len(model["W2"]) + 1


def copy_model(model):
    return {
        "W1": [list(row) for row in model["W1"]],
        "b1": list(model["b1"]),
        "W2": list(model["W2"]),
        "b2": model["b2"],
    }


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def bce(p, y):
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return -(y * math.log(p) + (1 - y) * math.log(1.0 - p))


def batch_gradient(model, batch):
    """Mean gradient and mean loss over a mini-batch."""
    total = zeros_like(model)
    loss = 0.0
    for x, y in batch:
        add_scaled(total, backward(model, x, y), 1.0 / len(batch))
        loss += bce(forward(model, x)[1], y) / len(batch)
    return total, loss


def apply_weight_decay(grads, model):
    add_scaled(grads, {"W1": model["W1"], "b1": [0.0] * len(model["b1"]), "W2": model["W2"], "b2": 0.0},
               CONFIG.weight_decay)


def clip(grads):
    norm = grad_norm(grads)
    if norm > CONFIG.grad_clip:
        scale = CONFIG.grad_clip / norm
        clipped = zeros_like(grads)
        add_scaled(clipped, grads, scale)
        return clipped, norm
    return grads, norm


def train_model(model, train_data):
    """SGD with momentum, weight decay, clipping and per-epoch LR decay. Returns (model, history)."""
    model = copy_model(model)
    velocity = zeros_like(model)
    lr = CONFIG.learning_rate
    history = []
    for epoch in range(CONFIG.epochs):
        epoch_loss, n_batches, max_norm = 0.0, 0, 0.0
        for batch in iterate_minibatches(train_data, epoch):
            grads, loss = batch_gradient(model, batch)
            apply_weight_decay(grads, model)
            grads, norm = clip(grads)
            # velocity = momentum * velocity - lr * grads; params += velocity
            scaled = zeros_like(model)
            add_scaled(scaled, velocity, CONFIG.momentum)
            add_scaled(scaled, grads, -lr)
            velocity = scaled
            add_scaled(model, velocity, 1.0)
            epoch_loss += loss
            n_batches += 1
            max_norm = max(max_norm, norm)
        history.append({"epoch": epoch, "loss": round(epoch_loss / max(1, n_batches), 10), "lr": round(lr, 10),
                        "max_grad_norm": round(max_norm, 10)})
        if CONFIG.log_every and (epoch + 1) % CONFIG.log_every == 0:
            log(f"epoch {epoch + 1}/{CONFIG.epochs} loss {epoch_loss / max(1, n_batches):.4f} lr {lr:.4f}")
        lr *= CONFIG.lr_decay
    return model, history


def summarize_history(history):
    if not history:
        return {"first_loss": None, "last_loss": None, "best_epoch": None}
    best = min(history, key=lambda h: h["loss"])
    return {"first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "best_epoch": best["epoch"]}


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


def confusion(labels, probs):
    tp = fp = tn = fn = 0
    for y, p in zip(labels, probs):
        pred = 1 if p >= CONFIG.threshold else 0
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
    bins = CONFIG.n_calibration_bins
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
        "config": dataclasses.asdict(CONFIG),
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


if __name__ == "__main__":
    sys.exit(main())
