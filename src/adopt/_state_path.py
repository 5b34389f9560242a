"""Low-memory optimizer state (``state_precision`` ``"bf16"`` or ``"8bit"``): the step.

Per tensor, with ``s`` its step count before the step and ``seed`` its ``state["seed"]``
(the format and the random draws are :mod:`adopt._state_formats`'s):

1. decode the stored moments to float32 ``m`` and ``v`` (8-bit ``v`` is ``u * u``, exact, so
   the full-precision rule's ``sqrt(v)`` gives back the stored ``u``);
2. apply the full-precision rule of :mod:`adopt._single_tensor` to the parameter, its
   gradient in float32 and these float32 moments (every option included);
3. encode both moments again with stochastic rounding, keys
   ``state_key(seed, s, "exp_avg")`` and ``state_key(seed, s, "exp_avg_sq")``; every step
   re-encodes both (at ``s == 0``, where ``m`` is unchanged, that gives back its codes).

The torch-op paths (``"single"``, ``"foreach"``) do exactly that with the single-tensor or
foreach rule on float32 copies, a bounded number of elements at a time (so the copies never
hold the whole state at once). ``"fused"`` runs the C kernel (CPU) or Triton (CUDA), which
do the same in one pass over memory without the copies.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Union, cast

import torch
from torch import Tensor

from . import _state_formats as formats
from ._foreach import foreach_adopt
from ._fused import _warn_fallback_once, fused_cuda_available, triton_clip_and_lr
from ._single_tensor import single_tensor_adopt
from .schedules import ClipSchedule

__all__ = ["state_adopt", "check_state_tensors", "scale_blocks", "local_shard"]


# The torch-op paths decode at most this many elements at once (plus one tensor larger than
# it): the float32 copies of m and v then take at most 8 bytes times this.
_DECODE_BUDGET = 1 << 22

_Key = Union[int, Tensor]


def _is_dtensor(t: Tensor) -> bool:
    if type(t) in (Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_rows(p: Tensor) -> Optional[int]:
    """For a DTensor sharded along dim 0 over a 1-D mesh (FSDP2's layout), the number of rows
    of its largest shard; None for a plain tensor. ValueError for any other DTensor layout."""
    if not _is_dtensor(p):
        return None
    from torch.distributed.tensor import Shard

    placements = p.placements  # type: ignore[attr-defined]
    if p.device_mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):  # type: ignore[attr-defined]
        raise ValueError(
            "low-precision state of a DTensor needs it sharded along dim 0 over a 1-D mesh (FSDP2's layout), "
            f"got placements {placements}"
        )
    world = p.device_mesh.size()  # type: ignore[attr-defined]
    return -(-p.shape[0] // world) if p.dim() else 1


def scale_blocks(p: Tensor) -> int:
    """The length of one moment's scale tensor for ``p``: one per block of its elements; for
    an FSDP2 DTensor, each rank's shard has as many as the largest shard needs (the global
    length is that times the world size, so it shards evenly), the first
    ``ceil(local numel / 256)`` of them in use."""
    rows = shard_rows(p)
    if rows is None:
        return -(-p.numel() // formats.BLOCK_SIZE)
    row_numel = p[0].numel() if p.dim() else 1
    return p.device_mesh.size() * -(-(rows * row_numel) // formats.BLOCK_SIZE)  # type: ignore[attr-defined]


def local_shard(t: Tensor) -> Tensor:
    """A DTensor's local shard (the tensor itself, not an autograd view), else ``t``."""
    if not _is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()  # type: ignore[attr-defined, no-any-return]


def _used_scales(scales: Tensor, shard: Tensor) -> Tensor:
    """The part of a local scale tensor that the local shard's blocks use."""
    return scales[: -(-shard.numel() // formats.BLOCK_SIZE)]


def check_state_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_scales: Optional[list[Tensor]],
    exp_avg_sq_scales: Optional[list[Tensor]],
    state_steps: list[Tensor],
    seeds: Optional[list[Tensor]],
    fmt: str,
    name: Optional[Callable[[int], str]] = None,
) -> None:
    """Raise (ValueError for the lists, RuntimeError for a tensor, naming the parameter) unless
    every tensor is what a ``fmt`` step reads and writes: gradients of the parameter's shape,
    dtype and device; moments as :data:`adopt._state_formats` stores them (contiguous, on the
    parameter's device); one-element steps and int64 seeds."""
    if fmt not in formats.LOW_PRECISIONS:
        raise ValueError(f"state_precision must be one of {formats.LOW_PRECISIONS} here, got {fmt!r}")
    n = len(params)
    if seeds is None:
        raise ValueError(f"state_precision={fmt!r} needs one seed per parameter ({n}), got None")
    lists = [grads, exp_avgs, exp_avg_sqs, state_steps, seeds]
    if fmt == "8bit":
        if exp_avg_scales is None or exp_avg_sq_scales is None:
            raise ValueError("state_precision='8bit' needs exp_avg_scales and exp_avg_sq_scales")
        lists += [exp_avg_scales, exp_avg_sq_scales]
    if any(len(ts) != n for ts in lists):
        raise ValueError(f"the tensor lists have different lengths: {[n] + [len(ts) for ts in lists]}")
    code_dtype = torch.uint8 if fmt == "8bit" else torch.bfloat16
    if _plainly_valid(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, state_steps, seeds,
                      code_dtype):
        return
    where = name or "params[{}]".format
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or p.dtype not in formats.STATE_PARAM_DTYPES:
            got = p.dtype if isinstance(p, Tensor) else type(p).__name__
            raise RuntimeError(
                f"ADOPT: state_precision={fmt!r} stores the moments of float32, bfloat16 and float16 "
                f"parameters; {where(i)} is {got} (use state_precision='full' for its group)"
            )
        g = grads[i]
        if not isinstance(g, Tensor) or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise RuntimeError(f"ADOPT: {where(i)} is {_describe(p)}, but its grad is {_describe(g)}")
        entries: list[tuple[str, Any, torch.dtype, tuple[int, ...]]] = [
            ("exp_avg", exp_avgs[i], code_dtype, p.shape), ("exp_avg_sq", exp_avg_sqs[i], code_dtype, p.shape)]
        if fmt == "8bit":
            blocks = (scale_blocks(p),)
            assert exp_avg_scales is not None and exp_avg_sq_scales is not None
            entries += [("exp_avg scales", exp_avg_scales[i], torch.float32, blocks),
                        ("exp_avg_sq scales", exp_avg_sq_scales[i], torch.float32, blocks)]
        for key, t, dtype, shape in entries:
            if (not isinstance(t, Tensor) or t.dtype != dtype or t.shape != shape or t.device != p.device
                    or not t.is_contiguous()):
                raise RuntimeError(
                    f"ADOPT: {where(i)} is {_describe(p)}, its {key} must be a contiguous {dtype} tensor of "
                    f"shape {tuple(shape)} on {p.device}, got {_describe(t)}"
                )
        step, seed = state_steps[i], seeds[i]
        if not isinstance(step, Tensor) or step.numel() != 1:
            raise RuntimeError(f"ADOPT: the step of {where(i)} must be a one-element tensor")
        if not isinstance(seed, Tensor) or seed.numel() != 1 or seed.dtype != torch.int64:
            raise RuntimeError(f"ADOPT: the seed of {where(i)} must be a one-element int64 tensor")


_PLAIN = {Tensor, torch.nn.Parameter}
_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")
_device = operator.attrgetter("device")


def _plainly_valid(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_scales: Optional[list[Tensor]],
    exp_avg_sq_scales: Optional[list[Tensor]],
    state_steps: list[Tensor],
    seeds: list[Tensor],
    code_dtype: torch.dtype,
) -> bool:
    """The common case of :func:`check_state_tensors` in C-level ``map`` calls: plain tensors
    that pass every check (False: the per-tensor checks then find and word the problem)."""
    lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps, seeds]
    if exp_avg_scales is not None and exp_avg_sq_scales is not None:
        lists += [exp_avg_scales, exp_avg_sq_scales]
    if not all(set(map(type, ts)) <= _PLAIN for ts in lists):
        return False
    if not set(map(_dtype, params)) <= set(formats.STATE_PARAM_DTYPES) or set(map(_dtype, seeds)) - {torch.int64}:
        return False
    dtypes, shapes, devices = list(map(_dtype, params)), list(map(_shape, params)), list(map(_device, params))
    if list(map(_dtype, grads)) != dtypes or list(map(_shape, grads)) != shapes:
        return False
    for ts in (grads, exp_avgs, exp_avg_sqs):
        if list(map(_device, ts)) != devices:
            return False
    for ts in (exp_avgs, exp_avg_sqs):
        if (set(map(_dtype, ts)) - {code_dtype} or list(map(_shape, ts)) != shapes
                or not all(map(Tensor.is_contiguous, ts))):
            return False
    if set(map(Tensor.numel, state_steps)) - {1} or set(map(Tensor.numel, seeds)) - {1}:
        return False
    if exp_avg_scales is not None and exp_avg_sq_scales is not None:
        blocks = [(-(-n // formats.BLOCK_SIZE),) for n in map(Tensor.numel, params)]
        for scales in (exp_avg_scales, exp_avg_sq_scales):
            if (set(map(_dtype, scales)) - {torch.float32} or list(map(tuple, map(_shape, scales))) != blocks
                    or list(map(_device, scales)) != devices or not all(map(Tensor.is_contiguous, scales))):
                return False
    return True


def _describe(t: object) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    contiguity = "" if t.is_contiguous() else "non-contiguous "
    return f"a {contiguity}{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def state_adopt(
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
    path: str,
    beta1: float,
    beta2: float,
    lr: Union[float, Tensor],
    clip_lambda: Optional[ClipSchedule],
    weight_decay: float,
    decouple: bool,
    eps: float,
    maximize: bool,
    capturable: bool,
    stochastic_rounding: bool,
    nesterov: bool = False,
    caution: bool = False,
    lr_max: Optional[float] = None,
    checked: bool = False,
) -> None:
    """One step of tensors whose moments are stored as ``fmt`` (module docstring), on
    ``path`` ("single", "foreach" or "fused"). The lists must pass :func:`check_state_tensors`
    (``checked``: the caller has just run it). ``stochastic_rounding``: bfloat16/float16
    parameters are written back with stochastic rounding (``seeds`` serve both)."""
    if not checked:
        check_state_tensors(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, state_steps,
                            seeds, fmt)
    if not params:
        return
    if any(map(_is_dtensor, params)):
        # FSDP2: every rank encodes its own shard as a tensor of its own (local element index).
        params, grads, exp_avgs, exp_avg_sqs = ([local_shard(t) for t in ts] for ts in (params, grads, exp_avgs,
                                                                                          exp_avg_sqs))
        if exp_avg_scales is not None and exp_avg_sq_scales is not None:
            exp_avg_scales = [_used_scales(local_shard(t), p) for t, p in zip(exp_avg_scales, params)]
            exp_avg_sq_scales = [_used_scales(local_shard(t), p) for t, p in zip(exp_avg_sq_scales, params)]
    hyper: dict[str, Any] = dict(beta1=beta1, beta2=beta2, lr=lr, clip_lambda=clip_lambda, weight_decay=weight_decay,
                 decouple=decouple, eps=eps, maximize=maximize, capturable=capturable, nesterov=nesterov,
                 caution=caution, lr_max=lr_max)
    if path == "fused":
        lists = (params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, state_steps, seeds)
        if fused_state_available(params):
            _fused(lists, grad_scale, found_inf, fmt=fmt, stochastic_rounding=stochastic_rounding, **hyper)
            return
        off_cpu = next((p.device for p in params if not p.is_cpu), None)
        if off_cpu is not None:  # as the full-precision fused path: no silent fallback on a device
            raise RuntimeError(f"fused ADOPT on {off_cpu} needs the Triton kernel (pip install triton)")
        _warn_fallback_once("fused=True runs the foreach path for low-precision state instead")
        if found_inf is not None and float(found_inf) != 0.0:
            return
        if grad_scale is not None:
            grads = list(torch._foreach_mul(grads, 1.0 / float(grad_scale)))
        grad_scale = found_inf = None
        path = "foreach"
    if grad_scale is not None or found_inf is not None:
        raise RuntimeError(f"the {path} path expects unscaled gradients (grad_scale/found_inf are fused-only)")
    inner = single_tensor_adopt if path == "single" else foreach_adopt
    # Keys (and so host step counts) before any tensor changes: they are the counts before
    # the step, and a failure to read them must leave everything untouched.
    keys = [_keys(seed, step, capturable) for seed, step in zip(seeds, state_steps)]
    for chunk in _chunks(params, 1 if path == "single" else _DECODE_BUDGET):
        moments = [_decode(i, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, fmt) for i in chunk]
        inner(
            # float32 gradients: the rule runs in float32 (g * g of a float16 gradient would underflow).
            [params[i] for i in chunk], [grads[i].float() for i in chunk], [m for m, _ in moments],
            [v for _, v in moments],
            [state_steps[i] for i in chunk], None, None, has_complex=False, differentiable=False,
            seeds=[seeds[i] for i in chunk] if stochastic_rounding else None, **hyper,
        )
        for i, (m, v) in zip(chunk, moments):
            _encode(i, m, v, keys[i], exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, fmt)


def fused_state_available(params: list[Tensor]) -> bool:
    """Whether the fused kernels for low-precision state can run every one of ``params``
    (the C extension with its low-precision step on CPU; triton on CUDA)."""
    if all(p.is_cpu for p in params):
        from ._fused_state import fused_state_cpu_available

        return fused_state_cpu_available()
    return all(p.is_cpu or p.is_cuda for p in params) and fused_cuda_available() and (
        not any(p.is_cpu for p in params) or fused_state_available([p for p in params if p.is_cpu]))


def _fused(
    lists: tuple[Optional[list[Tensor]], ...],
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    *,
    capturable: bool,
    **hyper: Any,
) -> None:
    """The fused kernels on ``lists`` (state_adopt's eight lists): the CPU tensors in one C
    call, each CUDA device and dtype in one Triton launch sequence (``hyper``: state_adopt's
    keywords; the kernels keep steps on the device, so ``capturable`` changes nothing)."""
    params = cast(list[Tensor], lists[0])

    def pick(indices: list[int]) -> list[Optional[list[Tensor]]]:
        return [None if ts is None else [ts[i] for i in indices] for ts in lists]

    cpu = [i for i, p in enumerate(params) if p.is_cpu]
    by_device: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        if not p.is_cpu:
            by_device.setdefault((p.device, p.dtype), []).append(i)
    if cpu:
        from ._fused_state import fused_state_cpu

        ps, gs, ms, vs, m_scales, v_scales, steps, seeds = pick(cpu)
        fused_state_cpu(cast(list[Tensor], ps), cast(list[Tensor], gs), cast(list[Tensor], ms),
                        cast(list[Tensor], vs), m_scales, v_scales, cast(list[Tensor], steps),
                        cast(list[Tensor], seeds), grad_scale, found_inf, **hyper)
    for (device, _), indices in by_device.items():
        _launch_cuda(pick(indices), device, grad_scale, found_inf, **hyper)


def _launch_cuda(
    lists: list[Optional[list[Tensor]]],
    device: torch.device,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    *,
    fmt: str,
    clip_lambda: Optional[ClipSchedule],
    lr: Union[float, Tensor],
    **hyper: Any,
) -> None:
    """One Triton launch sequence for a CUDA device and dtype; nothing synchronises."""
    from ._kernels import triton_state

    params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps, seeds = lists
    assert params is not None and grads is not None and exp_avgs is not None and exp_avg_sqs is not None
    assert steps is not None and seeds is not None
    if not all(s.device == device and s.dtype == torch.float32 for s in steps):
        raise ValueError(f"fused ADOPT needs float32 step tensors on {device} (create state with fused=True)")
    clip, lr = triton_clip_and_lr(clip_lambda, lr, steps, device)
    triton_state.launch_state_group(
        params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps, fmt=fmt,
        seeds=torch.stack([s.reshape(()) for s in seeds]).to(device, torch.int64),
        grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
        found_inf=None if found_inf is None else found_inf.to(device, non_blocking=True),
        lr=lr, clip=clip, **hyper,
    )


def _keys(seed: Tensor, step: Tensor, on_device: bool) -> tuple[_Key, _Key]:
    """The rounding keys of m and v for this step: on the device (no synchronisation) or as
    host ints."""
    if on_device:
        s, c = seed.reshape(()).to(torch.int64), step.reshape(()).to(torch.int64)
        return formats.state_key(s, c, "exp_avg"), formats.state_key(s, c, "exp_avg_sq")
    s_int, c_int = int(seed), int(step.item())
    return formats.state_key(s_int, c_int, "exp_avg"), formats.state_key(s_int, c_int, "exp_avg_sq")


def _chunks(params: list[Tensor], budget: int) -> list[list[int]]:
    """Consecutive indices in runs of at most ``budget`` elements (a larger tensor alone)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, p in enumerate(params):
        n = p.numel()
        if current and size + n > budget:
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        chunks.append(current)
    return chunks


def _decode(
    i: int,
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_scales: Optional[list[Tensor]],
    exp_avg_sq_scales: Optional[list[Tensor]],
    fmt: str,
) -> tuple[Tensor, Tensor]:
    """Tensor ``i``'s moments as float32 tensors of its shape."""
    m_stored, v_stored = exp_avgs[i], exp_avg_sqs[i]
    if fmt == "bf16":
        return m_stored.float(), v_stored.float()
    assert exp_avg_scales is not None and exp_avg_sq_scales is not None
    m = formats.dequantize(formats.QuantizedMoment(m_stored.view(-1), exp_avg_scales[i]), "exp_avg")
    v = formats.dequantize(formats.QuantizedMoment(v_stored.view(-1), exp_avg_sq_scales[i]), "exp_avg_sq")
    return m.view(m_stored.shape), v.view(v_stored.shape)


def _encode(
    i: int,
    m: Tensor,
    v: Tensor,
    keys: tuple[_Key, _Key],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_scales: Optional[list[Tensor]],
    exp_avg_sq_scales: Optional[list[Tensor]],
    fmt: str,
) -> None:
    """Store tensor ``i``'s new float32 moments with stochastic rounding."""
    if fmt == "bf16":
        exp_avgs[i].copy_(formats.round_bf16(m, keys[0]))
        exp_avg_sqs[i].copy_(formats.round_bf16(v, keys[1]))
        return
    assert exp_avg_scales is not None and exp_avg_sq_scales is not None
    formats.quantize(m, "exp_avg", keys[0], out=formats.QuantizedMoment(exp_avgs[i].view(-1), exp_avg_scales[i]))
    formats.quantize(v, "exp_avg_sq", keys[1],
                     out=formats.QuantizedMoment(exp_avg_sqs[i].view(-1), exp_avg_sq_scales[i]))
