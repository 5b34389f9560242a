"""The parameter write-back with stochastic rounding (``stochastic_rounding=True``), as the
torch-ops paths (single-tensor, foreach, capturable) compute it.

For a bfloat16/float16 parameter ``p`` at an update step, the new value is formed in float32
from the update ``u`` (the stored momentum ``m``, already rounded to the parameter's dtype, or
what :mod:`adopt._variants` derives from it), as the fused
kernels form it, one rounding per operation (no fused multiply-add)::

    x = p * (1 - lr * wd)    (decoupled decay; skipped without)
    x = x - lr * u
    p = stochastic_round(x, bits(key, element index))

so an update far below half an ulp of ``p`` still moves it by the right amount on average,
where round-to-nearest would discard it every step.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from ._random import STREAM_PARAM, stochastic_round_, step_key


def host_key(seed: Tensor, step: int) -> int:
    """The parameter stream's key for a tensor at host step count ``step``."""
    return step_key(int(seed), step, STREAM_PARAM)


def device_key(seed: Tensor, step: Tensor) -> Tensor:
    """The same key from the state tensors, computed where they live (no synchronisation)."""
    return step_key(seed.to(torch.int64), step.to(torch.int64), STREAM_PARAM)


def rounded_values(param: Tensor, exp_avg: Tensor, lr: Union[float, Tensor], decay: Union[None, float, Tensor]) -> Tensor:
    """The float32 values ``x`` that the update writes into ``param`` (see the module doc)."""
    x = param.float()
    if decay is not None:
        x.mul_(decay)
    return x.sub_(exp_avg.float() * lr)  # out of place: a float32 exp_avg is not a copy


def write_rounded_(
    param: Tensor, exp_avg: Tensor, lr: Union[float, Tensor], decay: Union[None, float, Tensor],
    key: Union[int, Tensor], offset: int = 0,
) -> None:
    """One update step's write-back into ``param`` with stochastic rounding."""
    stochastic_round_(param, rounded_values(param, exp_avg, lr, decay), key, offset)


def write_rounded_where_(
    param: Tensor, exp_avg: Tensor, active: Tensor, lr: Union[float, Tensor], decay: Union[None, float, Tensor],
    key: Tensor, offset: int = 0,
) -> None:
    """The capturable form: ``active`` (0-d bool) selects the update; where it is False the
    parameter is rewritten unchanged (rounding a representable value returns it)."""
    x = param.float()
    if decay is not None:
        x = torch.where(active, x * decay, x)
    update = torch.where(active, exp_avg, 0).float() * lr
    stochastic_round_(param, x - update, key, offset)
