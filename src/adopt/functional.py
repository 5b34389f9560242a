"""The functional ADOPT API: validation and the choice between execution paths.

``adopt(...)`` updates lists of tensors in place. It picks one of three paths, all computing
the same per-tensor rule (see :mod:`adopt._single_tensor`):

* single-tensor: one tensor at a time; supports ``differentiable`` and TorchScript.
* foreach: multi-tensor ``torch._foreach_*`` ops per device and dtype.
* fused: one kernel pass over memory (C on CPU, Triton on CUDA).
"""

from __future__ import annotations

import operator
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ._foreach import foreach_adopt
from ._fused import (
    fused_adopt,
    fused_cpu_available,
    fused_cuda_available,
    fused_supported_dtypes,
    warn_missing_cpu_kernel_once,
)
from ._single_tensor import single_tensor_adopt
from .schedules import ClipSchedule

__all__ = ["adopt"]

_PathFn = Callable[..., None]


def default_path(params: list[Tensor], differentiable: bool, lr: Union[float, Tensor], capturable: bool) -> str:
    """The path used when neither ``foreach`` nor ``fused`` is set: the fastest correct one.

    * ``differentiable=True`` (or TorchScript): single-tensor, the only path autograd runs through.
    * under ``torch.compile``: foreach, which the compiler fuses itself (a kernel call it
      cannot trace would break the graph).
    * plain tensors on CPU and/or CUDA whose fused kernel is available (the C extension was
      built; triton is installed): fused.
    * otherwise foreach when every parameter is on CUDA (not with a Tensor ``lr`` and
      ``capturable=False``), or on the CPU where the fused C kernel would run but was not
      built (with a one-time :class:`FusedFallbackWarning`), else single-tensor.
    """
    if differentiable or torch.jit.is_scripting() or not params:
        return "single"
    foreach_allowed = capturable or not isinstance(lr, Tensor)
    if torch.compiler.is_compiling():
        return "foreach" if foreach_allowed else "single"
    cpu_kernel = fused_cpu_available()
    if _fused_handles(params, cpu_kernel):
        return "fused"
    if foreach_allowed and all(map(_is_cuda, params)):
        return "foreach"
    if foreach_allowed and not cpu_kernel and _fused_handles(params, True):
        # The C kernel was not built (no compiler at install): the fastest path left on the
        # CPU is foreach, faster than single-tensor at every size measured (BENCHMARKS.md).
        warn_missing_cpu_kernel_once()
        return "foreach"
    return "single"


def _fused_handles(params: list[Tensor], cpu_kernel: bool) -> bool:
    """Whether every parameter is a plain tensor the fused kernels support, the CPU one
    counted as there when ``cpu_kernel``.

    Runs on every automatic step, so it reads each attribute through C-level ``map``.
    """
    if not set(map(type, params)) <= {Tensor, torch.nn.Parameter}:
        return False
    if not set(map(_dtype, params)) <= fused_supported_dtypes():
        return False
    if all(map(_is_cpu, params)):
        return cpu_kernel
    if all(map(_is_cpu_or_cuda, params)):
        return fused_cuda_available() and (not any(map(_is_cpu, params)) or cpu_kernel)
    return False


_dtype = operator.attrgetter("dtype")
_is_cpu = operator.attrgetter("is_cpu")
_is_cuda = operator.attrgetter("is_cuda")


def _is_cpu_or_cuda(t: Tensor) -> bool:
    return t.is_cpu or t.is_cuda


def adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    # Not keyword-only, mirroring torch.optim.adam.adam (TorchScript, torch.distributed.optim).
    foreach: Optional[bool] = None,
    capturable: bool = False,
    differentiable: bool = False,
    fused: Optional[bool] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    has_complex: bool = False,
    *,
    beta1: float,
    beta2: float,
    lr: Union[float, Tensor],
    clip_lambda: Optional[ClipSchedule],
    weight_decay: float,
    decouple: bool,
    eps: float,
    maximize: bool,
    stochastic_rounding: bool = False,
    seeds: Optional[list[Tensor]] = None,
    nesterov: bool = False,
    caution: bool = False,
    corrected_weight_decay: bool = False,
    lr_max: Optional[float] = None,
) -> None:
    """Functional API that performs the ADOPT update on lists of tensors, in place.

    ``state_steps`` holds each tensor's own step count (0-d tensors); tensors may be at
    different steps. See :class:`adopt.ADOPT` for the algorithm and the arguments.
    ``stochastic_rounding`` writes float16/bfloat16 parameters back with stochastic rounding;
    it needs ``seeds``, one int64 0-d tensor per parameter (``state["seed"]``), on the device
    of its step. ``nesterov``, ``caution`` and ``corrected_weight_decay`` are as in
    :class:`adopt.ADOPT`; corrected weight decay needs ``lr_max``, the learning rate the
    decay is relative to (the optimizer passes its group's ``lr_max``).

    Raises:
        RuntimeError: non-tensor ``state_steps``; ``foreach``/``fused`` under
            ``torch.jit.script``; a Tensor ``lr`` with ``foreach=True`` and
            ``capturable=False``; ``fused`` with ``foreach`` or ``differentiable``.
    """
    if not torch.compiler.is_compiling() and not all(issubclass(t, Tensor) for t in set(map(type, state_steps))):
        raise RuntimeError("API has changed, `state_steps` argument must contain a list of singleton tensors")
    if foreach and torch.jit.is_scripting():
        raise RuntimeError("torch.jit.script not supported with foreach optimizers")
    if fused and torch.jit.is_scripting():
        raise RuntimeError("torch.jit.script not supported with fused optimizers")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if stochastic_rounding:
        if differentiable:
            raise RuntimeError("stochastic_rounding=True does not support differentiable=True")
        if seeds is None or len(seeds) != len(params):
            got = "None" if seeds is None else f"{len(seeds)} seeds"
            raise ValueError(f"stochastic_rounding=True needs one seed per parameter ({len(params)}), got {got}")
    if corrected_weight_decay:
        check_lr_max(lr_max)

    if fused is None and foreach is None:
        path = default_path(params, differentiable, lr, capturable)
    elif fused:
        path = "fused"
    else:
        path = "foreach" if foreach else "single"

    if path == "foreach" and isinstance(lr, Tensor) and not capturable:
        raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")

    func: _PathFn = {"fused": fused_adopt, "foreach": foreach_adopt, "single": single_tensor_adopt}[path]
    func(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        grad_scale,
        found_inf,
        has_complex=has_complex,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        clip_lambda=clip_lambda,
        weight_decay=weight_decay,
        decouple=decouple,
        eps=eps,
        maximize=maximize,
        capturable=capturable,
        differentiable=differentiable,
        seeds=seeds if stochastic_rounding else None,
        nesterov=nesterov,
        caution=caution,
        lr_max=lr_max if corrected_weight_decay else None,
    )


def check_lr_max(lr_max: object) -> None:
    """Raise ValueError unless ``lr_max`` is a finite number > 0 (corrected weight decay
    divides by it)."""
    if isinstance(lr_max, bool) or not isinstance(lr_max, (int, float)) or not 0 < lr_max < float("inf"):
        raise ValueError(
            f"corrected_weight_decay=True needs lr_max, the peak learning rate, as a finite number > 0, "
            f"got lr_max={lr_max!r}"
        )
