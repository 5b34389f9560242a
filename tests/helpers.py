"""Shared test drivers: a reproducible problem, ADOPT runs, oracle runs, the path table."""

from __future__ import annotations

from typing import Any, Optional

import torch

from adopt import ADOPT
from oracle import OracleState, oracle_step

# Every execution path as optimizer keyword arguments.
PATHS: dict[str, dict[str, Any]] = {
    "single": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
    "single-capturable": dict(foreach=False, capturable=True),
    "foreach-capturable": dict(foreach=True, capturable=True),
    "fused-capturable": dict(fused=True, capturable=True),
}

SHAPES = [(5,), (3, 4), (2,), (7,)]
SCALES = [1e-3, 1.0, 1e3, 1.0]


def grad_mask(step: int) -> list[bool]:
    """Which tensors get a gradient at this step: #0 always, #1 joins late, #2 skips every third."""
    return [True, step >= 2, step % 3 != 1, True]


def make_problem(
    steps: int, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[list[torch.Tensor], list[list[Optional[torch.Tensor]]]]:
    """Initial parameters and per-step gradients with uneven presence and very different scales.

    Tensor #3 starts at zero and its gradient has exact zeros, so ``v`` has zeros as well.
    """
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    init[3].zero_()
    grads = []
    for t in range(steps):
        row: list[Optional[torch.Tensor]] = []
        for i, (shape, scale) in enumerate(zip(SHAPES, SCALES)):
            if not grad_mask(t)[i]:
                row.append(None)
                continue
            g = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
            if i == 3:
                g[::2] = 0.0
            row.append(g)
        grads.append(row)
    to = (lambda t: t.to(dtype)) if not dtype.is_complex else (lambda t: torch.view_as_complex(torch.stack([t, t.flip(0)], -1)).to(dtype))
    return [to(p) for p in init], [[None if g is None else to(g) for g in row] for row in grads]


def run_adopt(
    init: list[torch.Tensor], grads: list[list[Optional[torch.Tensor]]], **kwargs: Any
) -> tuple[list[torch.Tensor], ADOPT]:
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = ADOPT(params, **kwargs)
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
    return [p.detach() for p in params], opt


def run_oracle(
    init: list[torch.Tensor], grads: list[list[Optional[torch.Tensor]]], **hp: Any
) -> list[OracleState]:
    states = [OracleState(p) for p in init]
    for row in grads:
        for st, g in zip(states, row):
            if g is not None:
                oracle_step(st, g, **hp)
    return states


def real64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (torch.view_as_real(t) if t.is_complex() else t).to(torch.float64)
