"""Low-memory optimizer state formats: one definition for every path.

``state_precision`` is ``"full"`` (the moments in the parameter's dtype, as always),
``"bf16"`` or ``"8bit"``. Arithmetic is float32 in every case: a step decodes the stored
moments, updates them in float32, and encodes them again. This module is the reference for
encoding and decoding; the fused C and Triton kernels reimplement it and must give the same
codes bit for bit. The moments are ``exp_avg`` (m, signed) and ``exp_avg_sq`` (v, >= 0).

Tensors are processed as their flat row-major view (complex tensors as their real view, as
for the random draws of ``adopt/_random.py``); ``n`` is that view's length. Tensors with
``n < MIN_8BIT_SIZE`` keep full precision under ``"8bit"`` (:func:`storage_format`).

Random draws: element ``i`` of a moment at a step rounds with the 16-bit draw
``element_draws(state_key(seed, step, moment), i)`` of ``adopt/_random.py``, ``seed`` the
tensor's ``state["seed"]`` (as for parameter rounding), ``step`` its count before the step,
and a stream per moment (``STREAM_EXP_AVG_SQ`` = 1, ``STREAM_EXP_AVG`` = 2). So every path
and a resumed run draw the same bits. The 8-bit encoder below takes the draw as the high
half of a 32-bit word, ``r = draw << 16``.

bfloat16 (``"bf16"``)
---------------------
m and v are stored as bfloat16, each exactly ``_random.stochastic_round`` of its float32
value with the element's draw (:func:`round_bf16`).

8-bit (``"8bit"``): block floating point
-----------------------------------------
The flat tensor is cut into blocks of :data:`BLOCK_SIZE` = 256 elements (the last one may be
shorter). Each block stores a float32 ``scale`` and each element a uint8 ``code``. A code
format is a small float with ``E`` exponent and ``M`` mantissa bits (unsigned: ``E + M = 8``;
signed: a sign bit, then ``E + M = 7`` magnitude bits), biased so that its largest binade is
``[1, 2)``. The magnitude ``q`` of a code has ``e = q >> M`` and ``f = q & (2**M - 1)``:

* unsigned, every code normal: ``value(q) = 2**(e - (2**E - 1)) * (1 + f / 2**M)``. The
  lowest code is ``2**-(2**E - 1)``, positive: the map cannot store 0 for a positive value.
* signed: the same for ``e >= 1``; ``e == 0`` is a subnormal range,
  ``value(q) = f * 2**(2 - 2**E - M)`` (``q == 0`` is zero); bit 7 is the sign.

m is signed E3M4 of ``m``. v is unsigned E4M4 of ``u = sqrt(v)`` (float32 square root,
correctly rounded: C ``sqrtf``, Triton ``sqrt_rn``), a *squared* format: it decodes to
``u`` (ADOPT's denominator, with no square root to take) and ``v = u * u``, exact (``u`` has
5 significant bits). ``docs/state-precision.md`` has the measurements behind the choice.

**Block scale** of the stored values ``y`` (m, or u): ``amax`` = the largest ``|y|`` of the
block (NaN if any element is NaN).

* ``amax`` NaN or infinite: ``scale = NaN`` and every code 0 (the block decodes to NaN: a
  non-finite moment is not hidden, as full precision would propagate it).
* ``amax == 0``: ``scale = 0`` and every code 0 (the block decodes to exactly 0, so an
  all-zero v makes the update use ``eps``, as in full precision).
* otherwise ``scale = 2**(B - 127)``, a power of two (scaling is exact, needs no division):
  ``B = clamp((bits(amax) + 2**D - 1) >> 23, B_min, 254)`` (``D = 23 - M``), the exponent
  field of amax rounded up to ``M`` mantissa bits. So ``amax / scale`` lies in ``[1, 2)``,
  except when amax lies above the top code of its binade (``(2 - 2**-M) * 2**k < amax <
  2**(k+1)``): then the scale is the next power of two, and amax can still round up. Without
  this a slowly growing block maximum sticks at the top code (the scale is computed from
  the stored values, which never exceed it). ``B_min`` makes every nonzero code decode to a
  normal float32, so decoding is exact on hardware that flushes subnormals: ``2**E``
  unsigned, ``2**E + M - 1`` signed, ``2**E + 63`` squared (the squares normal too; so
  ``u`` below ``2**-63`` is stored as ``2**-63``: v as ``2**-126``). 254 keeps the scale
  finite.

**Decoding** is ``value(code) * scale`` in float32, exact (a product of two floats whose
exact result is a normal float32; 0 and NaN scales give 0 and NaN); squared: then squared.

**Encoding** of a float32 ``y`` in a block with exponent field ``B``, on its bits alone (no
floating-point operation, so every implementation gets the same code). Let ``A`` be the low
31 bits of ``y`` (its magnitude), ``D = 23 - M`` (the dropped mantissa bits),
``o = B - (2**E - 1)`` (the float32 exponent field of code exponent 0) and ``r`` the
element's word ``draw << 16``; nearest rounding uses ``r = 2**31`` (draw ``2**15``; ties away
from zero). Integer arithmetic at least 64 bits wide:

* unsigned (the sign bit is ignored):
  ``q = clamp(((A + (r >> (32 - D))) >> D) - (o << M), 0, 2**(E + M) - 1)``: values below the
  lowest code are raised to it, values above the top code lowered to it.
* signed: with ``a = max(A >> 23, 1)`` (the exponent field, float32 subnormals as 1) and
  ``e = a - o``, the magnitude is

  - ``e >= 1``: ``q = ((A + (r >> (32 - D))) >> D) - (o << M)`` (as above);
  - ``e <= 0``: ``d = D + 1 - e``, ``F = (A & 0x7FFFFF) | (0x800000 if A >> 23 else 0)``;
    ``q = (F + (r >> (32 - d))) >> d`` if ``d <= 32``, else ``q = 0``;

  then ``q = min(q, 127)`` and ``code = q | 128`` if the sign bit of ``y`` is set (-0.0 keeps
  its sign), else ``q``.

Adding the top ``D`` (or ``d``) bits of ``r`` below the kept bits and truncating rounds away
from zero with probability equal to the dropped fraction of a code step: stochastic
rounding (to ``2**-16`` of a code step), unbiased in ``y`` except where the code saturates (unsigned below its lowest
code; anything above the top code, which happens only near the float32 maximum) and for
signed values under ``2**-8`` of the subnormal step (``d > 32``).

State bytes per element under ``"8bit"``: 2 + 8 / 256 = 2.03125 (codes and scales of both
moments); ``"bf16"``: 4.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, TypeVar, Union

import torch
from torch import Tensor

from ._random import STREAM_EXP_AVG, STREAM_EXP_AVG_SQ, element_draws, step_key, stochastic_round_

__all__ = [
    "STATE_PRECISIONS",
    "LOW_PRECISIONS",
    "STATE_PARAM_DTYPES",
    "BLOCK_SIZE",
    "MIN_8BIT_SIZE",
    "MOMENTS",
    "CodeFormat",
    "FORMATS",
    "QuantizedMoment",
    "storage_format",
    "state_bytes",
    "state_key",
    "block_scales",
    "scale_exponent",
    "encode",
    "decode",
    "decode_table",
    "quantize",
    "dequantize",
    "round_bf16",
]

STATE_PRECISIONS = ("full", "bf16", "8bit")
LOW_PRECISIONS = ("bf16", "8bit")  # the formats a step decodes and encodes
# Parameter dtypes whose moments can be stored in low precision (the arithmetic is float32).
STATE_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_SIZE = 256
# Below this many elements a tensor's state stays in full precision (as bitsandbytes): the
# saving is negligible and small tensors (biases, norms) are the most sensitive.
MIN_8BIT_SIZE = 4096
MOMENTS = ("exp_avg", "exp_avg_sq")

_STREAMS = {"exp_avg": STREAM_EXP_AVG, "exp_avg_sq": STREAM_EXP_AVG_SQ}
# Blocks encoded per batch: bounds the int64 temporaries (8 MiB each), as _random._BATCH.
_BATCH_BLOCKS = (1 << 20) // BLOCK_SIZE
_HALF = 1 << 15  # the draw that makes the rounding round-to-nearest

Key = Union[int, Tensor]
_I = TypeVar("_I", int, Tensor)


@dataclass(frozen=True)
class CodeFormat:
    """An 8-bit float-like code: ``signed`` (sign bit + 7 bits) or not, ``exp_bits`` +
    ``man_bits`` magnitude bits; ``squared``: the code stores the square root of the moment
    (module docstring)."""

    signed: bool
    exp_bits: int
    man_bits: int
    squared: bool = False

    def __post_init__(self) -> None:
        if self.exp_bits + self.man_bits + int(self.signed) != 8 or self.exp_bits < 1 or self.man_bits < 0:
            raise ValueError(f"not an 8-bit code format: {self}")
        if self.squared and self.signed:
            raise ValueError("a squared format stores a square root: it is unsigned")

    @property
    def name(self) -> str:
        return f"{'sqrt-' if self.squared else ''}{'' if self.signed else 'u'}e{self.exp_bits}m{self.man_bits}"

    @property
    def max_magnitude_code(self) -> int:
        return (1 << (self.exp_bits + self.man_bits)) - 1

    @property
    def min_exponent_field(self) -> int:
        """``B_min``: the smallest block exponent field with every code a normal float32
        (squared formats: with every code's square one)."""
        top = 1 << self.exp_bits
        if self.squared:
            return top + 63
        return top + self.man_bits - 1 if self.signed else top


FORMATS = {
    "exp_avg": CodeFormat(signed=True, exp_bits=3, man_bits=4),
    "exp_avg_sq": CodeFormat(signed=False, exp_bits=4, man_bits=4, squared=True),
}


@dataclass
class QuantizedMoment:
    """One moment in 8 bits: ``codes`` (uint8, the flat tensor's length) and ``scales``
    (float32, one per block of :data:`BLOCK_SIZE`)."""

    codes: Tensor
    scales: Tensor

    @classmethod
    def empty(cls, numel: int, device: Union[str, torch.device, None] = None) -> "QuantizedMoment":
        blocks = -(-numel // BLOCK_SIZE)
        return cls(torch.zeros(numel, dtype=torch.uint8, device=device), torch.zeros(blocks, dtype=torch.float32, device=device))

    @property
    def numel(self) -> int:
        return self.codes.numel()

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


def storage_format(precision: str, numel: int, min_8bit_size: int = MIN_8BIT_SIZE) -> str:
    """How a tensor of ``numel`` elements (complex: its real view) stores its moments under
    ``state_precision=precision``: ``"8bit"`` falls back to ``"full"`` for small tensors."""
    if precision not in STATE_PRECISIONS:
        raise ValueError(f"state_precision must be one of {STATE_PRECISIONS}, got {precision!r}")
    if precision == "8bit" and numel < min_8bit_size:
        return "full"
    return precision


def state_bytes(precision: str, numel: int, full_itemsize: int = 4, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of both moments of a tensor (``full_itemsize``: the bytes of one element of the
    parameter's dtype, what ``"full"`` stores)."""
    fmt = storage_format(precision, numel, min_8bit_size)
    if fmt == "8bit":
        return 2 * (numel + 4 * -(-numel // BLOCK_SIZE))
    return 2 * numel * (2 if fmt == "bf16" else full_itemsize)


def state_key(seed: _I, step: _I, moment: str) -> _I:
    """The key of one moment's rounding at one step (``step``: the count before the step;
    ints or 0-d int64 tensors, as ``_random.step_key``)."""
    return step_key(seed, step, _STREAMS[moment])


def _float_bits(x: Tensor) -> Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64)


def block_scales(x: Tensor, fmt: CodeFormat) -> Tensor:
    """The float32 scale of each block of the flat float32 ``x`` (module docstring)."""
    n = x.numel()
    blocks = -(-n // BLOCK_SIZE)
    flat = x.reshape(-1)
    if blocks * BLOCK_SIZE != n:
        flat = torch.cat([flat, flat.new_zeros(blocks * BLOCK_SIZE - n)])
    amax = flat.view(blocks, BLOCK_SIZE).abs().amax(dim=1)  # amax propagates NaN
    # amax rounded up to the code's mantissa: if it lies above the top code of its binade,
    # the next binade, so that rounding up from the top code stays possible.
    drop = 23 - fmt.man_bits
    field = ((_float_bits(amax) + (1 << drop) - 1) >> 23).clamp(fmt.min_exponent_field, 254)
    scale = (field << 23).to(torch.int32).view(torch.float32)
    scale = torch.where(amax == 0, 0.0, scale)
    return torch.where(torch.isfinite(amax), scale, float("nan"))


def scale_exponent(scales: Tensor) -> Tensor:
    """The exponent field ``B`` (int64) of float32 scales (0 for a zero scale)."""
    return (_float_bits(scales) >> 23) & 0xFF


def encode(x: Tensor, field: Tensor, draws: Optional[Tensor], fmt: CodeFormat) -> Tensor:
    """The code (int64 in ``[0, 256)``) of each float32 ``x`` (the stored quantity: for a
    squared format the square root) in a block of exponent field ``field`` (int64, broadcast
    against ``x``; a valid scale's, ``>= B_min``) with random ``draws`` (int64 in
    ``[0, 2**16)``; None: nearest). Element-wise, for testing a kernel's encoder."""
    xi = _float_bits(x)
    mag = xi & 0x7FFFFFFF
    r = (torch.full_like(xi, _HALF) if draws is None else draws) << 16
    drop = 23 - fmt.man_bits
    zero_field = field - ((1 << fmt.exp_bits) - 1)  # "o" of the docstring
    q = ((mag + (r >> (32 - drop))) >> drop) - (zero_field << fmt.man_bits)
    if not fmt.signed:
        return q.clamp(0, fmt.max_magnitude_code)
    exp_field = mag >> 23
    e = exp_field.clamp(min=1) - zero_field
    d = drop + 1 - e  # shift of the subnormal range; > drop where it applies (e <= 0)
    frac = (mag & 0x7FFFFF) | torch.where(exp_field > 0, 0x800000, 0)
    dc = d.clamp(1, 32)  # the shift where it is used (e <= 0), anything valid elsewhere
    sub = torch.where(d <= 32, (frac + (r >> (32 - dc))) >> dc, 0)
    q = torch.where(e >= 1, q, sub).clamp(max=fmt.max_magnitude_code)
    return q | torch.where(xi < 0, 0x80, 0)


def _relative_values(codes: Tensor, fmt: CodeFormat) -> Tensor:
    """``value(code)`` at scale 1, in float32 (exact), computed on the codes' device."""
    c = codes.to(torch.int64)
    q = c & fmt.max_magnitude_code
    drop = 23 - fmt.man_bits
    normal = ((q + ((128 - (1 << fmt.exp_bits)) << fmt.man_bits)) << drop).to(torch.int32).view(torch.float32)
    if not fmt.signed:
        return normal
    sub = q.to(torch.float32) * 2.0 ** (2 - (1 << fmt.exp_bits) - fmt.man_bits)
    mag = torch.where(q >> fmt.man_bits > 0, normal, sub)
    return torch.where(c >= 0x80, -mag, mag)


def decode(codes: Tensor, scales: Tensor, fmt: CodeFormat) -> Tensor:
    """float32 ``value(codes) * scales`` (``scales`` broadcast against ``codes``)."""
    return _relative_values(codes, fmt) * scales


@functools.lru_cache(maxsize=None)
def decode_table(fmt: CodeFormat) -> Tensor:
    """The 256 values of a format at scale 1 (float32, CPU): decoding is ``table[code] *
    scale``, exactly; for kernels that decode with a lookup table."""
    return _relative_values(torch.arange(256), fmt)


def _element_scales(scales: Tensor, count: int) -> Tensor:
    return scales[:, None].expand(-1, BLOCK_SIZE).reshape(-1)[:count]


def quantize(
    x: Tensor,
    moment: str,
    key: Optional[Key] = None,
    *,
    out: Optional[QuantizedMoment] = None,
    offset: int = 0,
    fmt: Optional[CodeFormat] = None,
) -> QuantizedMoment:
    """Encode float32 ``x`` (any shape, as its flat view) as ``moment`` (``"exp_avg"`` or
    ``"exp_avg_sq"``; the latter stores ``sqrt(x)``) in 8 bits: stochastic rounding with
    ``key`` (:func:`state_key`), or nearest when ``key`` is None. ``offset``: the flat index
    of ``x``'s first element in the tensor (random draws only; blocks start at ``x``'s first
    element). ``out``: write into an existing :class:`QuantizedMoment` of the right size.
    ``fmt`` overrides the moment's format (experiments; the optimizer uses :data:`FORMATS`).

    No host synchronisation (``key`` may be a 0-d int64 device tensor); temporaries are
    bounded by batches of ``2**20`` elements."""
    if x.dtype != torch.float32:
        raise TypeError(f"quantize takes float32 values, got {x.dtype}")
    code_format = FORMATS[moment] if fmt is None else fmt
    flat = x.reshape(-1)
    n = flat.numel()
    result = QuantizedMoment.empty(n, x.device) if out is None else out
    if result.numel != n or result.scales.numel() != -(-n // BLOCK_SIZE):
        raise ValueError(f"out holds {result.numel} elements, x has {n}")
    step = _BATCH_BLOCKS * BLOCK_SIZE
    for begin in range(0, n, step):
        end = min(n, begin + step)
        chunk = flat[begin:end].sqrt() if code_format.squared else flat[begin:end]
        scales = block_scales(chunk, code_format)
        per_element = _element_scales(scales, end - begin)
        draws = None if key is None else element_draws(key, offset + begin, end - begin, x.device)
        codes = encode(chunk, scale_exponent(per_element), draws, code_format)
        valid = torch.isfinite(per_element) & (per_element != 0)
        result.codes[begin:end] = torch.where(valid, codes, 0).to(torch.uint8)
        result.scales[begin // BLOCK_SIZE : -(-end // BLOCK_SIZE)] = scales
    return result


def dequantize(
    q: QuantizedMoment,
    moment: str,
    *,
    out: Optional[Tensor] = None,
    root: bool = False,
    fmt: Optional[CodeFormat] = None,
) -> Tensor:
    """The float32 values of ``q`` (flat; into ``out`` if given, any contiguous shape of
    that size). ``root``: for a squared format (``exp_avg_sq``), the stored square roots
    (what ADOPT divides by) rather than their squares."""
    code_format = FORMATS[moment] if fmt is None else fmt
    if root and not code_format.squared:
        raise ValueError(f"{code_format.name} does not store square roots")
    square = code_format.squared and not root
    n = q.numel
    result = torch.empty(n, dtype=torch.float32, device=q.codes.device) if out is None else out
    flat = result.view(-1)
    step = _BATCH_BLOCKS * BLOCK_SIZE
    for begin in range(0, n, step):
        end = min(n, begin + step)
        scales = q.scales[begin // BLOCK_SIZE : -(-end // BLOCK_SIZE)]
        values = decode(q.codes[begin:end], _element_scales(scales, end - begin), code_format)
        flat[begin:end] = values * values if square else values
    return result


def round_bf16(x: Tensor, key: Optional[Key] = None, *, offset: int = 0) -> Tensor:
    """float32 ``x`` as bfloat16: stochastic rounding with ``key`` (exactly
    ``_random.stochastic_round`` with the draws of ``key``), nearest-even when None."""
    if key is None:
        return x.to(torch.bfloat16)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    stochastic_round_(out, x, key, offset)
    return out
