"""The fused CPU step for low-memory optimizer state (``state_precision`` "bf16" / "8bit").

:func:`fused_state_cpu` runs the C kernel's ``step_state`` once per parameter dtype group.
The kernel decodes each tensor's moments to float32 (``adopt/_state_formats.py``), applies
exactly the full-precision rule of the fused kernel on them, and encodes both moments again
with stochastic rounding (keys ``state_key(seed, s, moment)``), in one pass over memory per
block of 256 elements. The kernel validates every tensor itself before it writes anything;
the Python side only groups by dtype, makes parameters and gradients contiguous where they
are not, and evaluates the clip schedule.
"""

from __future__ import annotations

import re
from typing import Optional, Union, cast

import torch
from torch import Tensor

from . import _fused
from . import _state_formats as formats
from .schedules import ClipSchedule

__all__ = ["fused_state_cpu", "fused_state_cpu_available"]



def fused_state_cpu_available() -> bool:
    """Whether the C kernel was built with the low-memory state step."""
    kernel = _fused._cpu_kernel()
    return kernel is not None and hasattr(kernel, "step_state")


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() and not t.is_neg() else t.resolve_neg().contiguous()


def _global_indices(message: str, index: list[int]) -> str:
    """A dtype group's error message with its list indices ``name[k]`` as the caller's."""
    return re.sub(r"(\w+)\[(\d+)\]", lambda m: f"{m.group(1)}[{index[int(m.group(2))]}]", message)


def fused_state_cpu(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_scales: Optional[list[Tensor]],
    exp_avg_sq_scales: Optional[list[Tensor]],
    state_steps: list[Tensor],
    seeds: list[Tensor],
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    *,
    fmt: str,
    beta1: float,
    beta2: float,
    lr: Union[float, Tensor],
    clip_lambda: Optional[ClipSchedule],
    weight_decay: float,
    decouple: bool,
    eps: float,
    maximize: bool,
    stochastic_rounding: bool,
    nesterov: bool,
    caution: bool,
    lr_max: Optional[float],
) -> None:
    """One fused ADOPT step on CPU tensors whose moments are stored as ``fmt``.

    ``fmt="8bit"``: ``exp_avgs``/``exp_avg_sqs`` are the uint8 code tensors (the params'
    numel), ``exp_avg_scales``/``exp_avg_sq_scales`` the float32 block scales
    (``ceil(numel / 256)``). ``fmt="bf16"``: they are bfloat16 tensors and the scale lists
    None. ``seeds``: each tensor's ``state["seed"]`` (int64 0-d CPU), the key of the moments'
    rounding and, with ``stochastic_rounding``, of 16-bit parameters'. ``lr`` may be a CPU
    tensor (read as a float); ``lr_max``: corrected weight decay relative to it (None: off).
    ``found_inf`` nonzero: nothing changes. The steps (float32 0-d CPU) are incremented.

    Raises:
        RuntimeError: the C kernel is not built.
        ValueError / TypeError: a bad argument or tensor (naming it); nothing is modified.
    """
    if fmt not in formats.LOW_PRECISIONS:
        raise ValueError(f"fmt must be one of {formats.LOW_PRECISIONS}, got {fmt!r}")
    kernel = _fused._cpu_kernel()
    if kernel is None or not hasattr(kernel, "step_state"):
        raise RuntimeError("the fused CPU kernel (adopt._kernels._adopt_cpu) with step_state is not available")
    n = len(params)
    if not n:
        return
    fmt8 = fmt == "8bit"
    named = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "state_steps": state_steps,
             "seeds": seeds}
    if fmt8:
        if exp_avg_scales is None or exp_avg_sq_scales is None:
            raise ValueError("fmt='8bit' needs exp_avg_scales and exp_avg_sq_scales")
        named["exp_avg_scales"] = exp_avg_scales
        named["exp_avg_sq_scales"] = exp_avg_sq_scales
    elif exp_avg_scales is not None or exp_avg_sq_scales is not None:
        raise ValueError("fmt='bf16' takes no scales (pass None)")
    for name, values in named.items():
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries but params has {n}")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or p.dtype not in formats.STATE_PARAM_DTYPES:
            got = p.dtype if isinstance(p, Tensor) else type(p).__name__
            raise TypeError(f"params[{i}]: state_precision {fmt!r} supports float32, bfloat16 and float16, got {got}")

    # Clip thresholds: PowerClip in the kernel, a custom schedule as a host table.
    clip = _fused.cpu_clip(kernel, state_steps, clip_lambda, capturable=False)
    if clip is None:
        raise ValueError("the fused state step needs each state step as a float32 CPU scalar tensor")
    mode, table, exponent = clip
    if isinstance(lr, Tensor) and not lr.is_cpu:
        raise ValueError("the fused CPU state step takes lr as a float or a CPU tensor")
    lr_value = float(lr) if isinstance(lr, Tensor) else lr
    scale, inf = _fused._cpu_scalar(grad_scale), _fused._cpu_scalar(found_inf)
    code = kernel.STATE_8BIT if fmt8 else kernel.STATE_BF16

    # One call per parameter dtype, in first-seen order; all validated before any runs.
    order: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        order.setdefault(p.dtype, []).append(i)
    calls = []
    for index in order.values():
        def pick(ts: Optional[list[Tensor]]) -> Optional[list[Tensor]]:
            return None if ts is None else [ts[i] for i in index]

        ps = cast(list[Tensor], pick(params))
        write_back = []
        local_params = []
        for p in ps:
            c = _contiguous(p)
            if c is not p:
                write_back.append((p, c))
            local_params.append(c)
        local_grads = [_contiguous(g) if isinstance(g, Tensor) else g for g in cast(list[Tensor], pick(grads))]
        group_table = None if table is None else table[index].contiguous()
        call = (
            local_params, local_grads, pick(exp_avgs), pick(exp_avg_sqs),
            pick(exp_avg_scales) if fmt8 else None, pick(exp_avg_sq_scales) if fmt8 else None,
            pick(state_steps), pick(seeds), group_table, scale, inf, code,
            float(lr_value), beta1, beta2, weight_decay, eps, exponent, mode, decouple, maximize, nesterov,
            caution, float(lr_max) if lr_max is not None else 0.0, stochastic_rounding, torch.get_num_threads(),
        )
        try:
            kernel.step_state(*call, True)  # dry run: raises, naming the tensor, before anything is written
        except (ValueError, TypeError) as exc:
            if len(order) == 1:
                raise
            raise type(exc)(_global_indices(str(exc), index)) from None
        calls.append((call, write_back))
    for call, write_back in calls:
        kernel.step_state(*call, False)
        for original, copy in write_back:
            original.copy_(copy)
