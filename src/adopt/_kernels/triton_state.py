"""Fused ADOPT step for CUDA in Triton with low-memory optimizer state ("8bit" and "bf16").

The rule is the contract of issue 9 (``adopt/_state_formats.py`` is normative): per tensor,
decode m and v to float32, run the full-precision per-element arithmetic of
``triton_adopt`` (the same operations in the same order, float32, no FP contraction), then
encode both moments again with stochastic rounding under ``state_key(seed, s, moment)``
(``s`` the tensor's step count before the step, the draws ``element_draws(key, i)`` of the
flat element index ``i``). Every step re-encodes both moments, ``s == 0`` included.

Design
------
* **Whole blocks per program.** A program owns ``_TILE_BLOCKS`` consecutive blocks of
  :data:`~adopt._state_formats.BLOCK_SIZE` = 256 elements of one tensor, as a
  ``[_TILE_BLOCKS, 256]`` tile. The new block scales are the tile's row maxima (an integer
  maximum of the magnitude bits, so NaN and infinity propagate on every backend), so scale
  computation is local to the program: m and v are read once and written once.
* **Encoder on integers.** Codes are computed from the float32 bits with 64-bit integer
  arithmetic exactly as ``_state_formats.encode`` states it; decoding is an exact float32
  product ``value(code) * scale``; ``u = sqrt_rn(v)`` is the stored root of v and ADOPT's
  denominator (v decodes to ``u * u`` exactly, whose correctly rounded root is ``u``).
* **Pointer table, caching, step counters, found_inf, no host sync, CUDA graphs**: as in
  ``triton_adopt``, and by the same code (``_triton_common`` on the host, ``triton_adopt``'s
  jit helpers in the kernel): one int64 device buffer of rows ``(p, g, m, v, m scales,
  v scales, step, numel, programs)``, the ``(tensor, chunk)`` map, completion counters and
  caution counts; cached under the tensors' addresses; the last program of a tensor writes
  ``step + 1``. The ``seeds`` are always needed (the moments' random draws).
* **Caution** is two launches: a read-only one that counts each tensor's agreeing elements
  into a device buffer, then the full update, which reads the count.
* **Parameters** (float32, bfloat16, float16) are written to nearest (bfloat16 by explicit
  round-to-nearest-even on the bits, so the Triton interpreter, which truncates a float32 to
  bfloat16 conversion, gives the GPU's result), or with stochastic rounding (stream 0) when
  ``stochastic_rounding`` is set, as ``triton_adopt`` does it, from the unrounded float32
  momentum (the full-precision rule for float32 state). bfloat16 results are assembled from
  the bits, so a NaN stays a NaN (quietened, its sign kept) on every backend; NaN payloads
  and signs are not otherwise specified by the formats.

Run on CPU tensors only under ``TRITON_INTERPRET=1`` (set before ``triton`` is imported).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _random
from .._state_formats import BLOCK_SIZE, FORMATS, LOW_PRECISIONS
from . import _triton_common as common
from . import triton_adopt
from ._triton_common import Clip
from .triton_adopt import triton_available

triton = triton_adopt.triton
if triton is not None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from .triton_adopt import (
        _agree, _caution_weight, _complete, _draws, _grad, _inv_scale, _mix32, _normalised_root, _program_row,
        _round_stochastic, _row_pointer, _runs, _step_scalars,
    )

__all__ = ["triton_available", "launch_state_group", "plan_builds", "clear_plan_cache", "STATE_FORMATS"]

STATE_FORMATS = LOW_PRECISIONS
_FMT_BF16, _FMT_8BIT = 0, 1
_ROW = 9  # int64 fields per tensor: p, g, m, v, m scales, v scales, step addresses, numel, programs
_NUM_WARPS = 8
_TILE_BLOCKS = 8  # blocks of 256 per program: 2048 elements, 8 per thread of each stream
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _format_constants() -> dict[str, Union[int, float]]:
    """Kernel constexprs: the code formats of m and v (from _state_formats.FORMATS) and their
    streams' key terms ``stream * GOLDEN mod 2**32`` (from adopt/_random.py)."""
    m, v = FORMATS["exp_avg"], FORMATS["exp_avg_sq"]
    assert m.signed and not m.squared and not v.signed and v.squared
    return dict(
        M_STREAM=_random._mul32(_random.STREAM_EXP_AVG, _random.GOLDEN),
        V_STREAM=_random._mul32(_random.STREAM_EXP_AVG_SQ, _random.GOLDEN),
        M_EXP=m.exp_bits, M_MAN=m.man_bits, M_BMIN=m.min_exponent_field,
        M_SUB=2.0 ** (2 - (1 << m.exp_bits) - m.man_bits),
        V_EXP=v.exp_bits, V_MAN=v.man_bits, V_BMIN=v.min_exponent_field,
    )


if triton is not None:

    @triton.jit
    def _bf16_bits(u, h):
        """The bfloat16 of float32 bits ``u`` given its rounded high half ``h``: a NaN stays a
        NaN (quietened, sign kept), whatever the backend's float32 to bfloat16 conversion does."""
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        return tl.where(nan, (u >> 16) | 0x40, h).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _bf16_nearest(x):
        """float32 to bfloat16, round to nearest even on the bits."""
        u = x.to(tl.uint32, bitcast=True)
        return _bf16_bits(u, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)

    @triton.jit
    def _bf16_stochastic(x, r):
        """float32 to bfloat16 with the 16-bit random draws ``r``: adopt/_random.py's rule (as
        triton_adopt._round_stochastic), on the bits."""
        u = x.to(tl.uint32, bitcast=True)
        return _bf16_bits(u, (u + r) >> 16)

    @triton.jit
    def _decode_signed(c, E: tl.constexpr, M: tl.constexpr, SUB: tl.constexpr):
        """value(code) at scale 1 of a signed format (int32 codes), exact float32."""
        q = c & ((1 << (E + M)) - 1)
        normal = ((q + ((128 - (1 << E)) << M)) << (23 - M)).to(tl.float32, bitcast=True)
        sub = q.to(tl.float32) * SUB
        mag = tl.where((q >> M) > 0, normal, sub)
        return tl.where(c >= 128, -mag, mag)

    @triton.jit
    def _decode_unsigned(c, E: tl.constexpr, M: tl.constexpr):
        """value(code) at scale 1 of an unsigned format (int32 codes), exact float32."""
        return ((c + ((128 - (1 << E)) << M)) << (23 - M)).to(tl.float32, bitcast=True)

    @triton.jit
    def _encode_tile(y, r, mask, SIGNED: tl.constexpr, E: tl.constexpr, M: tl.constexpr, BMIN: tl.constexpr):
        """Codes (uint8 tile) and block scales (float32, one per row) of the float32 tile ``y``
        (each row one block) with the 16-bit random draws ``r``: _state_formats' rule on the bits."""
        D: tl.constexpr = 23 - M
        MAXQ: tl.constexpr = (1 << (E + M)) - 1
        bits = y.to(tl.int32, bitcast=True)
        a = bits & 0x7FFFFFFF
        if mask is not None:
            a = tl.where(mask, a, 0)
        # The bits of the largest |y| (NaN bits are the largest). tl.reduce with the library's
        # combine functions, not tl.max / tl.sum: those are library jit functions that the
        # interpreter does not run when triton was imported without it; it recognises these
        # combine functions and reduces with numpy.
        amax = tl.reduce(a, 1, tl.standard._elementwise_max)
        field = (amax.to(tl.int64) + ((1 << D) - 1)) >> 23
        field = tl.where(field < BMIN, BMIN, tl.where(field > 254, 254, field))
        finite = amax < 0x7F800000
        valid = finite & (amax != 0)
        scale_bits = tl.where(valid, field << 23, tl.where(finite, 0, 0x7FC00000))
        scale = scale_bits.to(tl.int32).to(tl.float32, bitcast=True)
        mag = a.to(tl.int64)
        rr = r.to(tl.int64) << 16  # the word: the draw as its high half, in [0, 2**32)
        o = (field - ((1 << E) - 1))[:, None]  # the float32 exponent field of code exponent 0
        q = ((mag + (rr >> (32 - D))) >> D) - (o << M)
        if SIGNED:
            ef = mag >> 23
            e = tl.where(ef < 1, 1, ef) - o
            d = (D + 1) - e
            frac = (mag & 0x7FFFFF) | tl.where(ef > 0, 0x800000, 0)
            dc = tl.where(d < 1, 1, tl.where(d > 32, 32, d))
            sub = tl.where(d <= 32, (frac + (rr >> (32 - dc))) >> dc, 0)
            q = tl.where(e >= 1, q, sub)
            q = tl.where(q > MAXQ, MAXQ, q)
            q = q | tl.where(bits < 0, 128, 0)
        else:
            q = tl.where(q < 0, 0, tl.where(q > MAXQ, MAXQ, q))
        codes = tl.where(valid[:, None], q, 0).to(tl.uint8)
        return codes, scale

    @triton.jit
    def _load_m(m_ptr, ms_ptr, offs, blk, mask, bmask, FMT: tl.constexpr,
                M_EXP: tl.constexpr, M_MAN: tl.constexpr, M_SUB: tl.constexpr):
        """m decoded to float32."""
        if FMT == 1:
            c = tl.load(m_ptr + offs, mask=mask).to(tl.int32)
            scale = tl.load(ms_ptr + blk, mask=bmask)
            return _decode_signed(c, M_EXP, M_MAN, M_SUB) * scale[:, None]
        else:
            return tl.load(m_ptr + offs, mask=mask).to(tl.float32)

    @triton.jit
    def _load_v(v_ptr, vs_ptr, offs, blk, mask, bmask, FMT: tl.constexpr, V_EXP: tl.constexpr, V_MAN: tl.constexpr):
        """v decoded to float32, and its root u (the 8-bit codes store u; v = u * u exactly)."""
        if FMT == 1:
            c = tl.load(v_ptr + offs, mask=mask).to(tl.int32)
            scale = tl.load(vs_ptr + blk, mask=bmask)
            u = _decode_unsigned(c, V_EXP, V_MAN) * scale[:, None]
            return u * u, u
        else:
            v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
            return v, tl.sqrt_rn(v)

    @triton.jit
    def _store_moments(m_ptr, v_ptr, ms_ptr, vs_ptr, offs, blk, mask, bmask, m, v, key_m, key_v,
                       FMT: tl.constexpr, M_EXP: tl.constexpr, M_MAN: tl.constexpr, M_BMIN: tl.constexpr,
                       V_EXP: tl.constexpr, V_MAN: tl.constexpr, V_BMIN: tl.constexpr):
        """Encode the new float32 m and v with stochastic rounding and store them."""
        r_m = _draws(offs, key_m)
        r_v = _draws(offs, key_v)
        if FMT == 1:
            codes, scale = _encode_tile(m, r_m, mask, True, M_EXP, M_MAN, M_BMIN)
            tl.store(m_ptr + offs, codes, mask=mask)
            tl.store(ms_ptr + blk, scale, mask=bmask)
            codes, scale = _encode_tile(tl.sqrt_rn(v), r_v, mask, False, V_EXP, V_MAN, V_BMIN)
            tl.store(v_ptr + offs, codes, mask=mask)
            tl.store(vs_ptr + blk, scale, mask=bmask)
        else:
            tl.store(m_ptr + offs, _bf16_stochastic(m, r_m), mask=mask)
            tl.store(v_ptr + offs, _bf16_stochastic(v, r_v), mask=mask)

    @triton.jit
    def _write_param(p_ptr, offs, mask, p, key_p, ROUNDED: tl.constexpr):
        """Write p back: stochastic rounding under ``key_p``, or to nearest."""
        if ROUNDED:
            if p_ptr.dtype.element_ty == tl.bfloat16:
                out = _bf16_stochastic(p, _draws(offs, key_p))
            else:
                out = _round_stochastic(p, _draws(offs, key_p), p_ptr.dtype.element_ty)
        elif p_ptr.dtype.element_ty == tl.bfloat16:
            out = _bf16_nearest(p)
        else:
            out = p.to(p_ptr.dtype.element_ty)
        tl.store(p_ptr + offs, out, mask=mask)

    @triton.jit
    def _first_tile(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, blk, mask, bmask, inv_scale, wd,
                    key_m, key_v, FMT: tl.constexpr, MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr,
                    M_EXP: tl.constexpr, M_MAN: tl.constexpr, M_SUB: tl.constexpr, M_BMIN: tl.constexpr,
                    V_EXP: tl.constexpr, V_MAN: tl.constexpr, V_BMIN: tl.constexpr):
        """s = 0: v <- g*g, m unchanged (both re-encoded); p is left alone."""
        g = _grad(g_ptr, offs, mask, inv_scale, tl.float32, MAXIMIZE)
        if WD_MODE == 1:
            g = g + wd * tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        m = _load_m(m_ptr, ms_ptr, offs, blk, mask, bmask, FMT, M_EXP, M_MAN, M_SUB)
        _store_moments(m_ptr, v_ptr, ms_ptr, vs_ptr, offs, blk, mask, bmask, m, g * g, key_m, key_v,
                       FMT, M_EXP, M_MAN, M_BMIN, V_EXP, V_MAN, V_BMIN)

    @triton.jit
    def _count_tile(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, blk, mask, bmask, inv_scale, wd,
                    one_minus_beta1, eps, clip, FMT: tl.constexpr, MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr,
                    NESTEROV: tl.constexpr, M_EXP: tl.constexpr, M_MAN: tl.constexpr, M_SUB: tl.constexpr,
                    V_EXP: tl.constexpr, V_MAN: tl.constexpr):
        """A cautious step's first pass (reads only): how many elements' update agrees in
        sign with g."""
        g = _grad(g_ptr, offs, mask, inv_scale, tl.float32, MAXIMIZE)
        if WD_MODE == 1:
            g = g + wd * tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        m = _load_m(m_ptr, ms_ptr, offs, blk, mask, bmask, FMT, M_EXP, M_MAN, M_SUB)
        v, root = _load_v(v_ptr, vs_ptr, offs, blk, mask, bmask, FMT, V_EXP, V_MAN)
        n = _normalised_root(g, root, eps, clip, tl.float32)
        u = m + one_minus_beta1 * (n - m)
        if NESTEROV:
            u = u + one_minus_beta1 * (n - u)
        agree = _agree(u, g)
        if mask is not None:
            agree = agree & mask
        return tl.reduce(tl.reduce(agree.to(tl.int64), 1, tl.standard._sum_combine), 0, tl.standard._sum_combine)

    @triton.jit
    def _later_tile(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, blk, mask, bmask, inv_scale, lr, wd,
                    decay, weight, one_minus_beta1, beta2, one_minus_beta2, eps, clip, key_p, key_m, key_v,
                    FMT: tl.constexpr, MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr, ROUNDED: tl.constexpr,
                    NESTEROV: tl.constexpr, CAUTION: tl.constexpr,
                    M_EXP: tl.constexpr, M_MAN: tl.constexpr, M_SUB: tl.constexpr, M_BMIN: tl.constexpr,
                    V_EXP: tl.constexpr, V_MAN: tl.constexpr, V_BMIN: tl.constexpr):
        """s >= 1: normalise by the old v, clip, update m, p and v as triton_adopt does for
        float32 state; CAUTION: the update times ``weight`` where it agrees in sign with g."""
        g = _grad(g_ptr, offs, mask, inv_scale, tl.float32, MAXIMIZE)
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        m = _load_m(m_ptr, ms_ptr, offs, blk, mask, bmask, FMT, M_EXP, M_MAN, M_SUB)
        v, root = _load_v(v_ptr, vs_ptr, offs, blk, mask, bmask, FMT, V_EXP, V_MAN)
        if WD_MODE == 1:
            g = g + wd * p
        if WD_MODE == 2:
            p = p * decay
        n = _normalised_root(g, root, eps, clip, tl.float32)
        m = m + one_minus_beta1 * (n - m)
        v = beta2 * v + one_minus_beta2 * (g * g)
        if NESTEROV:
            u = m + one_minus_beta1 * (n - m)
        else:
            u = m
        if CAUTION:
            u = u * tl.where(_agree(u, g), weight, 0.0)
        _write_param(p_ptr, offs, mask, p - lr * u, key_p, ROUNDED)
        _store_moments(m_ptr, v_ptr, ms_ptr, vs_ptr, offs, blk, mask, bmask, m, v, key_m, key_v,
                       FMT, M_EXP, M_MAN, M_BMIN, V_EXP, V_MAN, V_BMIN)

    @triton.jit
    def _state_kernel(
        rows_ptr, blocks_ptr, counters_ptr, kept_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr, thresholds_ptr,
        seeds_ptr, lr_value: tl.float64, beta1: tl.float64, beta2: tl.float64, weight_decay: tl.float64,
        eps: tl.float64, clip_exponent: tl.float64, lr_max: tl.float64,
        DTYPE: tl.constexpr, MDTYPE: tl.constexpr, FMT: tl.constexpr, ALIGNED: tl.constexpr,
        WD_MODE: tl.constexpr, CLIP_MODE: tl.constexpr, MAXIMIZE: tl.constexpr, NB: tl.constexpr,
        BS: tl.constexpr, ROW: tl.constexpr, ROUNDED: tl.constexpr, NESTEROV: tl.constexpr,
        CORRECTED: tl.constexpr, PASS: tl.constexpr, M_STREAM: tl.constexpr, V_STREAM: tl.constexpr,
        M_EXP: tl.constexpr, M_MAN: tl.constexpr, M_SUB: tl.constexpr, M_BMIN: tl.constexpr,
        V_EXP: tl.constexpr, V_MAN: tl.constexpr, V_BMIN: tl.constexpr,
    ):
        """One program per (tensor, chunk) pair: NB blocks of BS elements. PASS 0: the whole
        step; a cautious step runs PASS 1 (counts only) then PASS 2 (the whole step, weighted;
        it also advances the steps)."""
        t, chunk, row = _program_row(rows_ptr, blocks_ptr, ROW)
        if _runs(found_inf_ptr):
            p_ptr = _row_pointer(row, 0, DTYPE, ALIGNED)
            g_ptr = _row_pointer(row, 1, DTYPE, ALIGNED)
            m_ptr = _row_pointer(row, 2, MDTYPE, ALIGNED)
            v_ptr = _row_pointer(row, 3, MDTYPE, ALIGNED)
            ms_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
            vs_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
            step_ptr = tl.load(row + 6).to(tl.pointer_type(tl.float32))
            numel = tl.load(row + 7)
            nprogs = tl.load(row + 8)
            step = tl.load(step_ptr)
            start = chunk.to(tl.int64) * (NB * BS)
            first_block = chunk.to(tl.int64) * NB
            blk = first_block + tl.arange(0, NB)
            offs = start + (tl.arange(0, NB)[:, None] * BS + tl.arange(0, BS)[None, :])
            full = start + NB * BS <= numel
            mask = offs < numel
            bmask = blk * BS < numel

            inv_scale = _inv_scale(grad_scale_ptr, tl.float32)
            wd = tl.full((), weight_decay, tl.float32)

            # key = mix32(mix32(seed ^ stream * GOLDEN) ^ s) ^ mix32(high 32 bits of the pair indices)
            seed = (tl.load(seeds_ptr + t) & 0xFFFFFFFF).to(tl.uint32)
            s32 = step.to(tl.uint32)
            high = _mix32((start >> 33).to(tl.uint32))
            key_v = _mix32(_mix32(seed ^ tl.full((), V_STREAM, tl.uint32)) ^ s32) ^ high
            key_m = _mix32(_mix32(seed ^ tl.full((), M_STREAM, tl.uint32)) ^ s32) ^ high

            if step == 0.0:
                if PASS != 1:
                    if full:
                        _first_tile(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, blk, None, None, inv_scale,
                                    wd, key_m, key_v, FMT, MAXIMIZE, WD_MODE,
                                    M_EXP, M_MAN, M_SUB, M_BMIN, V_EXP, V_MAN, V_BMIN)
                    else:
                        _first_tile(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, blk, mask, bmask, inv_scale,
                                    wd, key_m, key_v, FMT, MAXIMIZE, WD_MODE,
                                    M_EXP, M_MAN, M_SUB, M_BMIN, V_EXP, V_MAN, V_BMIN)
            else:
                lr, clip, decay, one_minus_b1, b2, one_minus_b2, eps_c = _step_scalars(
                    lr_ptr, lr_value, thresholds_ptr, t, step, clip_exponent, lr_max, wd, beta1, beta2, eps,
                    tl.float32, CLIP_MODE, CORRECTED)
                if ROUNDED:
                    key_p = _mix32(_mix32(seed) ^ s32) ^ high
                else:
                    key_p = None
                if PASS == 1:
                    if full:
                        kept = _count_tile(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, blk, None, None,
                                           inv_scale, wd, one_minus_b1, eps_c, clip, FMT, MAXIMIZE, WD_MODE,
                                           NESTEROV, M_EXP, M_MAN, M_SUB, V_EXP, V_MAN)
                    else:
                        kept = _count_tile(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, blk, mask, bmask,
                                           inv_scale, wd, one_minus_b1, eps_c, clip, FMT, MAXIMIZE, WD_MODE,
                                           NESTEROV, M_EXP, M_MAN, M_SUB, V_EXP, V_MAN)
                    tl.atomic_add(kept_ptr + t, kept, sem="relaxed")
                else:
                    if PASS == 2:
                        weight = _caution_weight(kept_ptr, t, numel, tl.float32)
                    else:
                        weight = None
                    if full:
                        _later_tile(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, blk, None, None, inv_scale,
                                    lr, wd, decay, weight, one_minus_b1, b2, one_minus_b2, eps_c, clip, key_p,
                                    key_m, key_v, FMT, MAXIMIZE, WD_MODE, ROUNDED, NESTEROV, PASS == 2,
                                    M_EXP, M_MAN, M_SUB, M_BMIN, V_EXP, V_MAN, V_BMIN)
                    else:
                        _later_tile(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, blk, mask, bmask, inv_scale,
                                    lr, wd, decay, weight, one_minus_b1, b2, one_minus_b2, eps_c, clip, key_p,
                                    key_m, key_v, FMT, MAXIMIZE, WD_MODE, ROUNDED, NESTEROV, PASS == 2,
                                    M_EXP, M_MAN, M_SUB, M_BMIN, V_EXP, V_MAN, V_BMIN)

            if PASS != 1:
                _complete(counters_ptr, kept_ptr, step_ptr, t, step, nprogs, PASS)

    _INTERPRETED = isinstance(_state_kernel, InterpretedFunction)
    _TL_PARAM = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
    _TL_STATE = {"8bit": tl.uint8, "bf16": tl.bfloat16}
else:
    _INTERPRETED = False


_CACHE = common.PlanCache()


def plan_builds() -> int:
    """How many pointer tables have been built (and uploaded) in this process."""
    return _CACHE.builds


def clear_plan_cache() -> None:
    """Drop cached tables (those referenced by captured CUDA graphs are kept)."""
    _CACHE.clear()


def _blocks(numel: int) -> int:
    return -(-numel // BLOCK_SIZE)


def _check_tensor(name: str, t: object, dtype: torch.dtype, numel: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


_Tensors = Sequence[Tensor]


def _check_group(
    fmt: str, params: _Tensors, grads: _Tensors, exp_avgs: _Tensors, exp_avg_sqs: _Tensors,
    exp_avg_scales: Optional[_Tensors], exp_avg_sq_scales: Optional[_Tensors], state_steps: _Tensors,
) -> None:
    """Validate the group when its plan is built; a cache hit means the same tensors again."""
    device, dtype = params[0].device, params[0].dtype
    state_dtype = torch.uint8 if fmt == "8bit" else torch.bfloat16
    for i, p in enumerate(params):
        n = p.numel()
        _check_tensor(f"params[{i}]", p, dtype, n, device)
        _check_tensor(f"grads[{i}]", grads[i], dtype, n, device)
        _check_tensor(f"exp_avgs[{i}]", exp_avgs[i], state_dtype, n, device)
        _check_tensor(f"exp_avg_sqs[{i}]", exp_avg_sqs[i], state_dtype, n, device)
        if exp_avg_scales is not None and exp_avg_sq_scales is not None:  # fmt "8bit"
            _check_tensor(f"exp_avg_scales[{i}]", exp_avg_scales[i], torch.float32, _blocks(n), device)
            _check_tensor(f"exp_avg_sq_scales[{i}]", exp_avg_sq_scales[i], torch.float32, _blocks(n), device)
        _check_tensor(f"state_steps[{i}]", state_steps[i], torch.float32, 1, device)


def _plan_for(
    fmt: str, params: _Tensors, grads: _Tensors, exp_avgs: _Tensors, exp_avg_sqs: _Tensors,
    exp_avg_scales: Optional[_Tensors], exp_avg_sq_scales: Optional[_Tensors], state_steps: _Tensors,
) -> common.Plan:
    """The cached plan for these exact tensors, building (and validating) it on a miss."""
    device = params[0].device
    address = Tensor.data_ptr
    none = (0,) * len(params)
    columns = (
        tuple(map(address, params)),
        tuple(map(address, grads)),
        tuple(map(address, exp_avgs)),
        tuple(map(address, exp_avg_sqs)),
        none if exp_avg_scales is None else tuple(map(address, exp_avg_scales)),
        none if exp_avg_sq_scales is None else tuple(map(address, exp_avg_sq_scales)),
        tuple(map(address, state_steps)),
        tuple(map(Tensor.numel, params)),
    )
    return _CACHE.get(
        (device, params[0].dtype, fmt, columns), columns, _TILE_BLOCKS * BLOCK_SIZE, device,
        lambda: _check_group(fmt, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                             state_steps),
    )


def launch_state_group(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    exp_avg_scales: Optional[Sequence[Tensor]],
    exp_avg_sq_scales: Optional[Sequence[Tensor]],
    state_steps: Sequence[Tensor],
    *,
    fmt: str,
    seeds: Tensor,
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
    stochastic_rounding: bool = False,
    nesterov: bool = False,
    caution: bool = False,
    lr_max: Optional[float] = None,
) -> None:
    """Apply one ADOPT step with low-memory state to a same-device, same-dtype group in place.

    ``fmt`` ``"8bit"``: ``exp_avgs`` / ``exp_avg_sqs`` are contiguous uint8 codes of each
    param's numel (``exp_avg_sqs`` store sqrt(v)), ``exp_avg_scales`` /
    ``exp_avg_sq_scales`` float32 of ``ceil(numel / 256)``; ``"bf16"``: bfloat16 moments
    and both scale lists None. Params (and grads) float32, bfloat16 or float16. ``seeds``
    (int64 on the device, one per tensor) key the moments' rounding and, with
    ``stochastic_rounding`` and bfloat16/float16 params, the params' (stream 0). Every other
    argument as :func:`adopt._kernels.triton_adopt.launch_group`: ``clip`` None,
    ``("power", exponent)`` or ``("tensor", thresholds)``; ``lr``, ``grad_scale``,
    ``found_inf`` may be device tensors (found_inf nonzero: nothing changes); ``state_steps``
    (float32 on the device) are read and incremented by the kernel; a cautious step is two
    launches, the first counting on the device. Nothing synchronises with the host.

    Raises:
        RuntimeError: triton is missing, or the device does not suit the interpreter setting.
        ValueError: a bad ``fmt`` or ``clip``, mismatched lists, devices, sizes, non-contiguous
            tensors, missing ``seeds``.
        TypeError: an unsupported or mismatched dtype.
    """
    common.require_triton(triton)
    if fmt not in STATE_FORMATS:
        raise ValueError(f"fmt must be one of {STATE_FORMATS}, got {fmt!r}")
    count = len(params)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "state_steps": state_steps}
    if fmt == "8bit":
        if exp_avg_scales is None or exp_avg_sq_scales is None:
            raise ValueError("fmt '8bit' needs exp_avg_scales and exp_avg_sq_scales")
        lists.update(exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales)
    elif exp_avg_scales is not None or exp_avg_sq_scales is not None:
        raise ValueError("fmt 'bf16' has no scales: exp_avg_scales and exp_avg_sq_scales must be None")
    for name, values in lists.items():
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} tensors, params {count}")
    if seeds is None:
        raise ValueError("seeds (int64, one per tensor) are required for low-memory state")
    if count == 0:
        return
    device, dtype = params[0].device, params[0].dtype
    common.check_device(device, _INTERPRETED)
    if dtype not in _PARAM_DTYPES:
        raise TypeError(f"params must be float32, bfloat16 or float16 for low-memory state, got {dtype}")
    _check_tensor("seeds", seeds, torch.int64, count, device)

    plan = _plan_for(fmt, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, state_steps)

    rounded = bool(stochastic_rounding) and dtype in (torch.float16, torch.bfloat16)
    args, clip_mode = common.kernel_args(
        plan, device, count, lr=lr, clip=clip, grad_scale=grad_scale, found_inf=found_inf, seeds=seeds,
        beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, lr_max=lr_max,
    )
    meta = dict(
        DTYPE=_TL_PARAM[dtype], MDTYPE=_TL_STATE[fmt], FMT=_FMT_8BIT if fmt == "8bit" else _FMT_BF16,
        ALIGNED=plan.aligned, WD_MODE=common.wd_mode(weight_decay, decouple), CLIP_MODE=clip_mode,
        MAXIMIZE=bool(maximize), NB=_TILE_BLOCKS, BS=BLOCK_SIZE, ROW=_ROW, ROUNDED=rounded, NESTEROV=bool(nesterov),
        CORRECTED=lr_max is not None, **_format_constants(), num_warps=_NUM_WARPS,
        # Every path rounds each operation separately (the C kernel builds with -ffp-contract=off).
        enable_fp_fusion=False,
    )
    common.launch(_state_kernel, plan, args, meta, device, caution)
