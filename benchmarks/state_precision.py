"""Measurements that chose the low-precision state formats (docs/state-precision.md).

Two experiments, both with the reference encoders of ``adopt/_state_formats.py`` (any
:class:`~adopt._state_formats.CodeFormat` can be tried, v stored as is or as its square root):

* ``tracking``: v is an EMA of g**2, stored in the candidate format (decoded, updated in
  float32, encoded again each step); halfway the gradient scale changes. Reported: the mean
  over elements of ``log(sqrt(v_stored) / sqrt(v_exact))`` (``v_exact`` an float64 EMA of the
  same g**2) after the change, its worst value over those steps, and its spread.
* ``training``: an MLP trained with ADOPT (float32 arithmetic) whose m and v are stored in
  the candidate formats; final training loss per seed, against full-precision state.

Run: ``PYTHONPATH=src python3 benchmarks/state_precision.py [tracking|training]``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from adopt import _state_formats as sf
from adopt._random import param_seed


@dataclass(frozen=True)
class Storage:
    """How one moment is stored: ``"full"`` (float32), ``"bf16"`` or an 8-bit ``fmt``;
    ``stochastic`` rounding or nearest; ``sqrt``: v stored as its square root."""

    kind: str
    fmt: Optional[sf.CodeFormat] = None
    stochastic: bool = True
    sqrt: bool = False

    @property
    def label(self) -> str:
        name = self.kind if self.fmt is None else self.fmt.name
        return f"{'sqrt-' if self.sqrt else ''}{name}-{'sr' if self.stochastic else 'rn'}" if self.kind != "full" else "full"

    def store(self, x: Tensor, moment: str, key: int) -> Tensor:
        """``x`` (float32) after a round trip through this storage."""
        if self.kind == "full":
            return x
        y = x.sqrt() if self.sqrt else x
        k = key if self.stochastic else None
        if self.kind == "bf16":
            out = sf.round_bf16(y, k).float()
        else:
            out = sf.dequantize(sf.quantize(y, moment, k, fmt=self.fmt), moment, fmt=self.fmt).view(x.shape)
        return out * out if self.sqrt else out


UE4M4 = sf.CodeFormat(False, 4, 4)
UE5M3 = sf.CodeFormat(False, 5, 3)
UE3M5 = sf.CodeFormat(False, 3, 5)
E4M3 = sf.CodeFormat(True, 4, 3)
E3M4 = sf.CodeFormat(True, 3, 4)


def simulate_tracking(
    storage: Storage,
    cases: Sequence[tuple[float, float]],
    *,
    steps_before: int = 500,
    steps_after: int = 1500,
    elements: int = 4096,
    spread: float = 100.0,
    steady: bool = True,
    seed: int = 0,
) -> Tensor:
    """The mean over elements of ``log(sqrt(v_stored / v_exact))`` at each step after the
    gradient scale changes, one row per case ``(beta2, factor)``: the cases run side by side
    in one tensor, ``elements`` each (whole blocks). Element ``i`` has gradients
    ``N(0, sigma_i**2)``, ``sigma_i`` log-uniform over a ``spread``, times ``factor`` after
    ``steps_before`` steps. v starts at ``sigma_i**2`` (``steady``: the state after many
    steps, so that only tracking is measured) or at ``g**2`` (ADOPT's first step: then the
    stored range within a block matters too)."""
    gen = torch.Generator().manual_seed(seed)
    count = len(cases)
    sigma = (spread ** -torch.rand(count, elements, generator=gen)).view(-1)
    beta2 = torch.tensor([b for b, _ in cases]).repeat_interleave(elements)
    factor = torch.tensor([f for _, f in cases]).repeat_interleave(elements)
    state_seed = param_seed(seed)
    v = storage.store(sigma * sigma, "exp_avg_sq", sf.state_key(state_seed, 0, "exp_avg_sq"))
    exact = (sigma * sigma).double()
    ratios = []
    for step in range(steps_before + steps_after):
        g = sigma * torch.randn(count * elements, generator=gen)
        if step >= steps_before:
            g = g * factor
        g2 = g * g
        if step == 0 and not steady:
            new, exact = g2, g2.double()
        else:
            new = beta2 * v + (1 - beta2) * g2
            exact = beta2.double() * exact + (1 - beta2.double()) * g2.double()
        v = storage.store(new, "exp_avg_sq", sf.state_key(state_seed, step + 1, "exp_avg_sq"))
        if step >= steps_before:
            ratios.append(0.5 * (v.double() / exact).log().view(count, elements).mean(dim=1))
    return torch.stack(ratios, dim=1)


TRACKING_CASES = [(0.999, 4.0), (0.999, 0.25), (0.9999, 4.0), (0.9999, 0.25)]


def tracking_table() -> None:
    """Print the tracking experiment for the candidate v storages."""
    candidates = [Storage("8bit", f, sr, sq) for f, sq in ((UE4M4, False), (UE5M3, False), (UE3M5, True), (UE4M4, True)) for sr in (True, False)]
    candidates += [Storage("bf16", None, sr) for sr in (True, False)]
    for steady in (True, False):
        print(f"v starts at {'sigma**2 (steady)' if steady else 'g**2 (first step)'}; mean / worst after the change")
        print("v storage       " + "".join(f"  b2={b} x{f:<5}   " for b, f in TRACKING_CASES))
        for storage in candidates:
            r = simulate_tracking(storage, TRACKING_CASES, steady=steady)
            worst = r.gather(1, r.abs().argmax(dim=1, keepdim=True)).squeeze(1)
            print(f"{storage.label:15s} " + "".join(f"  {a:+.3f} / {w:+.3f}  " for a, w in zip(r.mean(dim=1).tolist(), worst.tolist())), flush=True)


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


def train(m_store: Storage, v_store: Storage, seed: int, steps: int = 1500, lr: float = 1e-3) -> float:
    """Final training loss (mean of the last 100 steps) of an MLP fitting a random teacher,
    trained with ADOPT (betas 0.9, 0.9999, eps 1e-6, clip s**0.25) whose moments are kept in
    the given storages; tensors under ``MIN_8BIT_SIZE`` keep float32 state."""
    torch.manual_seed(seed)
    sizes = (32, 256, 256, 8)
    teacher, model = _MLP(sizes), _MLP(sizes)
    x_all = torch.randn(4096, sizes[0])
    with torch.no_grad():
        y_all = teacher(x_all) + 0.1 * torch.randn(4096, sizes[-1])
    params = list(model.parameters())
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    losses = []
    b1, b2, eps = 0.9, 0.9999, 1e-6
    for step in range(steps):
        idx = torch.randint(0, x_all.shape[0], (128,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(x_all[idx]), y_all[idx])
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


def training_table(seeds: int = 3) -> None:
    """Print the training comparison."""
    sr = Storage("8bit", UE4M4)
    m8 = Storage("8bit", E4M3)
    variants = [
        (Storage("full"), Storage("full")),
        (m8, sr),
        (m8, Storage("8bit", UE5M3)),
        (m8, Storage("8bit", UE3M5, sqrt=True)),
        (Storage("8bit", E3M4), sr),
        (Storage("8bit", E4M3, stochastic=False), sr),
        (m8, Storage("8bit", UE4M4, stochastic=False)),
        (Storage("8bit", E4M3, stochastic=False), Storage("8bit", UE4M4, stochastic=False)),
        (Storage("bf16"), Storage("bf16")),
        (Storage("bf16", stochastic=False), Storage("bf16")),
        (Storage("bf16", stochastic=False), Storage("bf16", stochastic=False)),
    ]
    base: list[float] = []
    print("m storage        v storage          final loss per seed          mean   vs full")
    for m_store, v_store in variants:
        start = time.time()
        losses = [train(m_store, v_store, seed) for seed in range(seeds)]
        if not base:
            base = losses
        rel = sum(a / b for a, b in zip(losses, base)) / seeds
        mean = sum(losses) / seeds
        per_seed = " ".join(f"{x:.5f}" for x in losses)
        print(f"{m_store.label:16s} {v_store.label:18s} {per_seed}  {mean:.5f} {rel:6.3f}  ({time.time() - start:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("experiment", nargs="?", choices=("tracking", "training", "all"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.experiment in ("tracking", "all"):
        tracking_table()
    if args.experiment in ("training", "all"):
        training_table()


if __name__ == "__main__":
    main()
