"""Pure bfloat16 training with and without stochastic rounding, against float32.

Two tasks, each trained three ways with ADOPT at the same learning rate:

* ``float32``: float32 parameters (the reference);
* ``bfloat16, nearest``: the parameters stored in bfloat16 (no float32 master copy; forward,
  backward and update in bfloat16) and written back with round-to-nearest;
* ``bfloat16, stochastic``: the same with ``stochastic_rounding=True``.

An update smaller than half a bfloat16 ulp of its parameter (2**-8 relative) is lost under
round-to-nearest; stochastic rounding keeps it in expectation. The learning rates are ones at
which that visibly costs nearest rounding (measured, see docs/low-precision.md). The tasks are
the digits MLP of :mod:`adopt.demo.digits` and the character-level language model of
:mod:`adopt.demo.charlm`. A variant "matches float32" when its mean final loss is within
max(2 %, 2 seed standard deviations) of float32's (the larger of the two variants' stds).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Mapping

import torch
from torch.optim import Optimizer

from adopt import ADOPT

from . import charlm, digits

VARIANTS: dict[str, tuple[torch.dtype, bool]] = {
    "float32": (torch.float32, False),
    "bfloat16, nearest": (torch.bfloat16, False),
    "bfloat16, stochastic": (torch.bfloat16, True),
}
DIGITS_LR = 1e-3  # the digits experiment's own
LM_LR = 3e-4
RELATIVE_TOLERANCE = 0.02
SIGMAS = 2.0


def train_digits(
    optimizer_kwargs: Mapping[str, Any], dtype: torch.dtype, epochs: int, seeds: int, device: torch.device,
    progress: Callable[[int], Any] | None = None,
    optimizer_class: Callable[..., Optimizer] = ADOPT,
) -> dict[str, Any]:
    """The digits MLP with parameters stored in ``dtype``, trained by
    ``optimizer_class(params, **optimizer_kwargs)`` (default ``ADOPT``).

    Initialisation and minibatch order are those of :func:`adopt.demo.digits.run_digits`.
    The training and test losses reported are computed in float32 from the stored weights
    after every epoch (epoch 0: initialisation): ``[seeds][epochs + 1]``.
    """
    x_train, y_train, x_test, y_test = digits.load_data(device)
    n_train = x_train.shape[0]
    init = digits._init_weights(seeds, x_train.shape[1], int(y_train.max()) + 1, device)
    orders = digits._batch_orders(seeds, epochs, n_train).to(device)
    weights = [w.to(dtype).requires_grad_(True) for w in init]
    optimizer = optimizer_class(weights, **optimizer_kwargs)
    inputs = x_train.to(dtype)
    curves: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def evaluate() -> None:
        with torch.no_grad():
            as_float = [w.float() for w in weights]
            curves["train"].append(digits._losses(as_float, x_train, y_train))
            curves["val"].append(digits._losses(as_float, x_test, y_test))

    evaluate()
    for epoch in range(epochs):
        for start in range(0, n_train, digits.BATCH_SIZE):
            idx = orders[epoch, :, start : start + digits.BATCH_SIZE]
            optimizer.zero_grad(set_to_none=True)
            digits._losses(weights, inputs[idx], y_train[idx]).sum().backward()
            optimizer.step()
        evaluate()
        if progress is not None:
            progress(1)
    train = torch.stack(curves["train"], dim=1).double().cpu()
    val = torch.stack(curves["val"], dim=1).double().cpu()
    return {
        "steps": list(range(epochs + 1)),
        "train_loss": train.tolist(),
        "val_loss": val.tolist(),
        "final_train_loss": train[:, -1].tolist(),
        "final_val_loss": val[:, -1].tolist(),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(runs: dict[str, dict[str, Any]], reference: str = "float32") -> dict[str, Any]:
    """Per variant and split: mean and std of the final loss over seeds, its change relative
    to the ``reference`` variant (``relative_to_<reference>``), the tolerance max(2 %,
    2 sigma) and whether it is met (``matches_<reference>``)."""
    summary: dict[str, Any] = {}
    for split in ("train", "val"):
        ref_mean, ref_std = _mean_std(runs[reference][f"final_{split}_loss"])
        for name, run in runs.items():
            mean, std = _mean_std(run[f"final_{split}_loss"])
            tolerance = max(RELATIVE_TOLERANCE * ref_mean, SIGMAS * max(std, ref_std))
            summary.setdefault(name, {})[split] = {
                "mean": mean,
                "std": std,
                f"relative_to_{reference}": mean / ref_mean - 1,
                "tolerance": tolerance,
                f"matches_{reference}": abs(mean - ref_mean) <= tolerance,
            }
    return summary


def run_precision(
    lm_steps: int,
    epochs: int,
    seeds: int,
    device: torch.device,
    progress: Callable[[int, str], Any],
) -> dict[str, Any]:
    """Both tasks in every variant; a JSON-ready dict of the setup, the curves and the summary."""
    corpus = charlm.load_corpus()
    cfg = charlm.CharLMConfig()
    tasks: dict[str, Any] = {}
    bar = progress(len(VARIANTS) * (epochs + lm_steps), "precision")
    runs = {}
    for name, (dtype, rounding) in VARIANTS.items():
        runs[name] = train_digits(
            {"lr": DIGITS_LR, "stochastic_rounding": rounding}, dtype, epochs, seeds, device, bar.update
        )
    tasks["digits"] = {
        "setup": {"model": f"MLP 64-{digits.HIDDEN}-10, ReLU (adopt.demo.digits)", "lr": DIGITS_LR,
                  "epochs": epochs, "batch_size": digits.BATCH_SIZE, "val": "the 25 % test split",
                  "unit": "epoch"},
        "runs": runs,
        "summary": compare(runs),
    }
    runs = {}
    for name, (dtype, rounding) in VARIANTS.items():
        runs[name] = charlm.train_charlm(
            {"lr": LM_LR, "stochastic_rounding": rounding}, dtype, lm_steps, seeds, corpus, cfg, device,
            progress=bar.update,
        )
    tasks["charlm"] = {
        "setup": {**charlm.describe(corpus, cfg), "lr": LM_LR, "steps": lm_steps, "unit": "step"},
        "runs": runs,
        "summary": compare(runs),
    }
    bar.close()
    return {
        "setup": {
            "seeds": seeds,
            "variants": {n: {"dtype": str(d).removeprefix("torch."), "stochastic_rounding": r}
                         for n, (d, r) in VARIANTS.items()},
            "optimizer": "ADOPT at its defaults but lr (default path for the device)",
            "criterion": f"|mean - float32 mean| <= max({RELATIVE_TOLERANCE:.0%} of float32 mean,"
            f" {SIGMAS:g} x the larger seed std)",
            "losses": "cross-entropy in nats, computed in float32 from the stored weights",
        },
        "tasks": tasks,
    }
