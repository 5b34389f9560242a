"""The optional parts of the rule, as the torch-op paths (single-tensor, foreach) compute them.

All three are off by default, and off they change nothing (not a bit):

* ``nesterov=True`` (optax's contrib ADOPT): the update is ``lerp(m, n, 1 - beta1)`` with the
  new ``m``, i.e. ``beta1 * m + (1 - beta1) * n``, the same lerp that updates ``m``.
* ``caution=True`` (Liang et al. 2024, "Cautious Optimizers"; timm's ``caution``,
  pytorch_optimizer's ``cautious``): the update ``u`` keeps only the elements whose sign
  agrees with the gradient's (``u * g > 0``, as an exact sign test: a product that underflows
  does not mask), scaled by ``w = 1 / max(k / numel, 1e-3)``, ``k`` the number kept, over the
  whole tensor (complex tensors as their real view). ``k / numel``, the floor and ``w`` are
  rounded in float32 (float64 for float64 tensors); the update is ``u * (w or 0)``, so a
  non-finite ``u`` still reaches the parameter.
* ``corrected_weight_decay=True`` (Defazio et al. 2025; timm's ``corrected_weight_decay``):
  decoupled decay ``p *= 1 - (lr * lr / lr_max) * weight_decay``, ``lr_max`` the group's lr
  when the optimizer was built (``group["lr_max"]``), so decay follows the schedule's shape
  rather than its scale.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

# Floor of the kept fraction in the cautious rescaling (timm's and pytorch_optimizer's).
CAUTION_FLOOR = 1e-3

_Lr = Union[float, Tensor]


def decay_lr(lr: _Lr, lr_max: Optional[float]) -> _Lr:
    """The learning rate that multiplies the decoupled weight decay: ``lr``, or
    ``lr * lr / lr_max`` with corrected weight decay."""
    return lr if lr_max is None else lr * lr / lr_max


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the caution fraction is rounded in: float64 for float64 tensors, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def agreement(update: Tensor, grad: Tensor, negate: bool = False) -> Tensor:
    """Where ``update`` and ``grad`` (``-grad`` if ``negate``) have the same nonzero sign."""
    signs = torch.sign(update) * torch.sign(grad)
    return signs < 0 if negate else signs > 0


def caution_weight(kept: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    """``1 / max(kept / numel, 1e-3)`` as a 0-d tensor of ``dtype``, on ``kept``'s device
    (``kept``: the count, a 0-d integer tensor; no host synchronisation)."""
    fraction = kept.to(dtype) / numel
    return torch.reciprocal(fraction.clamp_min(CAUTION_FLOOR))


def cautious(update: Tensor, grad: Tensor) -> Tensor:
    """The cautious update of one whole tensor: ``update * where(agree, w, 0)``."""
    agree = agreement(update, grad)
    return masked(update, agree, caution_weight(agree.sum(), agree.numel(), compute_dtype(update)))


def masked(update: Tensor, agree: Tensor, weight: Tensor) -> Tensor:
    """``update * where(agree, weight, 0)`` for a part of a tensor whose ``weight`` is known."""
    return update * torch.where(agree, weight, 0)
