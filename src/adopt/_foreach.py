"""Multi-tensor (foreach) ADOPT: the single-tensor rule over lists, grouped by device and dtype.

Every tensor keeps its own step count. Host steps split each group into tensors taking their
first step (``v = g * g``) and tensors taking a real update, and the clip threshold is given
per tensor, so a parameter that joins late or skips steps is updated exactly as the
single-tensor path would update it. With ``capturable=True`` the split is arithmetic on
per-tensor 0-d masks instead, with no host synchronisation.
"""

from __future__ import annotations

from typing import Optional, Union, cast

import torch
from torch import Tensor

from ._grouping import group_tensors
from .schedules import ClipSchedule, device_thresholds, host_thresholds


def foreach_adopt(
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
) -> None:
    if grad_scale is not None or found_inf is not None:
        raise RuntimeError("the foreach path expects unscaled gradients (grad_scale/found_inf are fused-only)")
    if differentiable:
        raise RuntimeError("the foreach path does not support differentiable=True (foreach ops have no autograd)")
    if isinstance(lr, Tensor):
        if not capturable:
            raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
        lr = lr.reshape(())
    if not params:
        return

    groups = group_tensors(params, grads, exp_avgs, exp_avg_sqs, state_steps, has_complex)
    # Read host steps and run the clip schedule for every group before touching any tensor.
    host_steps: list[list[int]] = []
    clips: list[Optional[Union[list[float], Tensor]]] = []
    for group in groups:
        if capturable:
            host_steps.append([])
            clips.append(None if clip_lambda is None else device_thresholds(clip_lambda, group.steps))
        else:
            counts = [int(s.item()) for s in group.steps]
            host_steps.append(counts)
            clips.append(None if clip_lambda is None else host_thresholds(clip_lambda, counts))

    for group, counts, clip in zip(groups, host_steps, clips):
        dev_grads = group.grads
        if maximize:
            dev_grads = list(torch._foreach_neg(dev_grads))
        if weight_decay != 0 and not decouple:
            dev_grads = list(torch._foreach_add(dev_grads, group.params, alpha=weight_decay))
        decoupled_wd = weight_decay if decouple else 0.0
        if capturable:
            _capturable_group(group.params, dev_grads, group.exp_avgs, group.exp_avg_sqs, group.steps,
                              cast(Optional[Tensor], clip), beta1=beta1, beta2=beta2, lr=lr,
                              weight_decay=decoupled_wd, eps=eps)
        else:
            _host_group(group.params, dev_grads, group.exp_avgs, group.exp_avg_sqs, counts,
                        cast(Optional[list[float]], clip), beta1=beta1, beta2=beta2, lr=cast(float, lr),
                        weight_decay=decoupled_wd, eps=eps)
        if group.steps[0].is_cpu:
            # One wrapped scalar instead of re-wrapping 1 for every tensor on the slow CPU path.
            torch._foreach_add_(group.steps, torch.tensor(1.0), alpha=1.0)
        else:
            torch._foreach_add_(group.steps, 1)


def _host_group(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    host_steps: list[int],
    clip: Optional[list[float]],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
) -> None:
    """The rule with the first-step/update split done on the host; ``weight_decay`` is decoupled."""
    first = [i for i, s in enumerate(host_steps) if s == 0]
    if first:
        g = [grads[i] for i in first]
        # Per-tensor copy_: DTensor (FSDP2) has no sharding rule for aten._foreach_copy_.
        for i, sq in zip(first, torch._foreach_mul(g, g)):
            exp_avg_sqs[i].copy_(sq)
    if len(first) == len(host_steps):
        return
    if first:
        keep = [i for i, s in enumerate(host_steps) if s != 0]
        params, grads, exp_avgs, exp_avg_sqs = (
            [ts[i] for i in keep] for ts in (params, grads, exp_avgs, exp_avg_sqs)
        )
        clip = None if clip is None else [clip[i] for i in keep]

    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    normed = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_clamp_min_(normed, eps)
    normed = torch._foreach_div(grads, normed)
    if clip is not None:
        torch._foreach_clamp_min_(normed, [-c for c in clip])
        torch._foreach_clamp_max_(normed, clip)
    torch._foreach_lerp_(exp_avgs, normed, 1 - beta1)
    torch._foreach_add_(params, exp_avgs, alpha=-lr)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)


def _capturable_group(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    clip: Optional[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: Union[float, Tensor],
    weight_decay: float,
    eps: float,
) -> None:
    """Same rule with per-tensor masks in place of the host split: no sync, no branch.

    ``weight_decay`` here is the decoupled decay (0 when decay is L2, already in ``grads``).
    The bulk math runs as foreach ops; the first-step selection is a per-tensor
    ``torch.where`` (a select, so an inf in the discarded branch never leaks).
    """
    active = (torch.stack(steps) > 0).unbind()
    if weight_decay != 0:
        decayed = torch._foreach_mul(params, 1 - lr * weight_decay)  # type: ignore[arg-type]
        for p, d, a in zip(params, decayed, active):
            p.copy_(torch.where(a, d, p))
    normed = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_clamp_min_(normed, eps)
    normed = torch._foreach_div(grads, normed)
    if clip is not None:
        torch._foreach_maximum_(normed, (-clip).unbind())
        torch._foreach_minimum_(normed, clip.unbind())
    # At s == 0 the target is m itself, so the lerp leaves m unchanged.
    targets = [torch.where(a, n, m) for n, m, a in zip(normed, exp_avgs, active)]
    torch._foreach_lerp_(exp_avgs, targets, 1 - beta1)
    update = [torch.where(a, m, 0) for m, a in zip(exp_avgs, active)]
    if isinstance(lr, Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(update, lr))
    else:
        torch._foreach_add_(params, update, alpha=-lr)
    decayed_sq = torch._foreach_mul(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(decayed_sq, grads, grads, value=1 - beta2)
    squares = torch._foreach_mul(grads, grads)
    for v, d, q, a in zip(exp_avg_sqs, decayed_sq, squares, active):
        v.copy_(torch.where(a, d, q))
