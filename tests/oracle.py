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
) -> None:
    g = _real64(grad)
    if maximize:
        g = -g
    if weight_decay != 0 and not decouple:
        g = g + weight_decay * st.p
    if st.s == 0:
        st.v = g * g
    else:
        if decouple:
            st.p = st.p * (1 - lr * weight_decay)
        n = g / torch.sqrt(st.v).clamp(min=eps)
        if clip is not None:
            c = float(clip(st.s))
            n = n.clamp(-c, c)
        st.m = st.m + (1 - beta1) * (n - st.m)
        st.p = st.p - lr * st.m
        st.v = beta2 * st.v + (1 - beta2) * g * g
    st.s += 1


def quarter_power(s: int) -> float:
    return math.pow(s, 0.25)
