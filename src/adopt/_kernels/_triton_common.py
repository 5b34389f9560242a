"""Host side shared by the two Triton ADOPT kernels (``triton_adopt``, ``triton_state``).

* **Pointer table.** One int64 device buffer per group: a row per tensor (the kernel's
  address and size columns, then its number of programs), the ``(tensor, chunk)`` int32
  pair of each program, one int32 completion counter per tensor and one int64 caution
  count per tensor. It is uploaded with one host-to-device copy from pinned memory that
  the plan keeps alive, so a plan first built inside CUDA-graph capture is replayed
  correctly.
* **Caching.** Each kernel module owns one :class:`PlanCache` (LRU, keyed by the tensors'
  addresses and sizes); plans used during a capture are kept for the life of the process,
  since the graph holds their addresses.
* **Launch arguments.** The scalar and optional-pointer arguments, and their checks, are the
  same for both kernels; nothing here synchronises with the host.

The jit helpers both kernels share live in ``triton_adopt`` (imported by ``triton_state``):
jit functions are bound to the interpreter setting when their module is imported, and
the tests reload those two modules to switch it. This module does not import triton.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import Tensor

Clip = Optional[Tuple[str, Union[float, Tensor]]]

_CACHE_CAPACITY = 32
WD_NONE, WD_L2, WD_DECOUPLED = 0, 1, 2
CLIP_NONE, CLIP_POWER, CLIP_TENSOR = 0, 1, 2


@dataclass(frozen=True)
class Plan:
    """Device-side tables for one group of tensors (views into one uploaded buffer)."""

    host: Tensor  # the upload's source; a captured graph copies from it again on each replay
    rows: Tensor  # int64 [T * row width]
    blocks: Tensor  # int32 [2 * num_programs]: (tensor, chunk) per program
    counters: Tensor  # int32 [T]: completed programs per tensor, zero between launches
    kept: Tensor  # int64 [T]: a cautious step's agreeing elements per tensor, zero between steps
    num_programs: int
    aligned: bool


def _build_plan(columns: Tuple[Tuple[int, ...], ...], chunk: int, device: torch.device) -> Plan:
    """Lay out rows, program map, zeroed counters and counts in one int64 buffer and upload it.

    ``columns``: per field, one value per tensor; the first four are the addresses that must
    be 16-byte aligned for the aligned variant, the last the numels. A row is these fields
    and then the tensor's number of programs of ``chunk`` elements.
    """
    fields = torch.tensor(columns, dtype=torch.int64).t()
    num_tensors, row = fields.shape[0], fields.shape[1] + 1
    numels = fields[:, row - 2]
    nprogs = torch.clamp((numels + chunk - 1) // chunk, min=1)  # empty tensors still count a step
    num_programs = int(nprogs.sum())  # one int64 word holds one (tensor, chunk) int32 pair
    counter_words = (num_tensors + 1) // 2
    host = torch.zeros(num_tensors * row + num_programs + counter_words + num_tensors, dtype=torch.int64)
    rows = host[: num_tensors * row].view(num_tensors, row)
    rows[:, : row - 1] = fields
    rows[:, row - 1] = nprogs
    tensor_of = torch.repeat_interleave(torch.arange(num_tensors), nprogs)
    first = torch.cumsum(nprogs, 0) - nprogs
    pairs = host[num_tensors * row : num_tensors * row + num_programs].view(torch.int32).view(num_programs, 2)
    pairs[:, 0] = tensor_of
    pairs[:, 1] = torch.arange(num_programs) - first[tensor_of]
    aligned = bool((fields[:, :4] % 16 == 0).all())
    if device.type == "cuda":
        host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    split = num_tensors * row
    return Plan(
        host=host,
        rows=dev[:split],
        blocks=dev[split : split + num_programs].view(torch.int32),
        counters=dev[split + num_programs : split + num_programs + counter_words].view(torch.int32)[:num_tensors],
        kept=dev[split + num_programs + counter_words :],
        num_programs=num_programs,
        aligned=aligned,
    )


class PlanCache:
    """One kernel's cached plans, those kept for captured CUDA graphs, and its build count."""

    def __init__(self) -> None:
        self.plans: "OrderedDict[tuple, Plan]" = OrderedDict()
        self.graph_plans: dict[int, Plan] = {}  # used inside a CUDA-graph capture: never freed
        self.builds = 0

    def clear(self) -> None:
        """Drop cached tables (those referenced by captured CUDA graphs are kept)."""
        self.plans.clear()

    def get(
        self,
        key: tuple,
        columns: Tuple[Tuple[int, ...], ...],
        chunk: int,
        device: torch.device,
        check: Callable[[], None],
    ) -> Plan:
        """The cached plan under ``key``, built from ``columns`` (after ``check`` validates the
        group) on a miss; a cache hit means the same tensors again."""
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        plan = self.plans.get(key)
        if plan is None:
            check()
            plan = _build_plan(columns, chunk, device)
            self.builds += 1
            if not capturing:  # a table uploaded inside a capture exists only once the graph runs
                self.plans[key] = plan
                if len(self.plans) > _CACHE_CAPACITY:
                    self.plans.popitem(last=False)
        else:
            self.plans.move_to_end(key)
        if capturing:
            self.graph_plans[id(plan)] = plan
        return plan


def require_triton(triton: Any) -> None:
    """Raise unless triton could be imported."""
    if triton is None:
        raise RuntimeError("the fused CUDA path of ADOPT needs triton (pip install triton)")


def check_device(device: torch.device, interpreted: bool) -> None:
    """Raise unless the kernels run where the tensors are: CUDA, or the CPU under the
    interpreter."""
    if (device.type == "cpu") != interpreted:  # the interpreter reads host memory only
        raise RuntimeError(
            f"triton ADOPT runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (set before "
            f"triton is imported); got tensors on {device} with the interpreter "
            f"{'on' if interpreted else 'off'}"
        )


def on(device: torch.device, name: str, t: Tensor, numel: int = 1) -> Tensor:
    """``t`` if it is contiguous with ``numel`` elements on ``device``, else a clear error."""
    if t.device != device:  # moving it here would cost a copy, and a host sync for CPU values
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if t.numel() != numel or not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous with {numel} element(s), got {tuple(t.shape)}")
    return t


def wd_mode(weight_decay: float, decouple: bool) -> int:
    """The kernels' WD_MODE: none, L2 (added to the gradient) or decoupled."""
    if weight_decay == 0:
        return WD_NONE
    return WD_DECOUPLED if decouple else WD_L2


def kernel_args(
    plan: Plan,
    device: torch.device,
    count: int,
    *,
    lr: Union[float, Tensor],
    clip: Clip,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    seeds: Optional[Tensor],
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    lr_max: Optional[float],
) -> Tuple[tuple, int]:
    """The kernels' positional arguments (tables, optional device tensors, scalars) and their
    CLIP_MODE, after checking each device tensor (``seeds``: one per tensor, or None)."""
    lr_ptr = on(device, "lr", lr) if isinstance(lr, Tensor) else None
    lr_value = 0.0 if isinstance(lr, Tensor) else float(lr)
    thresholds = None
    exponent = 0.0
    if clip is None:
        clip_mode = CLIP_NONE
    elif clip[0] == "power":
        clip_mode, exponent = CLIP_POWER, float(clip[1])  # type: ignore[arg-type]
    elif clip[0] == "tensor" and isinstance(clip[1], Tensor):
        clip_mode, thresholds = CLIP_TENSOR, on(device, "clip thresholds", clip[1], count)
    else:
        raise ValueError(f"clip must be None, ('power', exponent) or ('tensor', thresholds), got {clip!r}")
    args = (
        plan.rows, plan.blocks, plan.counters, plan.kept, lr_ptr,
        None if grad_scale is None else on(device, "grad_scale", grad_scale),
        None if found_inf is None else on(device, "found_inf", found_inf),
        thresholds,
        None if seeds is None else on(device, "seeds", seeds, count),
        lr_value, float(beta1), float(beta2), float(weight_decay), float(eps), exponent,
        float(lr_max) if lr_max is not None else 0.0,
    )
    return args, clip_mode


def launch(kernel: Any, plan: Plan, args: tuple, meta: dict, device: torch.device, caution: bool) -> None:
    """One launch of ``kernel`` over the plan's programs (PASS 0), or a cautious step's two
    (PASS 1 then PASS 2)."""
    # triton launches on the current CUDA device; make it the tensors' one
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        for step_pass in (1, 2) if caution else (0,):
            kernel[(plan.num_programs,)](*args, **meta, PASS=step_pass)
