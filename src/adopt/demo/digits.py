"""A small MLP on scikit-learn's digits, trained with ADOPT, Adam and AdamW over several seeds.

The seeds of one optimizer are trained together: every weight has a leading ``[seeds]``
dimension and the layers use batched matrix products. The optimizers are elementwise and the
loss is a sum of per-seed losses, so this is exactly ``seeds`` independent trainings, each
with its own initialisation and minibatch order (shared across optimizers for fairness).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import Optimizer

from adopt import ADOPT

HIDDEN = 128
BATCH_SIZE = 32
LR = 1e-3
TEST_FRACTION = 0.25
OPTIMIZERS = ("ADOPT", "Adam", "AdamW")
# Setting name -> β2 override (None keeps each optimizer's default β2).
SETTINGS: dict[str, float | None] = {"default beta2": None, "beta2 = 0.5": 0.5}
DEFAULT_BETAS = {"ADOPT": (0.9, 0.9999), "Adam": (0.9, 0.999), "AdamW": (0.9, 0.999)}


def load_data(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits (8x8 images, 10 classes), stratified 75/25 split, standardised on the train part."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]
    from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=0)
    scaler = StandardScaler().fit(x_train)

    def features(a: Any) -> Tensor:
        return torch.as_tensor(scaler.transform(a), dtype=torch.float32, device=device)

    def labels(a: Any) -> Tensor:
        return torch.as_tensor(a, dtype=torch.long, device=device)

    return features(x_train), labels(y_train), features(x_test), labels(y_test)


def _init_weights(seeds: int, d_in: int, d_out: int, device: torch.device) -> list[Tensor]:
    """Per-seed weights [seeds, 64, H], [seeds, 1, H], [seeds, H, 10], [seeds, 1, 10].

    Uniform in ±1/sqrt(fan_in) as ``torch.nn.Linear`` does; seed ``i`` uses generator seed ``i``.
    """
    shapes = [(d_in, HIDDEN), (1, HIDDEN), (HIDDEN, d_out), (1, d_out)]
    fan_ins = [d_in, d_in, HIDDEN, HIDDEN]
    per_seed = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        per_seed.append([(torch.rand(s, generator=g) * 2 - 1) / math.sqrt(f) for s, f in zip(shapes, fan_ins)])
    return [torch.stack([w[i] for w in per_seed]).to(device) for i in range(len(shapes))]


def _forward(weights: list[Tensor], x: Tensor) -> Tensor:
    """Logits [seeds, batch, 10] for inputs [seeds, batch, 64] (or [batch, 64], shared)."""
    w1, b1, w2, b2 = weights
    if x.dim() == 2:
        x = x.expand(w1.shape[0], -1, -1)
    return torch.baddbmm(b2, torch.baddbmm(b1, x, w1).relu(), w2)


def _losses(weights: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of each seed's model, shape [seeds]; ``y`` is [seeds, batch] or [batch]."""
    logits = _forward(weights, x)
    seeds, batch, classes = logits.shape
    y = y.expand(seeds, batch)
    per_example = F.cross_entropy(logits.reshape(-1, classes), y.reshape(-1), reduction="none")
    return per_example.view(seeds, batch).mean(dim=1)


def _make_optimizer(name: str, params: list[Tensor], beta2: float | None) -> Optimizer:
    """The optimizer at its defaults, lr ``LR``, with β2 replaced when ``beta2`` is given."""
    betas = DEFAULT_BETAS[name] if beta2 is None else (DEFAULT_BETAS[name][0], beta2)
    if name == "ADOPT":
        return ADOPT(params, lr=LR, betas=betas)
    if name == "Adam":
        return torch.optim.Adam(params, lr=LR, betas=betas)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=LR, betas=betas)
    raise ValueError(f"unknown optimizer {name!r}")


def _batch_orders(seeds: int, epochs: int, n: int) -> Tensor:
    """Minibatch order of each seed for each epoch, [epochs, seeds, n]."""
    orders = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(10_000 + seed)
        orders.append(torch.stack([torch.randperm(n, generator=g) for _ in range(epochs)]))
    return torch.stack(orders, dim=1)


def run_digits(
    epochs: int,
    seeds: int,
    device: torch.device,
    progress: Callable[[int, str], Any],
) -> dict[str, Any]:
    """Train every optimizer in every setting; return a JSON-ready dict of the numbers.

    Per setting and optimizer: the full training-set loss of each seed after every epoch
    (epoch 0 = initialisation), its mean and std over seeds, and each seed's test accuracy
    with their mean and std.
    """
    x_train, y_train, x_test, y_test = load_data(device)
    n_train = x_train.shape[0]
    init = _init_weights(seeds, x_train.shape[1], int(y_train.max()) + 1, device)
    orders = _batch_orders(seeds, epochs, n_train).to(device)

    bar = progress(len(SETTINGS) * len(OPTIMIZERS) * epochs, "digits MLP")
    results: dict[str, dict[str, Any]] = {}
    for setting, beta2 in SETTINGS.items():
        results[setting] = {}
        for name in OPTIMIZERS:
            weights = [w.clone().requires_grad_(True) for w in init]
            optimizer = _make_optimizer(name, weights, beta2)
            curve = []
            with torch.no_grad():
                curve.append(_losses(weights, x_train, y_train))
            for epoch in range(epochs):
                for start in range(0, n_train, BATCH_SIZE):
                    idx = orders[epoch, :, start : start + BATCH_SIZE]
                    optimizer.zero_grad(set_to_none=True)
                    _losses(weights, x_train[idx], y_train[idx]).sum().backward()
                    optimizer.step()
                with torch.no_grad():
                    curve.append(_losses(weights, x_train, y_train))
                bar.update(1)
            with torch.no_grad():
                accuracy = (_forward(weights, x_test).argmax(dim=2) == y_test).double().mean(dim=1)
            loss = torch.stack(curve).cpu().double()  # [epochs + 1, seeds]
            accuracy = accuracy.cpu()
            results[setting][name] = {
                "betas": list(DEFAULT_BETAS[name] if beta2 is None else (DEFAULT_BETAS[name][0], beta2)),
                "train_loss_mean": loss.mean(dim=1).tolist(),
                "train_loss_std": (loss.std(dim=1) if seeds > 1 else torch.zeros(epochs + 1)).tolist(),
                "train_loss": loss.T.tolist(),
                "test_accuracy": accuracy.tolist(),
                "test_accuracy_mean": float(accuracy.mean()),
                "test_accuracy_std": float(accuracy.std()) if seeds > 1 else 0.0,
            }
    bar.close()
    return {
        "setup": {
            "data": "sklearn.datasets.load_digits: 1797 8x8 images, 10 classes",
            "split": f"stratified, test fraction {TEST_FRACTION}, standardised on the train part",
            "train_size": n_train,
            "test_size": int(x_test.shape[0]),
            "model": f"MLP 64-{HIDDEN}-10, ReLU",
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "epochs": epochs,
            "seeds": seeds,
            "optimizers": "torch defaults otherwise (AdamW weight_decay 0.01; ADOPT default clip)",
        },
        "settings": {s: (b if b is not None else "default") for s, b in SETTINGS.items()},
        "results": results,
    }
