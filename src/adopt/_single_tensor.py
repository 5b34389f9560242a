"""Single-tensor ADOPT: one parameter at a time, the reference every other path matches.

Per tensor, with ``s`` its number of earlier steps (``state['step']``):

* ``g = -grad`` if maximize; ``g += wd * p`` for L2 weight decay (``decouple=False``)
* ``s == 0``: ``v = g * g``; nothing else changes
* ``s >= 1``: ``p *= 1 - lr * wd`` (decoupled), ``n = clamp(g / max(sqrt(v), eps), -c(s), c(s))``,
  ``m += (1 - beta1) * (n - m)``, ``p -= lr * m``, ``v = beta2 * v + (1 - beta2) * g * g``
* ``s += 1``

With ``capturable=True`` the ``s == 0`` case is selected arithmetically (``torch.where``) so the
step has no host synchronisation and no Python branch on tensor values.

With ``seeds`` (``stochastic_rounding=True``), bfloat16/float16 parameters are written back
with stochastic rounding (:mod:`adopt._rounding`); other dtypes are unaffected. ``nesterov``,
``caution`` and ``lr_max`` (corrected weight decay) change the update as
:mod:`adopt._variants` describes.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ._random import SR_DTYPES
from ._rounding import device_key, host_key, write_rounded_, write_rounded_where_
from ._variants import cautious, decay_lr
from .schedules import ClipSchedule


def single_tensor_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    *,
    has_complex: bool,
    beta1: float,
    beta2: float,
    lr: Union[float, Tensor],
    clip_lambda: Optional[ClipSchedule],
    weight_decay: float,
    decouple: bool,
    eps: float,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    seeds: Optional[list[Tensor]] = None,
    nesterov: bool = False,
    caution: bool = False,
    lr_max: Optional[float] = None,
) -> None:
    if grad_scale is not None or found_inf is not None:
        raise RuntimeError("the single-tensor path expects unscaled gradients (grad_scale/found_inf are fused-only)")
    if isinstance(lr, Tensor):
        lr = lr.reshape(())  # any 1-element shape broadcasts like a scalar

    # Host step counts and clip thresholds first: a schedule that raises must not leave a
    # half-updated group behind.
    host_steps: list[int] = []
    thresholds: list[Optional[Union[float, Tensor]]] = []
    for step_t in state_steps:
        if capturable:
            thresholds.append(None if clip_lambda is None else clip_lambda(step_t))
        else:
            s = int(step_t.item())
            host_steps.append(s)
            thresholds.append(None if clip_lambda is None or s == 0 else clip_lambda(s))

    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_sq, step_t = grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
        if maximize:
            grad = -grad
        if weight_decay != 0 and not decouple:
            grad = grad.add(param, alpha=weight_decay)

        rounded = seeds is not None and param.dtype in SR_DTYPES
        if capturable:
            _capturable_update(
                param, grad, exp_avg, exp_avg_sq, step_t, thresholds[i],
                beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay if decouple else 0.0, eps=eps,
                key=device_key(seeds[i], step_t) if rounded else None,  # type: ignore[index]
                nesterov=nesterov, caution=caution, lr_max=lr_max,
            )
        elif host_steps[i] == 0:
            exp_avg_sq.copy_(grad * grad)
        else:
            decay = 1 - decay_lr(lr, lr_max) * weight_decay if weight_decay != 0 and decouple else None
            if decay is not None and not rounded:
                param.mul_(decay)
            normed = grad / exp_avg_sq.sqrt().clamp(min=eps)
            clip = thresholds[i]
            if clip is not None:
                normed = normed.clamp(-clip, clip)  # type: ignore[arg-type]
            exp_avg.lerp_(normed, 1 - beta1)
            update = exp_avg.lerp(normed, 1 - beta1) if nesterov else exp_avg
            if caution:
                update = cautious(update, grad)
            if rounded:
                write_rounded_(param, update, lr, decay, host_key(seeds[i], host_steps[i]))  # type: ignore[index]
            elif isinstance(lr, Tensor):
                # Autograd saves the factor for lr's gradient; m changes in place next step.
                param.sub_((update.clone() if differentiable and update is exp_avg else update) * lr)
            else:
                param.add_(update, alpha=-lr)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_t += 1


def _capturable_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step_t: Tensor,
    clip: Optional[Union[float, Tensor]],
    *,
    beta1: float,
    beta2: float,
    lr: Union[float, Tensor],
    weight_decay: float,
    eps: float,
    key: Optional[Tensor] = None,
    nesterov: bool = False,
    caution: bool = False,
    lr_max: Optional[float] = None,
) -> None:
    """One tensor's update with the first-step rule as ``torch.where``: no sync, no branch.

    Each branch does the same arithmetic as the host path, so the two agree bit for bit.
    ``key``: write the parameter back with stochastic rounding, with this key.
    """
    active = step_t > 0
    decay = 1 - decay_lr(lr, lr_max) * weight_decay if weight_decay != 0 else None
    if decay is not None and key is None:
        param.copy_(torch.where(active, param * decay, param))
    normed = grad / exp_avg_sq.sqrt().clamp(min=eps)
    if clip is not None:
        normed = torch.clamp(normed, -clip, clip)  # type: ignore[arg-type]
    # At s == 0 this lerps m towards itself: m is unchanged, and an inf g/eps is never used.
    exp_avg.lerp_(torch.where(active, normed, exp_avg), 1 - beta1)
    # At s == 0 these may hold an inf g/eps; the selections below discard them.
    update = exp_avg.lerp(normed, 1 - beta1) if nesterov else exp_avg
    if caution:
        update = cautious(update, grad)
    if key is not None:
        write_rounded_where_(param, update, active, lr, decay, key)
    else:
        update = torch.where(active, update, 0)
        if isinstance(lr, Tensor):
            param.sub_(update * lr)
        else:
            param.add_(update, alpha=-lr)
    decayed = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg_sq.copy_(torch.where(active, decayed, grad * grad))
