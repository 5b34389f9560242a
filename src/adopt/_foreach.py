"""Multi-tensor (foreach) ADOPT: the single-tensor rule over lists, grouped by device and dtype.

Every tensor keeps its own step count. Host steps split each group into tensors taking their
first step (``v = g * g``) and tensors taking a real update, and the clip threshold is given
per tensor, so a parameter that joins late or skips steps is updated exactly as the
single-tensor path would update it. With ``capturable=True`` the split is arithmetic on
per-tensor 0-d masks instead, with no host synchronisation.

Memory: the rule needs a few list-sized temporaries at once (``sqrt(v)`` and ``g / sqrt(v)``,
the L2-decayed gradients, the capturable path's selections). Each group is therefore run in
chunks of a bounded element count, a large contiguous tensor being cut into flat slices, so
that all temporaries alive at once stay within the group's own size, as for
``torch.optim.AdamW(foreach=True)``; a group below :data:`_MIN_CHUNK` elements is one chunk.
On the CPU a chunk also holds at most :data:`_CPU_CHUNK` elements, so that its temporaries
stay in cache between the ops that write and read them: measured on 2 cores, a step over
10M parameters in 20 tensors took 45 ms in chunks of half the group and 11 ms in chunks of
256K elements (single-tensor: 15 ms).
``maximize`` negates the normalised gradient in place (``(-g) / d == -(g / d)`` and
``g * g == (-g) * (-g)`` exactly) instead of copying the gradients.

Every result is bit-identical to the single-tensor path, in float16 and bfloat16 too: on the
CPU, in-place ``torch._foreach_mul_`` with a Python scalar (or a scalar list) rounds the
scalar to the tensors' dtype before multiplying, where ``Tensor.mul_`` keeps it in float32,
so for those dtypes the factor is passed as a 0-d float64 tensor, which is kept wide. The
other foreach ops used here (out-of-place ``_foreach_mul``, ``lerp_`` with a scalar weight,
``addcmul_`` with a value, ``add_``/``add`` with alpha, the clamps) round like their
single-tensor counterparts.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, TypeVar, Union, cast

import torch
from torch import Tensor

from ._grouping import group_tensors
from ._random import SR_DTYPES
from ._rounding import device_key, host_key, write_rounded_, write_rounded_where_
from ._variants import agreement, caution_weight, compute_dtype, decay_lr, masked
from .schedules import ClipSchedule, device_thresholds, host_thresholds

# A group (or its first-step part) up to this many elements runs as one chunk: below it the
# fixed cost of more foreach calls outweighs the memory saved (at most a few MiB).
_MIN_CHUNK = 1 << 18

# Largest chunk on the CPU (elements; 1 MiB per float32 temporary), see the module docstring.
_CPU_CHUNK = 1 << 18

# Only these are cut into flat slices; a tensor subclass (DTensor) is kept whole.
_PLAIN = (Tensor, torch.nn.Parameter)

# Dtypes whose in-place foreach scalar multiply rounds the scalar on the CPU (see above).
_LOW_PRECISION = (torch.float16, torch.bfloat16)

_T = TypeVar("_T")
# (grads, exp_avg_sqs, exp_avgs, chunk indices, negate) -> a chunk's normalised gradients.
_Normalise = Callable[[list[Tensor], list[Tensor], list[Tensor], Optional[list[int]], bool], list[Tensor]]


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
    seeds: Optional[list[Tensor]] = None,
    nesterov: bool = False,
    caution: bool = False,
    lr_max: Optional[float] = None,
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

    groups = group_tensors(params, grads, exp_avgs, exp_avg_sqs, state_steps, has_complex, seeds)
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

    l2 = weight_decay if weight_decay != 0 and not decouple else 0.0
    decoupled_wd = weight_decay if decouple else 0.0
    for group, counts, clip in zip(groups, host_steps, clips):
        # Under torch.compile one group may hold several dtypes: keys only for 16-bit tensors.
        rounded = group.seeds is not None and any(p.dtype in SR_DTYPES for p in group.params)
        if capturable:
            keys = [
                device_key(seed, step) if p.dtype in SR_DTYPES else None
                for p, seed, step in zip(group.params, group.seeds, group.steps)  # type: ignore[arg-type]
            ] if rounded else None
            _capturable_group(group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, group.steps,
                              cast(Optional[Tensor], clip), beta1=beta1, beta2=beta2, lr=lr, l2=l2,
                              weight_decay=decoupled_wd, eps=eps, maximize=maximize, keys=keys,
                              nesterov=nesterov, caution=caution, lr_max=lr_max)
        else:
            host_keys = [
                host_key(seed, count) if p.dtype in SR_DTYPES else None
                for p, seed, count in zip(group.params, group.seeds, counts)  # type: ignore[arg-type]
            ] if rounded else None
            _host_group(group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, counts,
                        cast(Optional[list[float]], clip), beta1=beta1, beta2=beta2, lr=cast(float, lr),
                        l2=l2, weight_decay=decoupled_wd, eps=eps, maximize=maximize, keys=host_keys,
                        nesterov=nesterov, caution=caution, lr_max=lr_max)
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
    l2: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    keys: Optional[list[Optional[int]]] = None,
    nesterov: bool = False,
    caution: bool = False,
    lr_max: Optional[float] = None,
) -> None:
    """The rule with the first-step/update split done on the host; ``weight_decay`` is decoupled.

    Temporaries alive at once, in chunk-sized lists: ``sqrt(v)`` and ``g / sqrt(v)``, plus the
    decayed gradients with L2 decay; with ``keys`` (stochastic rounding: one key per tensor,
    None for a tensor rounded to nearest) also the float32 parameter values and updates; with
    ``nesterov`` the updates, with ``caution`` the masks and masked updates. A cautious step
    takes two passes (:func:`_caution_weights` first): each tensor's weight depends on
    all of its elements.
    """
    first = [i for i, s in enumerate(host_steps) if s == 0]
    if first:
        lists = [[ts[i] for i in first] for ts in (params, grads, exp_avg_sqs)]
        for (p, g, v), _ in _chunks(lists, (1 if l2 == 0 else 2)):
            g, _negate = _signed_grads(p, g, l2, maximize)  # the square does not need the sign
            _copy_(v, torch._foreach_mul(g, g))
            del g
    if len(first) == len(host_steps):
        return
    if first:
        keep = [i for i, s in enumerate(host_steps) if s != 0]
        params, grads, exp_avgs, exp_avg_sqs = (
            [ts[i] for i in keep] for ts in (params, grads, exp_avgs, exp_avg_sqs)
        )
        clip = None if clip is None else [clip[i] for i in keep]
        keys = None if keys is None else [keys[i] for i in keep]

    temporaries = (2 if l2 == 0 else 3) + (0 if keys is None else 4) + nesterov + 2 * caution
    decay = 1 - cast(float, decay_lr(lr, lr_max)) * weight_decay if weight_decay != 0 else None
    def normalise(g: list[Tensor], v: list[Tensor], m: list[Tensor], idx: Optional[list[int]],
                  negate: bool) -> list[Tensor]:
        return _normalised(g, v, eps, negate, None if clip is None else _pick(clip, idx))

    weights = None
    if caution:  # a first pass updates m and counts each tensor's agreeing elements
        weights = _caution_weights(params, grads, exp_avgs, exp_avg_sqs, temporaries, normalise, beta1=beta1, l2=l2,
                                   maximize=maximize, nesterov=nesterov)
    for (p, g, m, v), idx in _chunks([params, grads, exp_avgs, exp_avg_sqs], temporaries):
        g, negate = _signed_grads(p, g, l2, maximize)
        if decay is not None and keys is None:
            _scale_(p, decay)
        tensor_of = _pick(range(len(params)), idx)
        update = _chunk_updates(m, g, v, idx, negate, normalise, weights, tensor_of, beta1=beta1, nesterov=nesterov)
        if keys is None:
            torch._foreach_add_(p, update, alpha=-lr)
        else:
            for p_i, u_i, j in zip(p, update, tensor_of):
                key = keys[j]
                if key is not None:
                    write_rounded_(p_i, u_i, lr, decay, key, _offset(p_i, params[j]))
                    continue
                if decay is not None:
                    p_i.mul_(decay)
                p_i.add_(u_i, alpha=-lr)
        del update
        _scale_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        del g  # before the next chunk allocates its own


def _caution_weights(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    temporaries: int,
    normalise: "_Normalise",
    *,
    beta1: float,
    l2: float,
    maximize: bool,
    nesterov: bool,
) -> list[Tensor]:
    """The first pass of a cautious step: ``m`` updated, and each tensor's caution weight
    (:func:`adopt._variants.caution_weight`) from its agreeing elements, counted over all of
    its slices. ``v`` is left for the second pass, which needs the old one with Nesterov."""
    counts: list[Optional[Tensor]] = [None] * len(params)
    for (p, g, m, v), idx in _chunks([params, grads, exp_avgs, exp_avg_sqs], temporaries):
        g, negate = _signed_grads(p, g, l2, maximize)
        normed = normalise(g, v, m, idx, negate)
        torch._foreach_lerp_(m, normed, 1 - beta1)
        update = torch._foreach_lerp(m, normed, 1 - beta1) if nesterov else m
        del normed
        for u, g_i, j in zip(update, g, _pick(range(len(params)), idx)):
            kept, before = agreement(u, g_i, negate).sum(), counts[j]
            counts[j] = kept if before is None else before + kept
    return [caution_weight(cast(Tensor, c), t.numel(), compute_dtype(t)) for c, t in zip(counts, params)]


def _chunk_updates(
    m: list[Tensor],
    g: list[Tensor],
    v: list[Tensor],
    idx: Optional[list[int]],
    negate: bool,
    normalise: "_Normalise",
    weights: Optional[list[Tensor]],
    tensor_of: list[int],
    *,
    beta1: float,
    nesterov: bool,
) -> list[Tensor]:
    """A chunk's updates, ``m`` updated first (unless a cautious first pass did): ``m``, or
    ``lerp(m, n, 1 - beta1)`` with Nesterov; with ``weights`` (caution, one per tensor)
    masked where they disagree with the gradient and scaled."""
    update = m
    if weights is None or nesterov:
        normed = normalise(g, v, m, idx, negate)
        if weights is None:
            torch._foreach_lerp_(m, normed, 1 - beta1)
        if nesterov:
            update = list(torch._foreach_lerp(m, normed, 1 - beta1))
        del normed
    if weights is not None:
        update = [masked(u, agreement(u, g_i, negate), weights[j]) for u, g_i, j in zip(update, g, tensor_of)]
    return update


def _normalised(
    grads: list[Tensor], exp_avg_sqs: list[Tensor], eps: float, negate: bool, clip: Optional[list[float]]
) -> list[Tensor]:
    """``clamp(g / max(sqrt(v), eps), -c, c)`` per tensor (negated first if ``negate``)."""
    normed = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_clamp_min_(normed, eps)
    normed = torch._foreach_div(grads, normed)
    if negate:
        torch._foreach_neg_(normed)
    if clip is not None:
        torch._foreach_clamp_min_(normed, [-x for x in clip])
        torch._foreach_clamp_max_(normed, clip)
    return list(normed)


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
    l2: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    keys: Optional[list[Optional[Tensor]]] = None,
    nesterov: bool = False,
    caution: bool = False,
    lr_max: Optional[float] = None,
) -> None:
    """Same rule with per-tensor masks in place of the host split: no sync, no branch.

    ``weight_decay`` here is the decoupled decay; ``l2`` the L2 decay. The bulk math runs as
    foreach ops; the first-step selection is a per-tensor ``torch.where`` (a select, so an inf
    in the discarded branch never leaks). Temporaries alive at once: two chunk-sized lists
    (``sqrt(v)`` and ``g / sqrt(v)``; later ``g * g`` and one tensor's selection), plus the
    decayed gradients with L2 decay.
    """
    active = (torch.stack(steps) > 0).unbind()
    clips = None if clip is None else (clip.unbind(), (-clip).unbind())
    decay = 1 - decay_lr(lr, lr_max) * weight_decay if weight_decay != 0 else None
    temporaries = (2 if l2 == 0 else 3) + nesterov + 2 * caution
    def normalise(g: list[Tensor], v: list[Tensor], m: list[Tensor], idx: Optional[list[int]],
                  negate: bool) -> list[Tensor]:
        return _selected_normalised(g, v, m, _pick(active, idx), eps, negate, clips, idx)

    weights = None
    if caution:  # a first pass updates m and counts each tensor's agreeing elements
        weights = _caution_weights(params, grads, exp_avgs, exp_avg_sqs, temporaries, normalise, beta1=beta1, l2=l2,
                                   maximize=maximize, nesterov=nesterov)
    for (p, g, m, v), idx in _chunks([params, grads, exp_avgs, exp_avg_sqs], temporaries):
        a = _pick(active, idx)
        g, negate = _signed_grads(p, g, l2, maximize)
        if decay is not None and keys is None:
            _copy_where_(p, a, torch._foreach_mul(p, decay), p)  # type: ignore[arg-type]
        tensor_of = _pick(range(len(params)), idx)
        update = _chunk_updates(m, g, v, idx, negate, normalise, weights, tensor_of, beta1=beta1, nesterov=nesterov)
        if keys is not None:
            # One tensor at a time, as the single-tensor path computes it.
            for p_i, u_i, a_i, j in zip(p, update, a, tensor_of):
                key = keys[j]
                if key is not None:
                    write_rounded_where_(p_i, u_i, a_i, lr, decay, key, _offset(p_i, params[j]))
                    continue
                if decay is not None:
                    p_i.copy_(torch.where(a_i, p_i * decay, p_i))
                selected = torch.where(a_i, u_i, 0)
                if isinstance(lr, Tensor):
                    p_i.sub_(selected * lr)
                else:
                    p_i.add_(selected, alpha=-lr)
        else:
            update = [torch.where(a_i, u_i, 0) for u_i, a_i in zip(update, a)]
            if isinstance(lr, Tensor):
                torch._foreach_mul_(update, lr)
                torch._foreach_sub_(p, update)
            else:
                torch._foreach_add_(p, update, alpha=-lr)
        del update
        # v is decayed in place: where s == 0 the selection below discards it for g * g.
        squares = torch._foreach_mul(g, g)
        _scale_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        _copy_where_(v, a, v, squares)
        del squares, g  # before the next chunk allocates its own


def _selected_normalised(
    g: list[Tensor],
    v: list[Tensor],
    m: list[Tensor],
    active: list[Tensor],
    eps: float,
    negate: bool,
    clips: Optional[tuple[Sequence[Tensor], Sequence[Tensor]]],
    idx: Optional[list[int]],
) -> list[Tensor]:
    """The normalised gradients of a chunk, ``m`` itself where a tensor takes its first step
    (so the lerp leaves m unchanged there, and an inf g/eps is never used)."""
    denom = torch._foreach_sqrt(v)
    torch._foreach_clamp_min_(denom, eps)
    normed = list(torch._foreach_div(g, denom))
    del denom
    if negate:
        torch._foreach_neg_(normed)
    if clips is not None:
        torch._foreach_maximum_(normed, _pick(clips[1], idx))
        torch._foreach_minimum_(normed, _pick(clips[0], idx))
    # Each selection replaces its normalised gradient at once: one tensor more, not a list.
    for i, (m_i, a_i) in enumerate(zip(m, active)):
        normed[i] = torch.where(a_i, normed[i], m_i)
    return normed


def _signed_grads(params: list[Tensor], grads: list[Tensor], l2: float, maximize: bool) -> tuple[list[Tensor], bool]:
    """The gradients the rule uses, and whether the normalised gradient must still be negated.

    With L2 decay this is a new list, ``(-g if maximize else g) + l2 * p`` as the single-tensor
    path computes it; without, the gradients themselves, the sign left to the caller.
    """
    if l2 == 0:
        return grads, maximize
    if maximize:
        decayed = list(torch._foreach_neg(grads))
        torch._foreach_add_(decayed, params, alpha=l2)
        return decayed, False
    return list(torch._foreach_add(grads, params, alpha=l2)), False


def _copy_(dst: list[Tensor], src: Sequence[Tensor]) -> None:
    """``dst[i].copy_(src[i])``, tensor by tensor: DTensor (FSDP2) has no sharding rule for
    ``aten._foreach_copy_``."""
    for d, s in zip(dst, src):
        d.copy_(s)


def _copy_where_(dst: list[Tensor], cond: list[Tensor], a: Sequence[Tensor], b: Sequence[Tensor]) -> None:
    """``dst[i].copy_(torch.where(cond[i], a[i], b[i]))``, one selection alive at a time."""
    for d, c, x, y in zip(dst, cond, a, b):
        d.copy_(torch.where(c, x, y))


def _scale_(tensors: list[Tensor], factor: float) -> None:
    """``t.mul_(factor)`` for every tensor, rounded as ``Tensor.mul_`` rounds it."""
    first = tensors[0]
    if first.dtype in _LOW_PRECISION and first.is_cpu:
        # The CPU's in-place foreach multiply by a Python scalar first rounds the scalar to
        # float16/bfloat16; a 0-d tensor scalar is used at full precision, as Tensor.mul_ does.
        torch._foreach_mul_(tensors, torch.tensor(factor, dtype=torch.float64))
    else:
        torch._foreach_mul_(tensors, factor)


def _offset(part: Tensor, whole: Tensor) -> int:
    """The flat index in ``whole`` where ``part`` (``whole`` itself or a flat slice of it) starts."""
    return 0 if part is whole else int(part.storage_offset() - whole.storage_offset())


def _pick(values: Sequence[_T], idx: Optional[list[int]]) -> list[_T]:
    return list(values) if idx is None else [values[i] for i in idx]


def _chunks(
    lists: list[list[Tensor]], temporaries: int
) -> list[tuple[list[list[Tensor]], Optional[list[int]]]]:
    """The parallel ``lists`` in chunks whose ``temporaries`` list-sized temporaries stay within
    the lists' own size (each chunk holds at most ``1 / temporaries`` of the elements, or
    :data:`_MIN_CHUNK`; on the CPU at most :data:`_CPU_CHUNK`).

    Each chunk comes with, for every entry, the index of the tensor it is (a part of), for
    per-tensor values such as thresholds and masks; ``None`` when the lists are one chunk, as
    given. A tensor that does not fit in what is left of a chunk is cut into flat slices
    (``t.view(-1)[a:b]``) when it is a contiguous plain tensor in every list, else it starts
    a new chunk (alone, if it is larger than a chunk).
    """
    numels = [t.numel() for t in lists[0]]
    total = sum(numels)
    limit = max(-(-total // temporaries), _MIN_CHUNK)
    if lists[0] and lists[0][0].is_cpu:
        limit = min(limit, _CPU_CHUNK)
    if total <= limit:
        return [(lists, None)]
    chunks: list[tuple[list[list[Tensor]], Optional[list[int]]]] = []
    cur: list[list[Tensor]] = [[] for _ in lists]
    cur_idx: list[int] = []
    room = limit

    def flush() -> None:
        nonlocal cur, cur_idx, room
        if cur_idx:
            chunks.append((cur, cur_idx))
        cur, cur_idx, room = [[] for _ in lists], [], limit

    for i, n in enumerate(numels):
        if n <= room:
            for out, ts in zip(cur, lists):
                out.append(ts[i])
            cur_idx.append(i)
            room -= n
            continue
        if not all(type(ts[i]) in _PLAIN and ts[i].is_contiguous() for ts in lists):
            flush()
            for out, ts in zip(cur, lists):
                out.append(ts[i])
            cur_idx.append(i)
            room -= n
            if room <= 0:
                flush()
            continue
        flat = [ts[i].view(-1) for ts in lists]
        start = 0
        while start < n:
            stop = min(n, start + room)
            for out, f in zip(cur, flat):
                out.append(f[start:stop])
            cur_idx.append(i)
            room -= stop - start
            start = stop
            if room == 0:
                flush()
    flush()
    return chunks
