"""One-hidden-layer tanh MLP with a sigmoid output, in pure Python."""

import math
import random

from .config import CONFIG


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
