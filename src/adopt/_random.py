"""Counter-based random bits and stochastic rounding: one definition for every path.

Stochastic rounding must give the same bits on the single-tensor, foreach, fused-CPU and
Triton paths, and a run resumed from a checkpoint must draw what the uninterrupted run
would have drawn. So no generator state is kept: each random draw is a hash of where and
when it is used. All arithmetic is modulo 2**32; ``mix32`` is a bijective integer hash
(xor-shift / multiply, the "lowbias32" constants)::

    mix32(x):  x ^= x >> 16;  x *= 0x7FEB352D;  x ^= x >> 15;  x *= 0x846CA68B;  x ^= x >> 16

* **seed** of a tensor: ``mix32((ordinal + 1) * 0x9E3779B9)``, with ``ordinal`` the
  parameter's position among all the optimizer's parameters (groups in order); kept in the
  tensor's state as ``state["seed"]`` (0-d int64), so a checkpoint carries it.
* **key** of one step: ``mix32(mix32(seed ^ stream * 0x9E3779B9) ^ s)``, ``s`` the tensor's
  step count *before* this step, ``stream`` what is rounded (:data:`STREAM_PARAM` = 0).
* **word** of pair ``k``: ``mix32(lo(k) * 0x9E3779B9 ^ key ^ mix32(hi(k)))``, ``lo``/``hi``
  the low and high 32 bits of ``k`` (``mix32(0) == 0``, so below 2**32 pairs the last term
  vanishes).
* **draw** of element ``i`` (its row-major index in the tensor; complex tensors as their
  real view): 16 random bits, the low half of the word of pair ``i >> 1`` for even ``i``, the
  high half for odd ``i``. One hash serves two elements: 16 bits resolve a rounding to
  2**-16 of a step, far below what any rounding here needs, at half the cost of a word per
  element (the hash is most of stochastic rounding's cost in the fused CPU kernel).

Rounding of a float32 ``x`` with draw ``r`` (NaN rounds to nearest):

* bfloat16: ``bits(x) + r``, low 16 bits cleared: rounds away from zero with probability
  equal to the dropped fraction of an ulp (to 2**-16), so the result is unbiased.
* float16, ``|x| >= 2**-14`` (normal): the same with the low 13 bits and ``r & 0x1FFF``;
  below (subnormal, ulp ``2**-24``): ``t = |x| * 2**24`` is rounded up when
  ``r * 2**-16 < t - floor(t)``. Results at or above 65536 are infinite.

Every function here works on Python ints and on int64 tensors alike (no intermediate value
reaches 2**63), so host paths compute keys on the host and capturable paths on the device.
"""

from __future__ import annotations

from typing import TypeVar, Union

import torch
from torch import Tensor

__all__ = [
    "STREAM_PARAM",
    "STREAM_EXP_AVG_SQ",
    "STREAM_EXP_AVG",
    "mix32",
    "param_seed",
    "step_key",
    "element_draws",
    "stochastic_round",
    "stochastic_round_",
    "SR_DTYPES",
]

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
_M1, _M2 = 0x7FEB352D, 0x846CA68B

# What a key rounds: the parameter (stochastic_rounding=True), and the second and first
# moment when stored in a low-precision state format (state_precision "bf16" or "8bit").
# Separate streams keep the three roundings of one element independent.
STREAM_PARAM = 0
STREAM_EXP_AVG_SQ = 1
STREAM_EXP_AVG = 2

# Parameter dtypes that stochastic rounding applies to (complex32 as its float16 real view).
SR_DTYPES = (torch.bfloat16, torch.float16)

# Elements rounded per batch on the torch paths: bounds the int64 temporaries (8 MiB each).
_BATCH = 1 << 20

_I = TypeVar("_I", int, Tensor)


def _mul32(x: _I, c: int) -> _I:
    """``x * c mod 2**32`` for ``0 <= x < 2**32``, in two 16-bit halves of ``c`` so that int64
    tensors never overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32  # type: ignore[return-value]


def mix32(x: _I) -> _I:
    """The bijective 32-bit hash above, of ``0 <= x < 2**32``."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32  # _M1 < 2**31: the product stays below 2**63
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)  # type: ignore[return-value]


def param_seed(ordinal: int) -> int:
    """The seed of the parameter at position ``ordinal`` (0-based) in the optimizer."""
    return mix32(_mul32((ordinal + 1) & MASK32, GOLDEN))


def step_key(seed: _I, step: _I, stream: int = STREAM_PARAM) -> _I:
    """The key of one tensor's step: ``seed`` and ``step`` (the count before this step) as
    ints, or as 0-d int64 tensors (no host synchronisation)."""
    return mix32(mix32((seed & MASK32) ^ _mul32(stream, GOLDEN)) ^ (step & MASK32))  # type: ignore[operator]


def element_draws(key: Union[int, Tensor], start: int, count: int, device: torch.device) -> Tensor:
    """Random draws (int64 in ``[0, 2**16)``) of elements ``start .. start + count - 1``."""
    first, last = start >> 1, (start + count - 1) >> 1
    pair = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    x = _mul32(pair & MASK32, GOLDEN) ^ key
    if last >= 1 << 32:
        x = x ^ mix32(pair >> 32)
    word = mix32(x)
    halves = torch.stack((word & 0xFFFF, word >> 16), dim=1).reshape(-1)
    return halves[start & 1 : (start & 1) + count]


def stochastic_round(x: Tensor, draws: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 ``x`` rounded to ``dtype`` (bfloat16 or float16) with the 16-bit ``draws``."""
    xi = x.view(torch.int32)
    nan = torch.isnan(x)
    if dtype == torch.bfloat16:
        # Finite and infinite values: never overflows int32 (|bits| <= 0x7F800000).
        up = torch.where(nan, xi, (xi + draws.to(torch.int32)) & -0x10000)
        return up.view(torch.float32).to(dtype)
    if dtype != torch.float16:
        raise TypeError(f"stochastic rounding is defined for bfloat16 and float16, got {dtype}")
    magnitude = torch.where(nan, 0, xi & 0x7FFFFFFF)
    normal = ((magnitude + (draws & 0x1FFF).to(torch.int32)) & -0x2000) | (xi & -0x80000000)
    scaled = x.abs() * 2.0**24
    low = torch.floor(scaled)
    draw = draws.to(torch.float32) * 2.0**-16
    subnormal = torch.copysign((low + (draw < scaled - low).to(torch.float32)) * 2.0**-24, x)
    out = torch.where(magnitude < 0x38800000, subnormal, normal.view(torch.float32))
    return torch.where(nan, x, out).to(dtype)


def _local_shard(t: Tensor) -> Tensor:
    """A DTensor's (FSDP2's) local shard, the tensor itself otherwise."""
    if type(t) in (Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return t
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        with torch.no_grad():  # the shard itself, not an autograd view of it
            return t.to_local()
    return t


def stochastic_round_(dst: Tensor, x: Tensor, key: Union[int, Tensor], offset: int = 0) -> None:
    """``dst.copy_(x)`` with stochastic rounding: ``dst`` a bfloat16/float16 tensor (or a flat
    slice starting at element ``offset`` of one), ``x`` its float32 values (same shape).

    A DTensor ``dst`` (FSDP2) is rounded shard by shard, each rank its local shard with the
    *local* element index, as the fused kernels do (``x`` must share its layout).
    Runs in batches of :data:`_BATCH` elements, so the int64 temporaries stay bounded.
    """
    dst, x = _local_shard(dst), _local_shard(x)
    n = dst.numel()
    flat = x.reshape(-1)
    if n <= _BATCH:
        dst.copy_(stochastic_round(flat, element_draws(key, offset, n, x.device), dst.dtype).view(dst.shape))
        return
    out = torch.empty(n, dtype=dst.dtype, device=dst.device)
    for begin in range(0, n, _BATCH):
        end = min(n, begin + _BATCH)
        out[begin:end] = stochastic_round(flat[begin:end], element_draws(key, offset + begin, end - begin, x.device), dst.dtype)
    dst.copy_(out.view(dst.shape))

