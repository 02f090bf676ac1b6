"""SGD with momentum, weight decay, clipping and per-epoch LR decay."""

import math

from .config import CONFIG, log
from .data import iterate_minibatches
from .model import add_scaled, backward, copy_model, forward, grad_norm, zeros_like


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
