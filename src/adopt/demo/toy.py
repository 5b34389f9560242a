"""The ADOPT paper's synthetic counterexample (its Figure 1), every seed in one tensor.

Minimise f(θ) = θ on [-1, 1] (optimum θ* = -1) from stochastic gradients that are k² with
probability 1/k and -k otherwise (mean 1). Adam's update divides each gradient by a second
moment that already contains it, which shrinks the rare large gradient more than the frequent
small ones: for small β2 Adam drifts to θ = +1. ADOPT divides by the *previous* second moment,
so its expected update points the right way for any β2.

Each (optimizer, β2) pair owns one parameter tensor of shape ``[seeds]``; element ``i`` is the
run of seed ``i``. The optimizers are elementwise, so the batch is exactly ``seeds`` separate
runs, and all of them see the same gradient stream (common random numbers).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from adopt import ADOPT

K = 10
BETA1 = 0.9
BETA2S = (0.1, 0.5, 0.9, 0.999)
OPTIMIZERS = ("Adam", "AMSGrad", "ADOPT (no clip)", "ADOPT (default clip)")
# The default clip s**0.25 passes a normalised gradient of k - 1 only once s > (k - 1)**4.
CLIP_CATCH_UP_STEP = (K - 1) ** 4
_CHECKPOINTS = 250  # recorded points per trajectory
_RANDOM_CHUNK = 1024  # steps of uniform draws generated at once
TURN_TOLERANCE = 0.05  # mean θ within this of its peak still counts as "at the peak"


def step_size(t: int) -> float:
    """The paper's decaying step size α_t = 0.01 / sqrt(1 + 0.01 t)."""
    return 0.01 / math.sqrt(1.0 + 0.01 * t)


def _make_optimizer(name: str, params: list[Tensor]) -> Optimizer:
    """One optimizer per algorithm with one parameter group (and tensor) per β2."""
    groups: list[dict[str, Any]] = [{"params": [p], "betas": (BETA1, b2)} for p, b2 in zip(params, BETA2S)]
    lr = step_size(0)
    if name == "Adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "AMSGrad":
        return torch.optim.Adam(groups, lr=lr, amsgrad=True)
    if name == "ADOPT (no clip)":
        return ADOPT(groups, lr=lr, clip_lambda=None)
    if name == "ADOPT (default clip)":
        return ADOPT(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def run_toy(
    steps: int,
    seeds: int,
    device: torch.device,
    progress: Callable[[int, str], Any],
) -> dict[str, Any]:
    """Run every optimizer at every β2 for ``steps`` steps on ``seeds`` seeds.

    ``progress(total, description)`` returns a tqdm-like bar (``update``/``close``).

    Returns a JSON-ready dict: the setup, the recorded steps, and per optimizer and β2 the
    mean and 10th/90th percentiles of θ over seeds at each recorded step, the final θ of
    every seed, the step at which the mean θ peaked, and the last step at which it was
    still within ``TURN_TOLERANCE`` of that peak (where it turned down).
    """
    generator = torch.Generator(device=device).manual_seed(0)
    params = {name: [torch.zeros(seeds, device=device, requires_grad=True) for _ in BETA2S] for name in OPTIMIZERS}
    optimizers = {name: _make_optimizer(name, ps) for name, ps in params.items()}
    flat = [p for name in OPTIMIZERS for p in params[name]]
    grads = [torch.zeros_like(p) for p in flat]
    for p, g in zip(flat, grads):
        p.grad = g

    record_every = max(1, steps // _CHECKPOINTS)
    recorded_steps = [0]
    snapshots = [torch.stack([p.detach() for p in flat])]
    bar = progress(steps, "toy problem")
    for t in range(steps):
        if t % _RANDOM_CHUNK == 0:
            uniforms = torch.rand(min(_RANDOM_CHUNK, steps - t), seeds, generator=generator, device=device)
        rare = uniforms[t % _RANDOM_CHUNK] < 1.0 / K
        grad = torch.where(rare, float(K * K), float(-K))
        lr = step_size(t)
        # a copy each, so no optimizer can alter another's gradient
        torch._foreach_copy_(grads, [grad] * len(grads))
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        with torch.no_grad():
            torch._foreach_clamp_min_(flat, -1.0)
            torch._foreach_clamp_max_(flat, 1.0)
        if (t + 1) % record_every == 0 or t + 1 == steps:
            recorded_steps.append(t + 1)
            snapshots.append(torch.stack([p.detach() for p in flat]))
        bar.update(1)
    bar.close()

    # [checkpoints, optimizer * beta2, seeds] -> per-config statistics over seeds
    theta = torch.stack(snapshots).cpu().double()
    mean = theta.mean(dim=2)
    p10, p90 = torch.quantile(theta, torch.tensor([0.1, 0.9], dtype=theta.dtype), dim=2)
    results: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(OPTIMIZERS):
        results[name] = {}
        for j, b2 in enumerate(BETA2S):
            c = i * len(BETA2S) + j
            final = theta[-1, c]
            peak = int(mean[:, c].argmax())
            # last recorded step still within TURN_TOLERANCE of the peak: where the mean turned down
            near_peak = (mean[:, c] >= mean[peak, c] - TURN_TOLERANCE).nonzero().flatten()
            results[name][str(b2)] = {
                "mean": mean[:, c].tolist(),
                "p10": p10[:, c].tolist(),
                "p90": p90[:, c].tolist(),
                "final": final.tolist(),
                "final_mean": float(final.mean()),
                "final_std": float(final.std()) if seeds > 1 else 0.0,
                "peak_step": recorded_steps[peak],
                "peak_mean": float(mean[peak, c]),
                "turn_step": recorded_steps[int(near_peak[-1])],
            }
    return {
        "setup": {
            "objective": "f(theta) = theta on [-1, 1], optimum theta* = -1",
            "gradient": f"{K * K} with probability 1/{K}, else -{K} (mean 1)",
            "k": K,
            "theta0": 0.0,
            "beta1": BETA1,
            "beta2s": list(BETA2S),
            "step_size": "0.01 / sqrt(1 + 0.01 t)",
            "steps": steps,
            "seeds": seeds,
            "clip_catch_up_step": CLIP_CATCH_UP_STEP,
        },
        "steps": recorded_steps,
        "optimizers": results,
    }
