"""Fused ADOPT: the whole step in one pass over memory per device and dtype group.

* CPU: the C kernel ``adopt._kernels._adopt_cpu`` (OpenMP threads, vectorised), one call
  per dtype group. The kernel reads every tensor's metadata itself, at C speed and afresh
  on every call, and validates all of it before it touches any tensor, so the Python side
  of a step costs a handful of attribute reads. :func:`fused_cpu_step` goes further for
  ``ADOPT.step()``: one C call gathers every group's tensors from the optimizer's state
  and updates them.
* CUDA: ``adopt._kernels.triton_adopt.launch_group``, one launch per device and dtype
  group, with steps, ``lr``, clip thresholds and ``found_inf`` read on the device.

Both update ``state_steps`` (float32 0-d tensors on the parameter's device) in the kernel,
and when AMP's ``found_inf`` is nonzero nothing changes at all. When the C extension was
not built, CPU groups run the foreach path instead, after a one-time
:class:`FusedFallbackWarning`.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Any, Callable, NamedTuple, Optional, Union, cast

import torch
from torch import Tensor

from ._foreach import foreach_adopt
from ._grouping import TensorGroup, group_tensors
from ._kernels._triton_common import Clip
from ._random import SR_DTYPES
from .schedules import ClipSchedule, PowerClip, device_thresholds, host_thresholds

__all__ = [
    "fused_adopt",
    "fused_cpu_step",
    "fused_cpu_available",
    "fused_cuda_available",
    "fused_supported_dtypes",
    "FusedFallbackWarning",
    "warn_missing_cpu_kernel_once",
]

_SUPPORTED_DTYPES = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128}
)


class FusedFallbackWarning(RuntimeWarning):
    """The fused CPU kernel is unavailable and the foreach path runs instead."""


def _load_cpu_kernel() -> tuple[Optional[ModuleType], str]:
    """The compiled kernel module (or None) and, when missing, why."""
    try:
        return importlib.import_module("adopt._kernels._adopt_cpu"), ""
    except ImportError as exc:
        return None, str(exc)


# Loaded once at import (plain globals rather than a cache, which torch.compile would trace).
_CPU_KERNEL, _CPU_KERNEL_ERROR = _load_cpu_kernel()
_cuda_available: Optional[bool] = None


def _cpu_kernel() -> Optional[ModuleType]:
    return _CPU_KERNEL


def fused_cpu_available() -> bool:
    """Whether the C kernel was built and imports, i.e. ``fused=True`` on CPU runs fused."""
    return _cpu_kernel() is not None


def fused_cuda_available() -> bool:
    """Whether the Triton kernel for CUDA tensors can run (triton is installed)."""
    global _cuda_available
    if _cuda_available is None:
        try:
            from ._kernels import triton_adopt
        except ImportError:
            _cuda_available = False
        else:
            _cuda_available = triton_adopt.triton_available()
    return _cuda_available


def fused_supported_dtypes() -> frozenset[torch.dtype]:
    """Parameter dtypes the fused path handles on CPU and CUDA (complex as real views)."""
    return _SUPPORTED_DTYPES


_fallback_warned = False


def _warn_fallback_once(runs: str = "fused=True runs the foreach path on CPU instead") -> None:
    """One FusedFallbackWarning per process: the C kernel is missing and ``runs`` instead."""
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    reason = _CPU_KERNEL_ERROR or "the extension is unavailable"
    warnings.warn(
        "adopt: the fused CPU kernel (adopt._kernels._adopt_cpu) could not be loaded "
        f"({reason}); {runs}. Reinstall with a C compiler available to build it "
        "(`adopt info` shows what was built).",
        FusedFallbackWarning,
        stacklevel=5,  # the caller of fused_adopt / adopt
    )


def warn_missing_cpu_kernel_once() -> None:
    """The warning for the automatic path choice, which then runs foreach on the CPU."""
    _warn_fallback_once("ADOPT runs the foreach path on CPU, several times slower than fused")


def fused_adopt(
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
    """One fused ADOPT step (same arguments and result as ``single_tensor_adopt``).

    ``grad_scale``/``found_inf`` come from ``torch.amp.GradScaler``: gradients are divided
    by ``grad_scale`` inside the kernel, and a nonzero ``found_inf`` leaves params, state
    and steps untouched. ``state_steps`` must be float32 0-d tensors on each parameter's
    device.

    Raises:
        RuntimeError: ``differentiable=True``; CUDA tensors without triton.
        ValueError / TypeError: mismatched lists, steps that are not float32 scalars on the
            parameter's device, unsupported dtypes. Nothing is modified then.
    """
    if differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if not params:
        return
    hyper = _Hyper(beta1, beta2, lr, clip_lambda, weight_decay, decouple, eps, maximize, capturable, nesterov,
                   caution, lr_max)
    if torch.compiler.is_compiling():
        _traced_fused_adopt(params, grads, exp_avgs, exp_avg_sqs, state_steps, grad_scale, found_inf, has_complex,
                            hyper, seeds)
        return
    kernel = _cpu_kernel()
    if kernel is not None and not has_complex and params[0].is_cpu:
        # Common case first: one CPU dtype group, validated and run by a single C call.
        clip = cpu_clip(kernel, state_steps, hyper.clip_lambda, hyper.capturable)
        if clip is not None:
            status = _run_cpu(kernel, TensorGroup(params, grads, exp_avgs, exp_avg_sqs, state_steps, seeds),
                              grad_scale, found_inf, hyper, clip)
            if status == kernel.DONE:
                return
    groups = group_tensors(params, grads, exp_avgs, exp_avg_sqs, state_steps, has_complex, seeds)
    # Validate every group before any runs, so an error leaves everything untouched.
    cpu_groups = [g for g in groups if g.device.type == "cpu"]
    runs = [_plan_cuda(g, grad_scale, found_inf, hyper) for g in groups if g.device.type != "cpu"]
    if cpu_groups:
        runs.insert(0, _plan_cpu(cpu_groups, grad_scale, found_inf, hyper))
    for run in runs:
        run()


def fused_cpu_step(
    param_groups: list[dict[str, Any]],
    state: dict[Tensor, dict[str, Any]],
    clip_lambda: Optional[ClipSchedule],
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
) -> bool:
    """An optimizer's whole step in one call of the C kernel, when it can take it.

    That is the steady state of CPU training: every group runs the fused path (``fused=True``
    or the automatic choice), the clip is :class:`PowerClip` or None, and every parameter
    with a gradient already has state. Then the per-parameter bookkeeping (gradients, state
    lookups, pointers) happens in C. Returns False, having changed nothing, when the general
    path must run the step instead: the first step, a custom schedule, complex or CUDA
    tensors, anything to convert, or an error to report.
    """
    if torch.compiler.is_compiling() or _CPU_KERNEL is None:
        return False
    kernel = _CPU_KERNEL
    if clip_lambda is None:
        mode, exponent = kernel.CLIP_NONE, 0.0
    elif isinstance(clip_lambda, PowerClip):
        mode, exponent = kernel.CLIP_POWER, clip_lambda.exponent
    else:
        return False
    specs = []
    for group in param_groups:
        fused = group["fused"]
        if not (fused or (fused is None and group["foreach"] is None and not group["differentiable"])):
            return False
        params = group["params"]
        if params and not (params[0].is_cpu and not params[0].is_complex()):
            return False  # CUDA or complex: the C call would gather every tensor only to decline
        if group["state_precision"] != "full":
            return False  # moments in bf16 or 8 bits: the general step splits the group by format
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if not lr.is_cpu:
                return False
            lr = float(lr)
        beta1, beta2 = group["betas"]
        specs.append(
            (params, lr, beta1, beta2, group["weight_decay"], group["eps"], exponent, mode,
             group["decouple"], group["maximize"], group["nesterov"], group["caution"],
             group["lr_max"] if group["corrected_weight_decay"] else 0.0, group["stochastic_rounding"])
        )
    status = kernel.step_groups(specs, state, grad_scale, found_inf, torch.get_num_threads())
    return cast(int, status) == kernel.DONE


class _Hyper(NamedTuple):
    """The scalar arguments of a step, shared by every group."""

    beta1: float
    beta2: float
    lr: Union[float, Tensor]
    clip_lambda: Optional[ClipSchedule]
    weight_decay: float
    decouple: bool
    eps: float
    maximize: bool
    capturable: bool
    nesterov: bool
    caution: bool
    lr_max: Optional[float]  # corrected weight decay relative to it; None: off


def _cpu_scalar(t: Optional[Tensor]) -> Optional[Tensor]:
    """An AMP scalar as the contiguous float32 CPU tensor the C kernel reads."""
    if t is None or (t.is_cpu and t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.detach().to("cpu", torch.float32).contiguous()


_CpuClip = tuple[int, Optional[Tensor], float]  # the C kernel's clip mode, threshold table, exponent
# How the C kernel clips: (exponent, None) evaluates s ** exponent in the kernel, (None, table)
# takes one float64 threshold per tensor, (None, None) does not clip.
_ClipSpec = tuple[Optional[float], Optional[Tensor]]


def _clip_spec(
    clip: Optional[ClipSchedule], capturable: bool, state_steps: list[Tensor],
    read_counts: Callable[[list[Tensor]], Optional[list[int]]],
) -> Optional[_ClipSpec]:
    """The clip of a CPU group; None if its steps are not CPU scalars ``read_counts`` can read."""
    if clip is None:
        return None, None
    if isinstance(clip, PowerClip):
        return clip.exponent, None
    if capturable:
        if not all(s.is_cpu for s in state_steps):
            return None
        return None, device_thresholds(clip, state_steps).to(torch.float64).contiguous()
    counts = read_counts(state_steps)
    if counts is None:
        return None
    return None, torch.tensor(host_thresholds(clip, counts), dtype=torch.float64)


def _kernel_clip(kernel: ModuleType, spec: _ClipSpec) -> _CpuClip:
    exponent, table = spec
    if exponent is not None:
        return kernel.CLIP_POWER, None, exponent
    if table is not None:
        return kernel.CLIP_TABLE, table, 0.0
    return kernel.CLIP_NONE, None, 0.0


def cpu_clip(
    kernel: ModuleType, state_steps: list[Tensor], clip: Optional[ClipSchedule], capturable: bool
) -> Optional[_CpuClip]:
    """The clip arguments of the C kernel (mode, threshold table, exponent); None if the steps
    are not CPU float32 scalars."""
    spec = _clip_spec(clip, capturable, state_steps, kernel.host_steps)
    return None if spec is None else _kernel_clip(kernel, spec)


def _run_cpu(
    kernel: ModuleType,
    group: TensorGroup,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    hyper: _Hyper,
    clip: _CpuClip,
    *,
    dry_run: bool = False,
) -> int:
    """Call the C kernel on lists that may be one CPU dtype group; returns its status."""
    mode, table, exponent = clip
    return cast(
        int,
        kernel.step(
            *_lists(group), table, _cpu_scalar(grad_scale), _cpu_scalar(found_inf),
            float(hyper.lr), hyper.beta1, hyper.beta2, hyper.weight_decay, hyper.eps, exponent, mode,
            hyper.decouple, hyper.maximize, hyper.nesterov, hyper.caution, hyper.lr_max or 0.0,
            torch.get_num_threads(), dry_run, group.seeds,
        ),
    )


def _lists(group: TensorGroup) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    return group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, group.steps


def _contiguous_group(group: TensorGroup) -> tuple[TensorGroup, list[tuple[Tensor, Tensor]]]:
    """The group with plain contiguous stand-ins for non-contiguous tensors and lazily negated
    views (``is_neg()``, whose memory holds the negation of their values), and the copy-backs."""
    lists = [list(group.params), list(group.grads), list(group.exp_avgs), list(group.exp_avg_sqs)]
    write_back: list[tuple[Tensor, Tensor]] = []
    for i in range(len(group.params)):
        if all(ts[i].is_contiguous() and not ts[i].is_neg() for ts in lists):
            continue
        for k, ts in enumerate(lists):
            original = ts[i]
            ts[i] = original.resolve_neg().contiguous()
            if k != 1 and ts[i] is not original:  # grads are only read
                write_back.append((original, ts[i]))
    return TensorGroup(lists[0], lists[1], lists[2], lists[3], group.steps, group.seeds), write_back


def _check_supported(group: TensorGroup) -> None:
    dtype = group.params[0].dtype
    if dtype not in _SUPPORTED_DTYPES:
        names = ", ".join(sorted(str(d) for d in _SUPPORTED_DTYPES))
        raise TypeError(f"fused ADOPT supports {names}; got {dtype}")


def _owns_memory(t: Tensor) -> bool:
    """Whether ``t.data_ptr()`` is ``t``'s own data (not a wrapper subclass such as DTensor)."""
    kind = type(t)
    return kind is Tensor or kind is torch.nn.Parameter or kind.__torch_dispatch__ is Tensor.__torch_dispatch__


def _local_group(group: TensorGroup) -> TensorGroup:
    """The group with DTensors (FSDP2) replaced by their local shards.

    The rule is elementwise, so each rank updates its own shard in place, provided a param,
    its grad and its state are laid out alike (same mesh and placements).
    """
    lists = _lists(group)
    if all(_owns_memory(t) for ts in lists for t in ts):
        return group
    distributed = torch.distributed.is_available()
    if distributed:
        from torch.distributed.tensor import DTensor
    local: list[list[Tensor]] = [[] for _ in lists]
    for i in range(len(group.params)):
        layout = None
        for k, ts in enumerate(lists):
            t = ts[i]
            if distributed and isinstance(t, DTensor):
                if layout is None:
                    layout = (t.device_mesh, t.placements)
                elif (t.device_mesh, t.placements) != layout:
                    raise ValueError(
                        f"fused ADOPT: params[{i}], its grad and its state must share one DTensor layout, "
                        f"got {layout[1]} and {t.placements}"
                    )
                with torch.no_grad():  # the shard itself, not an autograd view of it
                    t = t.to_local()
            if not _owns_memory(t):
                raise TypeError(
                    f"fused ADOPT reads tensor memory directly and cannot update a {type(t).__name__}; "
                    "use foreach=True"
                )
            local[k].append(t)
    return TensorGroup(local[0], local[1], local[2], local[3], local[4], group.seeds)


def _plan_cpu(
    groups: list[TensorGroup], grad_scale: Optional[Tensor], found_inf: Optional[Tensor], hyper: _Hyper
) -> Callable[[], None]:
    """Validate the CPU dtype groups and return the call that updates them all."""
    for group in groups:
        _check_supported(group)
    kernel = _cpu_kernel()
    if kernel is None:
        return _plan_fallback(groups, grad_scale, found_inf, hyper)
    runs = []
    for group in groups:
        clip = cpu_clip(kernel, group.steps, hyper.clip_lambda, hyper.capturable)
        if clip is None:
            raise ValueError("fused ADOPT on CPU needs each state step as a float32 CPU scalar tensor")
        runs.append(_plan_cpu_group(kernel, group, grad_scale, found_inf, hyper, clip))

    def run() -> None:
        for run_group in runs:
            run_group()

    return run


def _plan_cpu_group(
    kernel: ModuleType,
    group: TensorGroup,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    hyper: _Hyper,
    clip: _CpuClip,
) -> Callable[[], None]:
    """Validate one CPU dtype group (unwrapping DTensors, making tensors contiguous as
    needed) and return the kernel call that updates it."""
    write_back: list[tuple[Tensor, Tensor]] = []
    status = _run_cpu(kernel, group, grad_scale, found_inf, hyper, clip, dry_run=True)
    if status == kernel.NEEDS_UNWRAP:
        group = _local_group(group)
        status = _run_cpu(kernel, group, grad_scale, found_inf, hyper, clip, dry_run=True)
    if status == kernel.NEEDS_CONTIGUOUS:
        group, write_back = _contiguous_group(group)
        status = _run_cpu(kernel, group, grad_scale, found_inf, hyper, clip, dry_run=True)
    if status != kernel.DONE:
        raise ValueError(_cpu_group_error(group))

    def run() -> None:
        _run_cpu(kernel, group, grad_scale, found_inf, hyper, clip)
        for original, copy in write_back:
            original.copy_(copy)

    return run


def _group_mismatch(group: TensorGroup) -> Optional[str]:
    """What keeps a group from being one device and dtype group, naming the first tensor:
    a parameter of another dtype or device than ``params[0]``, or a grad or state tensor
    off its parameter's device (or, except the step, of another dtype). None if nothing."""
    first = group.params[0]
    for i, p in enumerate(group.params):
        if p.dtype != first.dtype:
            return (
                f"fused ADOPT: params[{i}] is {p.dtype} but params[0] is {first.dtype}: one kernel call "
                "updates tensors of one dtype (group them by dtype first)"
            )
        if p.device != first.device:
            return (
                f"fused ADOPT: params[{i}] is on {p.device} but params[0] on {first.device}: one kernel call "
                "updates tensors of one device (group them by device first)"
            )
        for key, t in (("grad", group.grads[i]), ("exp_avg", group.exp_avgs[i]),
                       ("exp_avg_sq", group.exp_avg_sqs[i]), ("step", group.steps[i])):
            if t.device != p.device:
                return f"fused ADOPT: the {key} of params[{i}] is on {t.device}, its parameter on {p.device}"
            if key != "step" and t.dtype != p.dtype:
                return f"fused ADOPT: the {key} of params[{i}] is {t.dtype}, its parameter {p.dtype}"
    return None


def _cpu_group_error(group: TensorGroup) -> str:
    """Why the C kernel declined a group it was given as one CPU dtype group."""
    if group.device.type != "cpu":
        return f"fused ADOPT: params[0] is on {group.device}: the CPU kernel updates CPU tensors only"
    return _group_mismatch(group) or "fused ADOPT: the CPU kernel cannot read these tensors' memory directly"


def _plan_fallback(
    groups: list[TensorGroup], grad_scale: Optional[Tensor], found_inf: Optional[Tensor], hyper: _Hyper
) -> Callable[[], None]:
    """The foreach path for the CPU groups when the C kernel is missing (AMP handled here)."""
    _warn_fallback_once()
    params, grads, exp_avgs, exp_avg_sqs, steps = ([t for ts in lists for t in ts] for lists in zip(*map(_lists, groups)))
    seeds = None if groups[0].seeds is None else [s for g in groups for s in cast(list[Tensor], g.seeds)]
    lr = hyper.lr if hyper.capturable or not isinstance(hyper.lr, Tensor) else float(hyper.lr)

    def run() -> None:
        if found_inf is not None and float(found_inf) != 0.0:
            return
        unscaled = grads if grad_scale is None else list(torch._foreach_mul(grads, 1.0 / float(grad_scale)))
        foreach_adopt(
            params, unscaled, exp_avgs, exp_avg_sqs, steps, None, None,
            has_complex=False, beta1=hyper.beta1, beta2=hyper.beta2, lr=lr, clip_lambda=hyper.clip_lambda,
            weight_decay=hyper.weight_decay, decouple=hyper.decouple, eps=hyper.eps, maximize=hyper.maximize,
            capturable=hyper.capturable, differentiable=False, seeds=seeds, nesterov=hyper.nesterov,
            caution=hyper.caution, lr_max=hyper.lr_max,
        )

    return run


def _on_device(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def triton_clip_and_lr(
    clip_lambda: Optional[ClipSchedule], lr: Union[float, Tensor], steps: list[Tensor], device: torch.device
) -> tuple[Clip, Union[float, Tensor]]:
    """The Triton kernels' ``clip`` (None, ``("power", exponent)``, or per-tensor thresholds
    computed on the device) and ``lr`` (a float, or a tensor on ``device``), with no sync."""
    clip: Clip
    if clip_lambda is None:
        clip = None
    elif isinstance(clip_lambda, PowerClip):
        clip = ("power", clip_lambda.exponent)
    else:
        clip = ("tensor", device_thresholds(clip_lambda, steps).to(device, torch.float32))
    if isinstance(lr, Tensor):
        lr = float(lr) if lr.is_cpu else lr.to(device, non_blocking=True)  # a CPU read is not a device sync
    return clip, lr


def _plan_cuda(
    group: TensorGroup, grad_scale: Optional[Tensor], found_inf: Optional[Tensor], hyper: _Hyper
) -> Callable[[], None]:
    """A Triton launch for one CUDA group; steps, lr, clip and found_inf stay on the device."""
    if group.device.type != "cuda":
        raise RuntimeError(f"fused ADOPT runs on CPU and CUDA tensors, got tensors on {group.device}")
    try:
        from ._kernels import triton_adopt
    except ImportError as exc:
        raise RuntimeError(f"fused ADOPT on {group.device} needs the Triton kernel: {exc}") from exc
    if not triton_adopt.triton_available():
        raise RuntimeError(f"fused ADOPT on {group.device} needs triton (pip install triton)")
    _check_supported(group)
    group, write_back = _contiguous_group(_local_group(group))
    device = group.device
    if not all(s.device == device and s.dtype == torch.float32 for s in group.steps):
        raise ValueError(f"fused ADOPT needs float32 step tensors on {device} (create state with fused=True)")
    clip, lr = triton_clip_and_lr(hyper.clip_lambda, hyper.lr, group.steps, device)
    scale, inf = _on_device(grad_scale, device), _on_device(found_inf, device)
    seeds = None
    if group.seeds is not None and group.params[0].dtype in SR_DTYPES:
        seeds = torch.stack([s.reshape(()) for s in group.seeds]).to(device, torch.int64)

    def run() -> None:
        triton_adopt.launch_group(
            group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, group.steps,
            grad_scale=scale, found_inf=inf, beta1=hyper.beta1, beta2=hyper.beta2, lr=lr,
            clip=clip, weight_decay=hyper.weight_decay, decouple=hyper.decouple, eps=hyper.eps,
            maximize=hyper.maximize, seeds=seeds, nesterov=hyper.nesterov, caution=hyper.caution,
            lr_max=hyper.lr_max,
        )
        for original, copy in write_back:
            original.copy_(copy)

    return run


@torch.library.custom_op(
    "adopt::fused_adopt_cpu_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "state_steps"), device_types="cpu"
)
def _fused_adopt_cpu_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    lr: float,
    lr_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    decouple: bool,
    maximize: bool,
    clip_exponent: Optional[float],
    clip_table: Optional[Tensor],
    seeds: list[Tensor],
    nesterov: bool = False,
    caution: bool = False,
    lr_max: Optional[float] = None,
) -> None:
    """One CPU dtype group's fused step as a PyTorch operator, which torch.compile records
    in its graph (the C call itself is opaque to it). ``clip_exponent``: ``s ** exponent``
    thresholds; ``clip_table``: one float64 threshold per tensor; neither: no clipping;
    ``seeds``: stochastic rounding (empty: nearest); ``lr_max``: corrected weight decay."""
    kernel = cast(ModuleType, _cpu_kernel())
    clip = _kernel_clip(kernel, (clip_exponent, clip_table))
    hyper = _Hyper(beta1, beta2, lr if lr_tensor is None else lr_tensor, None, weight_decay, decouple, eps, maximize,
                   False, nesterov, caution, lr_max)
    group = TensorGroup(params, grads, exp_avgs, exp_avg_sqs, state_steps, seeds or None)
    _plan_cpu_group(kernel, group, grad_scale, found_inf, hyper, clip)()


@_fused_adopt_cpu_op.register_fake
def _(*args: object) -> None:
    """Updates in place, returns nothing: nothing to describe to the compiler."""


def _traced_fused_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    has_complex: bool,
    hyper: _Hyper,
    seeds: Optional[list[Tensor]],
) -> None:
    """fused_adopt as torch.compile traces it: the tensors grouped by device and dtype (which
    torch's grouping helper leaves to the compiler), each CPU group one ``adopt::fused_adopt_cpu_``
    op, with the clip thresholds computed in the graph."""
    for group in group_tensors(params, grads, exp_avgs, exp_avg_sqs, state_steps, has_complex, seeds, strict=True):
        # Eager grouping reports these; a traced op given a meta or foreign tensor would be
        # dispatched to another device's kernel (the meta one does nothing) instead.
        mismatch = _group_mismatch(group)
        if mismatch is not None:
            raise ValueError(mismatch)
        if group.device.type != "cpu":
            _plan_cuda(group, grad_scale, found_inf, hyper)()
            continue
        _check_supported(group)
        if _cpu_kernel() is None:
            _plan_fallback([group], grad_scale, found_inf, hyper)()
            continue
        group = _local_group(group)
        # A schedule that takes host ints needs the steps read; the kernel validates them.
        spec = _clip_spec(hyper.clip_lambda, hyper.capturable, group.steps, lambda steps: [int(s.item()) for s in steps])
        if spec is None:
            raise ValueError("fused ADOPT on CPU needs each state step as a float32 CPU scalar tensor")
        exponent, table = spec
        lr = hyper.lr
        torch.ops.adopt.fused_adopt_cpu_(
            *_lists(group), grad_scale, found_inf, lr if not isinstance(lr, Tensor) else 0.0,
            lr if isinstance(lr, Tensor) else None, hyper.beta1, hyper.beta2, hyper.weight_decay, hyper.eps,
            hyper.decouple, hyper.maximize, exponent, table, group.seeds or [], hyper.nesterov, hyper.caution,
            hyper.lr_max,
        )
