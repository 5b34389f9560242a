"""An independent float64 model of the ADOPT rule, written from the specification.

Plain elementwise arithmetic on float64 tensors: no shared code with the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class OracleState:
    p: torch.Tensor
    m: torch.Tensor = field(init=False)
    v: torch.Tensor = field(init=False)
    s: int = 0

    def __post_init__(self) -> None:
        self.p = _real64(self.p)
        self.m = torch.zeros_like(self.p)
        self.v = torch.zeros_like(self.p)


def _real64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.to(torch.float64).clone()


def oracle_step(
    st: OracleState,
    grad: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    clip: Optional[Callable[[int], float]],
    weight_decay: float,
    decouple: bool,
    maximize: bool,
    caution: bool = False,
    nesterov: bool = False,
    lr_max: Optional[float] = None,
) -> None:
    """One step of the rule. ``caution``: the update keeps only the elements whose sign agrees
    with the gradient's, scaled by the inverse of their fraction (at least 1e-3);
    ``nesterov``: the update is ``beta1 * m + (1 - beta1) * n`` with the new ``m``;
    ``lr_max``: corrected decoupled decay, ``lr * (lr / lr_max) * weight_decay``."""
    g = _real64(grad)
    if maximize:
        g = -g
    if weight_decay != 0 and not decouple:
        g = g + weight_decay * st.p
    if st.s == 0:
        st.v = g * g
    else:
        if decouple:
            decay_lr = lr if lr_max is None else lr * lr / lr_max
            st.p = st.p * (1 - decay_lr * weight_decay)
        n = g / torch.sqrt(st.v).clamp(min=eps)
        if clip is not None:
            c = float(clip(st.s))
            n = n.clamp(-c, c)
        st.m = beta1 * st.m + (1 - beta1) * n  # no cancellation when beta1 is 0
        u = beta1 * st.m + (1 - beta1) * n if nesterov else st.m
        if caution:
            agree = (torch.sign(u) * torch.sign(g) > 0).to(torch.float64)  # the sign test, no underflow
            u = u * agree / max(float(agree.mean()), 1e-3)
        st.p = st.p - lr * u
        st.v = beta2 * st.v + (1 - beta2) * g * g
    st.s += 1


def quarter_power(s: int) -> float:
    return math.pow(s, 0.25)
