"""Measurements that chose the low-precision state formats (docs/state-precision.md).

Two experiments, both with the reference encoders of ``adopt/_state_formats.py`` (any
:class:`~adopt._state_formats.CodeFormat` can be tried, v stored as is or as its square root):

* ``tracking``: v is an EMA of g**2, stored in the candidate format (decoded, updated in
  float32, encoded again each step); halfway the gradient scale changes. Reported: the mean
  over elements of ``log(sqrt(v_stored) / sqrt(v_exact))`` (``v_exact`` an float64 EMA of the
  same g**2) after the change, its worst value over those steps, and its spread.
* ``momentum``: the same for m, an EMA (beta1 0.9) of a consistent signal plus noise: the
  relative bias of the stored m along the signal.
* ``regression``, ``classification``: an MLP trained with ADOPT (float32 arithmetic) whose m and v are stored in
  the candidate formats; final training loss per seed, against full-precision state.

Run: ``PYTHONPATH=src python3 benchmarks/state_precision.py [tracking|momentum|regression|classification]``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from adopt import _state_formats as sf
from adopt._random import param_seed


@dataclass(frozen=True)
class Storage:
    """How one moment is stored: ``"full"`` (float32), ``"bf16"`` or an 8-bit ``fmt`` (a
    squared one for v stores its square root); ``stochastic`` rounding or nearest."""

    kind: str
    fmt: Optional[sf.CodeFormat] = None
    stochastic: bool = True

    @property
    def label(self) -> str:
        name = self.kind if self.fmt is None else self.fmt.name
        return f"{name}-{'sr' if self.stochastic else 'rn'}" if self.kind != "full" else "full"

    def store(self, x: Tensor, moment: str, key: int) -> Tensor:
        """``x`` (float32) after a round trip through this storage."""
        if self.kind == "full":
            return x
        k = key if self.stochastic else None
        if self.kind == "bf16":
            return sf.round_bf16(x, k).float()
        return sf.dequantize(sf.quantize(x, moment, k, fmt=self.fmt), moment, fmt=self.fmt).view(x.shape)


UE4M4 = sf.CodeFormat(False, 4, 4)
UE5M3 = sf.CodeFormat(False, 5, 3)
SQRT_UE4M4 = sf.CodeFormat(False, 4, 4, squared=True)
SQRT_UE3M5 = sf.CodeFormat(False, 3, 5, squared=True)
E4M3 = sf.CodeFormat(True, 4, 3)
E3M4 = sf.CodeFormat(True, 3, 4)


def simulate_tracking(
    storage: Storage,
    cases: Sequence[tuple[float, float, bool]],
    *,
    steps_before: int = 500,
    steps_after: int = 1500,
    elements: int = 4096,
    spread: float = 100.0,
    seed: int = 0,
) -> Tensor:
    """The mean over elements of ``log(sqrt(v_stored / v_exact))`` at each step after the
    gradient scale changes, one row per case ``(beta2, factor, steady)``; the cases run side
    by side in one tensor, ``elements`` each (whole blocks). Element ``i`` has gradients
    ``N(0, sigma_i**2)``, ``sigma_i`` log-uniform over a ``spread``, times ``factor`` after
    ``steps_before`` steps. v starts at ``sigma_i**2`` if ``steady`` (the state after many
    steps: only tracking is measured), else at ``g**2`` as in ADOPT's first step (at beta2
    0.9999 that sample dominates v for thousands of steps, so the range of values within a
    block is wider and the format's range matters too)."""
    gen = torch.Generator().manual_seed(seed)
    count = len(cases)
    sigma = (spread ** -torch.rand(count, elements, generator=gen)).view(-1)
    beta2 = torch.tensor([c[0] for c in cases]).repeat_interleave(elements)
    factor = torch.tensor([c[1] for c in cases]).repeat_interleave(elements)
    steady = torch.tensor([c[2] for c in cases]).repeat_interleave(elements)
    state_seed = param_seed(seed)
    g = sigma * torch.randn(count * elements, generator=gen)
    start = torch.where(steady, sigma * sigma, g * g)
    v = storage.store(start, "exp_avg_sq", sf.state_key(state_seed, 0, "exp_avg_sq"))
    exact = start.double()
    ratios = []
    for step in range(1, steps_before + steps_after + 1):
        g = sigma * torch.randn(count * elements, generator=gen)
        if step > steps_before:
            g = g * factor
        g2 = g * g
        new = beta2 * v + (1 - beta2) * g2
        exact = beta2.double() * exact + (1 - beta2.double()) * g2.double()
        v = storage.store(new, "exp_avg_sq", sf.state_key(state_seed, step, "exp_avg_sq"))
        if step > steps_before:
            ratios.append(0.5 * (v.double() / exact).log().view(count, elements).mean(dim=1))
    return torch.stack(ratios, dim=1)


TRACKING_CASES = [(b, f, steady) for steady in (True, False) for b in (0.999, 0.9999) for f in (4.0, 0.25)]


def tracking_table() -> None:
    """Print the tracking experiment for the candidate v storages."""
    candidates = [Storage("8bit", f, sr) for f in (UE4M4, UE5M3, SQRT_UE3M5, SQRT_UE4M4) for sr in (True, False)]
    candidates += [Storage("bf16", None, sr) for sr in (True, False)]
    print("mean / worst over the steps after the change; v starts at sigma**2 (steady) or g**2")
    print("v storage      " + "".join(f" b2={b} x{f:<4} {'steady' if st else 'g**2':6s}" for b, f, st in TRACKING_CASES))
    for storage in candidates:
        r = simulate_tracking(storage, TRACKING_CASES)
        worst = r.gather(1, r.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        print(f"{storage.label:14s} " + "".join(f"  {a:+.3f} / {w:+.3f}     " for a, w in zip(r.mean(dim=1).tolist(), worst.tolist())), flush=True)


def simulate_momentum(storage: Storage, noise: float, *, steps: int = 300, elements: int = 4096, seed: int = 0) -> tuple[float, float]:
    """m = EMA (beta1 0.9) of n = c_i + noise * |c_i| * N(0, 1), ``c_i`` of log-uniform
    magnitude over 100x and random sign, stored each step: the mean over elements and the
    last 100 steps of ``sign(c_i) * (m_stored - m_exact) / |c_i|``, the relative bias along
    the consistent direction (``m_exact`` in float64), and the RMS error relative to the RMS
    of m."""
    gen = torch.Generator().manual_seed(seed)
    c = 100 ** -torch.rand(elements, generator=gen) * torch.where(torch.rand(elements, generator=gen) < 0.5, -1.0, 1.0)
    m = torch.zeros(elements)
    exact = torch.zeros(elements, dtype=torch.float64)
    bias, err, size = [], [], []
    for step in range(1, steps + 1):
        n = c + noise * c.abs() * torch.randn(elements, generator=gen)
        m = storage.store(m + 0.1 * (n - m), "exp_avg", sf.state_key(param_seed(seed), step, "exp_avg"))
        exact = exact + 0.1 * (n.double() - exact)
        if step > steps - 100:
            bias.append(((m.double() - exact) * c.sign() / c.abs()).mean())
            err.append((m.double() - exact).square().mean())
            size.append(exact.square().mean())
    return float(torch.stack(bias).mean()), math.sqrt(float(torch.stack(err).mean() / torch.stack(size).mean()))


def momentum_table() -> None:
    """Print the momentum experiment for the candidate m storages."""
    candidates = [Storage("8bit", f, sr) for f in (E4M3, E3M4) for sr in (True, False)]
    candidates += [Storage("bf16", None, sr) for sr in (True, False)]
    print("m storage      relative bias along c / relative RMS error:  noise 0, 1, 10")
    for storage in candidates:
        cells = (simulate_momentum(storage, z) for z in (0.0, 1.0, 10.0))
        print(f"{storage.label:14s} " + "".join(f"   {b:+.4f} / {e:.4f}" for b, e in cells), flush=True)


class _MLP(torch.nn.Module):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.relu(x)
        return x


def train(m_store: Storage, v_store: Storage, seed: int, task: str = "regression", steps: int = 1500, lr: float = 1e-3) -> float:
    """Final training loss (mean of the last 100 steps) of an MLP fitting a random teacher:
    ``"regression"`` (MSE on the teacher's outputs plus noise) or ``"classification"``
    (cross-entropy on the teacher's argmax: the gradients shrink as the fit improves, so v
    must follow a falling scale). Trained with ADOPT (betas 0.9, 0.9999, eps 1e-6, clip
    s**0.25) whose moments are kept in the given storages; tensors under ``MIN_8BIT_SIZE``
    keep float32 state. Data, initialisation and batches depend on ``seed`` only."""
    torch.manual_seed(seed)
    sizes = (32, 128, 128, 8)
    teacher, model = _MLP(sizes), _MLP(sizes)
    x_all = torch.randn(4096, sizes[0])
    with torch.no_grad():
        if task == "regression":
            y_all = teacher(x_all) + 0.1 * torch.randn(4096, sizes[-1])
        else:
            y_all = teacher(x_all).argmax(dim=1)
    loss_fn = torch.nn.functional.mse_loss if task == "regression" else torch.nn.functional.cross_entropy
    params = list(model.parameters())
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    losses = []
    b1, b2, eps = 0.9, 0.9999, 1e-6
    for step in range(steps):
        idx = torch.randint(0, x_all.shape[0], (128,), generator=gen)
        loss = loss_fn(model(x_all[idx]), y_all[idx])
        model.zero_grad()
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for ordinal, p in enumerate(params):
                g = p.grad
                assert g is not None
                small = p.numel() < sf.MIN_8BIT_SIZE
                vstore = Storage("full") if small and v_store.kind == "8bit" else v_store
                mstore = Storage("full") if small and m_store.kind == "8bit" else m_store
                pseed = param_seed(ordinal)
                if step == 0:
                    vs[ordinal] = vstore.store(g * g, "exp_avg_sq", sf.state_key(pseed, step, "exp_avg_sq"))
                    continue
                n = (g / vs[ordinal].sqrt().clamp(min=eps)).clamp(-(step**0.25), step**0.25)
                m = ms[ordinal] + (1 - b1) * (n - ms[ordinal])
                p.sub_(lr * m)
                ms[ordinal] = mstore.store(m, "exp_avg", sf.state_key(pseed, step, "exp_avg"))
                vs[ordinal] = vstore.store(b2 * vs[ordinal] + (1 - b2) * g * g, "exp_avg_sq", sf.state_key(pseed, step, "exp_avg_sq"))
    return sum(losses[-100:]) / 100


def training_table(task: str, steps: int, seeds: int = 3) -> None:
    """Print the training comparison."""
    v8 = Storage("8bit", SQRT_UE4M4)
    m8 = Storage("8bit", E4M3)
    variants = [
        (Storage("full"), Storage("full")),
        (m8, v8),
        (m8, Storage("8bit", UE4M4)),
        (m8, Storage("8bit", UE5M3)),
        (m8, Storage("8bit", SQRT_UE3M5)),
        (Storage("8bit", E3M4), v8),
        (Storage("8bit", E4M3, stochastic=False), v8),
        (m8, Storage("8bit", SQRT_UE4M4, stochastic=False)),
        (Storage("8bit", E4M3, stochastic=False), Storage("8bit", SQRT_UE4M4, stochastic=False)),
        (Storage("bf16"), Storage("bf16")),
        (Storage("bf16", stochastic=False), Storage("bf16")),
        (Storage("bf16", stochastic=False), Storage("bf16", stochastic=False)),
    ]
    base: list[float] = []
    print(f"{task}, {steps} steps")
    print("m storage        v storage          final loss per seed          mean   vs full")
    for m_store, v_store in variants:
        start = time.time()
        losses = [train(m_store, v_store, seed, task, steps) for seed in range(seeds)]
        if not base:
            base = losses
        rel = sum(a / b for a, b in zip(losses, base)) / seeds
        mean = sum(losses) / seeds
        per_seed = " ".join(f"{x:.5f}" for x in losses)
        print(f"{m_store.label:16s} {v_store.label:18s} {per_seed}  {mean:.5f} {rel:6.3f}  ({time.time() - start:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("experiment", nargs="?", choices=("tracking", "momentum", "regression", "classification", "all"), default="all")
    parser.add_argument("--steps", type=int, default=1500, help="training steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.experiment in ("tracking", "all"):
        tracking_table()
    if args.experiment in ("momentum", "all"):
        momentum_table()
    for task in ("regression", "classification"):
        if args.experiment in (task, "all"):
            training_table(task, args.steps)


if __name__ == "__main__":
    main()
