"""The checks every execution path relies on, made before any tensor is updated.

A step updates tensor after tensor (single-tensor path) or group after group (the optimizer),
so a mismatch that an arithmetic op would only report halfway through would leave part of
the step applied. :func:`check_tensors` finds every such mismatch first: each parameter's
gradient, ``exp_avg`` and ``exp_avg_sq`` must be strided tensors of its shape, dtype and
device, its step a one-element tensor, and every storage must hold its tensor's elements (a
freed storage, ``untyped_storage().resize_(0)``, would crash any kernel). The C module confirms a whole list in
nanoseconds per tensor (any device); what it cannot confirm (a mismatch, or a DTensor whose
metadata it does not read) is checked here in Python, which also words the error.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ._fused import _cpu_kernel, _owns_memory

__all__ = ["check_tensors"]


def check_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    name: Optional[Callable[[int], str]] = None,
) -> None:
    """Raise RuntimeError naming the parameter (``name(i)``, default ``params[i]``) and the
    tensor that does not match it; the lists must have equal lengths (ValueError)."""
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if len(set(map(len, lists))) > 1:
        raise ValueError(f"the tensor lists have different lengths: {[len(ts) for ts in lists]}")
    kernel = _cpu_kernel()
    start = 0 if kernel is None else int(kernel.check_lists(*lists))
    if start < 0:
        return
    for i in range(start, len(params)):
        _check_one(i, params[i], (("grad", grads[i]), ("exp_avg", exp_avgs[i]), ("exp_avg_sq", exp_avg_sqs[i])),
                   state_steps[i], name or "params[{}]".format)


def _describe(t: Tensor) -> str:
    layout = "" if t.layout == torch.strided else f"{t.layout} "
    return f"a {layout}{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def _check_one(
    i: int, p: Tensor, entries: tuple[tuple[str, Tensor], ...], step: Tensor, name: Callable[[int], str]
) -> None:
    for key, t in entries:
        if not isinstance(t, Tensor):
            raise RuntimeError(f"ADOPT: the {key} of {name(i)} is {type(t).__name__}, not a tensor")
        if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device or t.layout != torch.strided:
            raise RuntimeError(f"ADOPT: {name(i)} is {_describe(p)}, but its {key} is {_describe(t)}")
    if not isinstance(step, Tensor) or step.numel() != 1:
        got = f"shape {tuple(step.shape)}" if isinstance(step, Tensor) else type(step).__name__
        raise RuntimeError(f"ADOPT: the step of {name(i)} must be a one-element tensor, got {got}")
    for key, t in (("param", p), *entries, ("step", step)):
        if not _storage_holds(t):
            raise RuntimeError(
                f"ADOPT: the {key} of {name(i)} has {t.numel()} element(s) but its storage holds "
                f"{t.untyped_storage().nbytes()} byte(s) (freed or shrunk storage?)"
            )


def _storage_holds(t: Tensor) -> bool:
    """Whether t's storage holds every element t addresses (True for tensors without a
    storage of their own, such as DTensor, whose local shard is checked by the kernel)."""
    if t.numel() == 0 or not _owns_memory(t):
        return True
    last = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    try:
        nbytes = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # no storage of its own (functorch, functional wrappers)
        return True
    return (last + 1) * t.element_size() <= nbytes
