"""Fused ADOPT step for CUDA in Triton: one launch per device/dtype group, one pass over memory.

Design
------
* **Pointer table.** One int64 device buffer per group holds, for each tensor, a row
  ``(param, grad, exp_avg, exp_avg_sq, step, numel, blocks)`` of raw addresses and sizes,
  then the block map (one ``(tensor, chunk)`` int32 pair per program), then one int32
  completion counter per tensor. Each program reads its pair, its tensor's row, and then
  streams one ``BLOCK`` chunk of p, g, m, v: every element is read once and written once.
* **Caching.** The buffer is a pure function of the tensors' addresses and sizes, so it is
  cached under exactly that key (LRU): repeated steps neither rebuild nor re-upload it. The
  upload is one host-to-device copy from pinned memory that the plan keeps alive, so a
  plan first built inside CUDA-graph capture is replayed correctly; plans used during a
  capture are kept for the life of the process, since the graph holds their addresses.
  (The table, its cache and the launch arguments are ``_triton_common``'s, shared with
  ``triton_state``; so are this module's jit helpers that ``triton_state`` imports.)
* **No host sync.** The step counters, a tensor ``lr``, ``grad_scale``, ``found_inf`` and
  per-tensor clip thresholds are all read inside the kernel.
* **Step counters.** Every program reads its tensor's old step, does its chunk, then (after
  a CTA barrier) bumps its tensor's completion counter with an acq_rel atomic. The program
  that completes a tensor writes ``step + 1`` and resets the counter to zero, so no program
  of that tensor can still be reading the old step, and the buffer is ready for the next
  launch or graph replay. When ``found_inf`` is nonzero nothing is loaded or stored.
* **Stochastic rounding** (``seeds`` given, float16/bfloat16 only): the parameter is written
  back with the counter-based rounding of ``adopt/_random.py``, from the stored momentum and
  with FP contraction off for that launch, as the C kernel computes it. A chunk never
  crosses a multiple of 2**32 elements, so the high index part is one word per program.
* **Blocks.** 8 warps per program and 8 elements of each stream per thread (2048 fp32 or
  fp16/bf16 elements, 1024 fp64): two 16-byte vector loads per stream per thread for fp32,
  about 80 registers, so three programs share an SM and one's table lookups hide behind the
  others' streaming. Full chunks take an unmasked path, so accesses stay 16 bytes wide when
  every address is 16-byte aligned (checked when the plan is built; otherwise an unhinted
  variant runs); a tensor's last, partial chunk runs as four small masked sub-chunks.

Run on CPU tensors only under ``TRITON_INTERPRET=1`` (set before ``triton`` is imported).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # the package works without triton; the dispatcher checks triton_available()
    triton = None  # type: ignore[assignment]

from . import _triton_common as common
from ._triton_common import Clip

__all__ = ["triton_available", "launch_group", "plan_builds", "clear_plan_cache", "Clip"]

_ROW = 7  # int64 fields per tensor: p, g, m, v, step addresses, numel, number of blocks
_NUM_WARPS = 8
# Elements of each stream per program: 8 per thread (two 16-byte vectors of fp32, one of
# fp16/bf16), 4 for fp64; about 80 registers, so three 256-thread programs fit on an SM.
_BLOCK_ELEMS = {torch.float16: 2048, torch.bfloat16: 2048, torch.float32: 2048, torch.float64: 1024}
_TAIL_SPLIT = 4  # a partial chunk runs as this many masked sub-chunks, to spare registers


def triton_available() -> bool:
    """Whether triton could be imported (the kernel itself needs CUDA or ``TRITON_INTERPRET=1``)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _row_pointer(row, field: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
        """Address ``field`` of a table row as a typed pointer, hinted 16-byte aligned if known."""
        ptr = tl.load(row + field).to(tl.pointer_type(DTYPE))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        return ptr

    @triton.jit
    def _mix32(x):
        """The 32-bit hash of adopt/_random.py on uint32 values (arithmetic modulo 2**32)."""
        x = x ^ (x >> 16)
        x = x * tl.full((), 0x7FEB352D, tl.uint32)
        x = x ^ (x >> 15)
        x = x * tl.full((), 0x846CA68B, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def _draws(offs, key):
        """The 16-bit random draws of elements ``offs`` under ``key`` (which holds the pair
        index's high part, adopt/_random.py): half ``offs & 1`` of pair ``offs >> 1``'s word."""
        word = _mix32((offs >> 1).to(tl.uint32) * tl.full((), 0x9E3779B9, tl.uint32) ^ key)
        return (word >> ((offs & 1).to(tl.uint32) * 16)) & 0xFFFF

    @triton.jit
    def _round_stochastic(x, r, DTYPE: tl.constexpr):
        """float32 ``x`` to DTYPE (bfloat16 or float16) with the 16-bit random draws ``r``."""
        u = x.to(tl.uint32, bitcast=True)
        a = u & 0x7FFFFFFF
        nan = a > 0x7F800000
        if DTYPE == tl.bfloat16:
            up = ((u + r) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            sign = u & 0x80000000
            normal = ((a + (r & 0x1FFF)) & 0xFFFFE000) | sign
            scaled = a.to(tl.float32, bitcast=True) * 16777216.0
            low = tl.floor(scaled)
            draw = r.to(tl.float32) * 1.52587890625e-05  # r * 2**-16
            sub = (low + tl.where(draw < scaled - low, 1.0, 0.0)) * 5.9604644775390625e-08
            up = tl.where(a < 0x38800000, sub.to(tl.uint32, bitcast=True) | sign, normal).to(tl.float32, bitcast=True)
        return tl.where(nan, x, up).to(DTYPE)

    @triton.jit
    def _grad(g_ptr, offs, mask, inv_scale, COMPUTE: tl.constexpr, MAXIMIZE: tl.constexpr):
        """Load g in the compute dtype, unscaled and negated as asked."""
        g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
        if inv_scale is not None:
            g = g * inv_scale
        if MAXIMIZE:
            g = -g
        return g

    @triton.jit
    def _first_step(p_ptr, g_ptr, v_ptr, offs, mask, inv_scale, wd,
                    COMPUTE: tl.constexpr, MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr):
        """s = 0: v <- g*g; p and m are left alone."""
        g = _grad(g_ptr, offs, mask, inv_scale, COMPUTE, MAXIMIZE)
        if WD_MODE == 1:
            g = g + wd * tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
        tl.store(v_ptr + offs, (g * g).to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _normalised_root(g, root, eps, clip, COMPUTE: tl.constexpr):
        """clamp(g / max(root, eps), -clip, clip), IEEE-rounded (``root`` the root of v)."""
        if COMPUTE == tl.float64:  # float64 division is IEEE-rounded already
            n = g / tl.where(root < eps, eps, root)  # max(root, eps), NaN-propagating
        else:  # IEEE-rounded, not the approximate float32 default
            n = tl.div_rn(g, tl.where(root < eps, eps, root))
        if clip is not None:
            n = tl.where(n > clip, clip, tl.where(n < -clip, -clip, n))
        return n

    @triton.jit
    def _normalised(g, v, eps, clip, COMPUTE: tl.constexpr):
        """clamp(g / max(sqrt(v), eps), -clip, clip), IEEE-rounded."""
        if COMPUTE == tl.float64:  # float64 sqrt is IEEE-rounded already
            root = tl.sqrt(v)
        else:  # IEEE-rounded, not the approximate float32 default
            root = tl.sqrt_rn(v)
        return _normalised_root(g, root, eps, clip, COMPUTE)

    @triton.jit
    def _store_param(p_ptr, offs, mask, p, key, ROUNDED: tl.constexpr):
        """Write p back: to nearest, or with stochastic rounding under ``key``."""
        if ROUNDED:
            tl.store(p_ptr + offs, _round_stochastic(p, _draws(offs, key), p_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add(a, b):
        """The combine function of a sum (tl.reduce: tl.sum is a library jit function that the
        interpreter does not run when triton was imported without it)."""
        return a + b

    @triton.jit
    def _agree(u, g):
        """Whether u and g have the same nonzero sign."""
        return ((u > 0) & (g > 0)) | ((u < 0) & (g < 0))

    @triton.jit
    def _later_step(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, inv_scale, lr, wd, decay,
                    one_minus_beta1, beta2, one_minus_beta2, eps, clip, key,
                    COMPUTE: tl.constexpr, MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr,
                    ROUNDED: tl.constexpr, NESTEROV: tl.constexpr):
        """s >= 1: normalise by the old v, clip, update m and p, then v. ROUNDED: p written
        back with stochastic rounding under ``key`` (offsets' high part folded into it), from
        the stored m. NESTEROV: the update is lerp(m, n, 1 - beta1)."""
        g = _grad(g_ptr, offs, mask, inv_scale, COMPUTE, MAXIMIZE)
        p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
        m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
        v = tl.load(v_ptr + offs, mask=mask).to(COMPUTE)
        if WD_MODE == 1:
            g = g + wd * p
        if WD_MODE == 2:
            p = p * decay
        n = _normalised(g, v, eps, clip, COMPUTE)
        m = m + one_minus_beta1 * (n - m)
        v = beta2 * v + one_minus_beta2 * (g * g)
        m_stored = m.to(m_ptr.dtype.element_ty)
        if ROUNDED:
            m = m_stored.to(COMPUTE)
        if NESTEROV:
            p = p - lr * (m + one_minus_beta1 * (n - m))
        else:
            p = p - lr * m
        _store_param(p_ptr, offs, mask, p, key, ROUNDED)
        tl.store(m_ptr + offs, m_stored, mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _moment_step(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, inv_scale, wd, one_minus_beta1, beta2,
                     one_minus_beta2, eps, clip, COMPUTE: tl.constexpr, MAXIMIZE: tl.constexpr,
                     WD_MODE: tl.constexpr, NESTEROV: tl.constexpr):
        """A cautious step's first pass: m updated (and v, unless Nesterov needs the old v in
        the second pass); returns how many elements' update agrees in sign with g."""
        g = _grad(g_ptr, offs, mask, inv_scale, COMPUTE, MAXIMIZE)
        m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
        v = tl.load(v_ptr + offs, mask=mask).to(COMPUTE)
        if WD_MODE == 1:
            g = g + wd * tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
        n = _normalised(g, v, eps, clip, COMPUTE)
        m_stored = (m + one_minus_beta1 * (n - m)).to(m_ptr.dtype.element_ty)
        u = m_stored.to(COMPUTE)
        if NESTEROV:
            u = u + one_minus_beta1 * (n - u)
        agree = _agree(u, g)
        if mask is not None:
            agree = agree & mask
        tl.store(m_ptr + offs, m_stored, mask=mask)
        if not NESTEROV:
            tl.store(v_ptr + offs, (beta2 * v + one_minus_beta2 * (g * g)).to(v_ptr.dtype.element_ty), mask=mask)
        return tl.reduce(agree.to(tl.int64), 0, _add)

    @triton.jit
    def _apply_step(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, inv_scale, lr, wd, decay, weight,
                    one_minus_beta1, beta2, one_minus_beta2, eps, clip, key,
                    COMPUTE: tl.constexpr, MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr,
                    ROUNDED: tl.constexpr, NESTEROV: tl.constexpr):
        """A cautious step's second pass: p moved by the update times ``weight`` where it
        agrees in sign with g, not at all elsewhere (and v updated, with Nesterov)."""
        g = _grad(g_ptr, offs, mask, inv_scale, COMPUTE, MAXIMIZE)
        p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
        u = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
        if WD_MODE == 1:
            g = g + wd * p
        if WD_MODE == 2:
            p = p * decay
        if NESTEROV:
            v = tl.load(v_ptr + offs, mask=mask).to(COMPUTE)
            u = u + one_minus_beta1 * (_normalised(g, v, eps, clip, COMPUTE) - u)
            tl.store(v_ptr + offs, (beta2 * v + one_minus_beta2 * (g * g)).to(v_ptr.dtype.element_ty), mask=mask)
        u = u * tl.where(_agree(u, g), weight, 0.0)
        _store_param(p_ptr, offs, mask, p - lr * u, key, ROUNDED)

    # The pieces of a program that both kernels (this one and triton_state's) run alike.

    @triton.jit
    def _program_row(rows_ptr, blocks_ptr, ROW: tl.constexpr):
        """This program's (tensor, chunk) pair from the block map, and its tensor's table row."""
        pid = tl.program_id(0)
        t = tl.load(blocks_ptr + 2 * pid)
        chunk = tl.load(blocks_ptr + 2 * pid + 1)
        return t, chunk, rows_ptr + t.to(tl.int64) * ROW

    @triton.jit
    def _runs(found_inf_ptr):
        """Whether the step runs: no ``found_inf``, or a zero one (then nothing is loaded or
        stored)."""
        if found_inf_ptr is not None:
            go = tl.load(found_inf_ptr) == 0
        else:
            go = True
        return go

    @triton.jit
    def _inv_scale(grad_scale_ptr, COMPUTE: tl.constexpr):
        """1 / grad_scale in the compute dtype, IEEE-rounded (None without a grad scale)."""
        if grad_scale_ptr is not None:
            scale = tl.load(grad_scale_ptr).to(COMPUTE)
            if COMPUTE == tl.float64:
                inv_scale = 1.0 / scale
            else:
                inv_scale = tl.div_rn(tl.full((), 1.0, COMPUTE), scale)
        else:
            inv_scale = None
        return inv_scale

    @triton.jit
    def _step_scalars(lr_ptr, lr_value, thresholds_ptr, t, step, clip_exponent, lr_max, wd, beta1, beta2, eps,
                      COMPUTE: tl.constexpr, CLIP_MODE: tl.constexpr, CORRECTED: tl.constexpr):
        """A later step's scalars in the compute dtype: lr, the clip threshold (``step **
        clip_exponent``, read from the thresholds, or None), the decoupled decay factor,
        1 - beta1, beta2, 1 - beta2 and eps."""
        if lr_ptr is not None:
            lr = tl.load(lr_ptr).to(COMPUTE)
        else:
            lr = tl.full((), lr_value, COMPUTE)
        if CLIP_MODE == 1:
            s = step.to(tl.float64)
            clip = tl.exp2(tl.full((), clip_exponent, tl.float64) * tl.log2(s)).to(COMPUTE)
        elif CLIP_MODE == 2:
            clip = tl.load(thresholds_ptr + t).to(COMPUTE)
        else:
            clip = None
        if CORRECTED:  # corrected weight decay: the decay's lr is lr * lr / lr_max
            lr_max_c = tl.full((), lr_max, COMPUTE)
            if COMPUTE == tl.float64:
                decay = 1.0 - lr * lr / lr_max_c * wd
            else:
                decay = 1.0 - tl.div_rn(lr * lr, lr_max_c) * wd
        else:
            decay = 1.0 - lr * wd
        # 1 - beta in float64 before rounding: 1 - fp32(0.999) is off by 1e-5 relative
        one_minus_b1 = tl.full((), 1.0 - beta1, COMPUTE)
        b2 = tl.full((), beta2, COMPUTE)
        one_minus_b2 = tl.full((), 1.0 - beta2, COMPUTE)
        eps_c = tl.full((), eps, COMPUTE)
        return lr, clip, decay, one_minus_b1, b2, one_minus_b2, eps_c

    @triton.jit
    def _caution_weight(kept_ptr, t, numel, COMPUTE: tl.constexpr):
        """The caution weight of tensor ``t``, rounded as adopt/_variants.py rounds it."""
        fraction = tl.load(kept_ptr + t).to(COMPUTE)
        if COMPUTE == tl.float64:
            fraction = fraction / numel.to(COMPUTE)
            weight = 1.0 / tl.where(fraction < 1e-3, 1e-3, fraction)
        else:
            fraction = tl.div_rn(fraction, numel.to(COMPUTE))
            weight = tl.div_rn(tl.full((), 1.0, COMPUTE), tl.where(fraction < 1e-3, 1e-3, fraction))
        return weight

    @triton.jit
    def _complete(counters_ptr, kept_ptr, step_ptr, t, step, nprogs, PASS: tl.constexpr):
        """Count this program done; the last of its tensor resets what the next launch reads
        (the counter, a cautious step's count) and writes ``step + 1``."""
        # Every thread of this program has read the old step (and count) before the
        # release below.
        tl.debug_barrier()
        done = tl.atomic_add(counters_ptr + t, 1, sem="acq_rel")
        if done == nprogs - 1:
            tl.store(counters_ptr + t, 0)
            if PASS == 2:
                tl.store(kept_ptr + t, tl.full((), 0, tl.int64))
            tl.store(step_ptr, step + 1.0)

    @triton.jit
    def _adopt_kernel(
        rows_ptr, blocks_ptr, counters_ptr, kept_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr, thresholds_ptr,
        seeds_ptr, lr_value: tl.float64, beta1: tl.float64, beta2: tl.float64, weight_decay: tl.float64,
        eps: tl.float64, clip_exponent: tl.float64, lr_max: tl.float64,
        DTYPE: tl.constexpr, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr, WD_MODE: tl.constexpr,
        CLIP_MODE: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr,
        ROW: tl.constexpr, ROUNDED: tl.constexpr, NESTEROV: tl.constexpr, CORRECTED: tl.constexpr,
        PASS: tl.constexpr,
    ):
        """One program per (tensor, chunk) pair of the block map; see the module docstring.
        PASS 0: the whole step; a cautious step runs PASS 1 (moments, counts) then PASS 2
        (the parameters; it also advances the steps)."""
        t, chunk, row = _program_row(rows_ptr, blocks_ptr, ROW)
        if _runs(found_inf_ptr):
            p_ptr = _row_pointer(row, 0, DTYPE, ALIGNED)
            g_ptr = _row_pointer(row, 1, DTYPE, ALIGNED)
            m_ptr = _row_pointer(row, 2, DTYPE, ALIGNED)
            v_ptr = _row_pointer(row, 3, DTYPE, ALIGNED)
            step_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
            numel = tl.load(row + 5)
            nblocks = tl.load(row + 6)
            step = tl.load(step_ptr)
            start = chunk.to(tl.int64) * BLOCK
            offs = start + tl.arange(0, BLOCK)
            full = start + BLOCK <= numel

            inv_scale = _inv_scale(grad_scale_ptr, COMPUTE)
            wd = tl.full((), weight_decay, COMPUTE)

            if step == 0.0:
                if PASS != 2:  # a cautious step's second pass finds v set by the first
                    if full:
                        _first_step(p_ptr, g_ptr, v_ptr, offs, None, inv_scale, wd,
                                    COMPUTE, MAXIMIZE, WD_MODE)
                    else:
                        for sub in tl.range(0, BLOCK, TAIL):
                            o = start + sub + tl.arange(0, TAIL)
                            _first_step(p_ptr, g_ptr, v_ptr, o, o < numel, inv_scale, wd,
                                        COMPUTE, MAXIMIZE, WD_MODE)
            else:
                lr, clip, decay, one_minus_b1, b2, one_minus_b2, eps_c = _step_scalars(
                    lr_ptr, lr_value, thresholds_ptr, t, step, clip_exponent, lr_max, wd, beta1, beta2, eps,
                    COMPUTE, CLIP_MODE, CORRECTED)
                if ROUNDED:
                    # key = mix32(mix32(seed) ^ s) ^ mix32(high 32 bits of this chunk's pair indices)
                    seed = (tl.load(seeds_ptr + t) & 0xFFFFFFFF).to(tl.uint32)
                    key = _mix32(_mix32(seed) ^ step.to(tl.uint32)) ^ _mix32((start >> 33).to(tl.uint32))
                else:
                    key = None
                if PASS == 0:
                    if full:
                        _later_step(p_ptr, g_ptr, m_ptr, v_ptr, offs, None, inv_scale, lr, wd, decay,
                                    one_minus_b1, b2, one_minus_b2, eps_c, clip, key, COMPUTE, MAXIMIZE,
                                    WD_MODE, ROUNDED, NESTEROV)
                    else:
                        for sub in tl.range(0, BLOCK, TAIL):
                            o = start + sub + tl.arange(0, TAIL)
                            _later_step(p_ptr, g_ptr, m_ptr, v_ptr, o, o < numel, inv_scale, lr, wd,
                                        decay, one_minus_b1, b2, one_minus_b2, eps_c, clip, key, COMPUTE,
                                        MAXIMIZE, WD_MODE, ROUNDED, NESTEROV)
                elif PASS == 1:
                    if full:
                        kept = _moment_step(p_ptr, g_ptr, m_ptr, v_ptr, offs, None, inv_scale, wd, one_minus_b1,
                                            b2, one_minus_b2, eps_c, clip, COMPUTE, MAXIMIZE, WD_MODE, NESTEROV)
                    else:
                        kept = tl.full((), 0, tl.int64)
                        for sub in tl.range(0, BLOCK, TAIL):
                            o = start + sub + tl.arange(0, TAIL)
                            kept += _moment_step(p_ptr, g_ptr, m_ptr, v_ptr, o, o < numel, inv_scale, wd,
                                                 one_minus_b1, b2, one_minus_b2, eps_c, clip, COMPUTE, MAXIMIZE,
                                                 WD_MODE, NESTEROV)
                    tl.atomic_add(kept_ptr + t, kept, sem="relaxed")
                else:
                    weight = _caution_weight(kept_ptr, t, numel, COMPUTE)
                    if full:
                        _apply_step(p_ptr, g_ptr, m_ptr, v_ptr, offs, None, inv_scale, lr, wd, decay, weight,
                                    one_minus_b1, b2, one_minus_b2, eps_c, clip, key, COMPUTE, MAXIMIZE,
                                    WD_MODE, ROUNDED, NESTEROV)
                    else:
                        for sub in tl.range(0, BLOCK, TAIL):
                            o = start + sub + tl.arange(0, TAIL)
                            _apply_step(p_ptr, g_ptr, m_ptr, v_ptr, o, o < numel, inv_scale, lr, wd, decay,
                                        weight, one_minus_b1, b2, one_minus_b2, eps_c, clip, key, COMPUTE,
                                        MAXIMIZE, WD_MODE, ROUNDED, NESTEROV)

            if PASS != 1:
                _complete(counters_ptr, kept_ptr, step_ptr, t, step, nblocks, PASS)

    _INTERPRETED = isinstance(_adopt_kernel, InterpretedFunction)
    _TL_DTYPES = {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }


_CACHE = common.PlanCache()


def plan_builds() -> int:
    """How many pointer tables have been built (and uploaded) in this process."""
    return _CACHE.builds


def clear_plan_cache() -> None:
    """Drop cached tables (those referenced by captured CUDA graphs are kept)."""
    _CACHE.clear()


def _check_group(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
) -> None:
    """Validate the group when its plan is built; a cache hit means the same tensors again."""
    device, dtype = params[0].device, params[0].dtype
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)):
        for name, t in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if t.device != device or t.dtype != dtype:
                raise ValueError(
                    f"{name} {i} is {t.dtype} on {t.device}; the group is {dtype} on {device}"
                )
            if t.numel() != p.numel():
                raise ValueError(f"{name} {i} has {t.numel()} elements, its param {p.numel()}")
            if not t.is_contiguous():
                raise ValueError(f"triton ADOPT needs contiguous tensors; {name} {i} is not")
        if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(
                f"state_steps[{i}] must be a 1-element float32 tensor on {device}, "
                f"got {tuple(s.shape)} {s.dtype} on {s.device}"
            )


def _plan_for(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    block: int,
) -> common.Plan:
    """The cached plan for these exact tensors, building (and validating) it on a miss."""
    device = params[0].device
    address = Tensor.data_ptr
    columns = (
        tuple(map(address, params)),
        tuple(map(address, grads)),
        tuple(map(address, exp_avgs)),
        tuple(map(address, exp_avg_sqs)),
        tuple(map(address, state_steps)),
        tuple(map(Tensor.numel, params)),
    )
    return _CACHE.get(
        (device, params[0].dtype, block, columns), columns, block, device,
        lambda: _check_group(params, grads, exp_avgs, exp_avg_sqs, state_steps),
    )


def launch_group(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    beta1: float,
    beta2: float,
    lr: Union[float, Tensor],
    clip: Clip,
    weight_decay: float,
    decouple: bool,
    eps: float,
    maximize: bool,
    seeds: Optional[Tensor] = None,
    nesterov: bool = False,
    caution: bool = False,
    lr_max: Optional[float] = None,
) -> None:
    """Apply one ADOPT step to a same-device, same-dtype group of contiguous tensors in place.

    ``clip`` is ``None``, ``("power", exponent)`` (threshold ``s ** exponent`` from each
    tensor's step, computed in the kernel) or ``("tensor", thresholds)`` (a 1-d device
    tensor, one per tensor). ``lr``, ``grad_scale`` and ``found_inf`` may be device tensors;
    ``state_steps`` (float32, on the device) are read and incremented by the kernel.
    ``seeds`` (int64 on the device, one per tensor): write float16/bfloat16 params back with
    stochastic rounding. ``nesterov``, ``caution`` and ``lr_max`` (corrected weight decay) as
    in :mod:`adopt._variants`; a cautious step is two launches, the first counting each
    tensor's agreeing elements on the device. Nothing synchronises with the host, so the call
    can be captured in a CUDA graph.

    Raises:
        RuntimeError: triton is missing, or the device does not suit the interpreter setting.
        ValueError: mismatched lists, devices, sizes, non-contiguous tensors or a bad ``clip``.
        TypeError: an unsupported dtype.
    """
    common.require_triton(triton)
    count = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == count):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs and state_steps differ in length")
    if count == 0:
        return
    device, dtype = params[0].device, params[0].dtype
    common.check_device(device, _INTERPRETED)
    if dtype not in _TL_DTYPES:
        raise TypeError(f"triton ADOPT supports float16/bfloat16/float32/float64, got {dtype}")

    block = _BLOCK_ELEMS[dtype]
    plan = _plan_for(params, grads, exp_avgs, exp_avg_sqs, state_steps, block)

    rounded = seeds is not None and dtype in (torch.float16, torch.bfloat16)
    args, clip_mode = common.kernel_args(
        plan, device, count, lr=lr, clip=clip, grad_scale=grad_scale, found_inf=found_inf,
        seeds=seeds if rounded else None, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
        eps=eps, lr_max=lr_max,
    )
    compute = tl.float64 if dtype == torch.float64 else tl.float32
    meta = dict(
        DTYPE=_TL_DTYPES[dtype], COMPUTE=compute, ALIGNED=plan.aligned,
        WD_MODE=common.wd_mode(weight_decay, decouple),
        CLIP_MODE=clip_mode, MAXIMIZE=bool(maximize), BLOCK=block, TAIL=block // _TAIL_SPLIT,
        ROW=_ROW, ROUNDED=rounded, NESTEROV=bool(nesterov), CORRECTED=lr_max is not None,
        num_warps=_NUM_WARPS,
        # Contraction would let the two passes of a cautious step round differently.
        enable_fp_fusion=not rounded and not caution,
    )
    common.launch(_adopt_kernel, plan, args, meta, device, caution)
