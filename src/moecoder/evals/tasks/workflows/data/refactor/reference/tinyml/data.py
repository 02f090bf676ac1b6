"""Synthetic two-moons data: generation, splitting, scaling, mini-batches."""

import math
import random

from .config import CONFIG


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
