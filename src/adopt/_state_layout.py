"""How a parameter's optimizer state is laid out under each ``state_precision``.

``optimizer.state[p]`` always holds ``step`` (float32 0-d) and, when stochastic rounding or a
low-precision format needs random bits, ``seed`` (int64 0-d). The moments:

* ``"full"``: ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype and shape (as
  ``torch.optim.Adam``);
* ``"bf16"``: ``exp_avg`` and ``exp_avg_sq`` as contiguous bfloat16 tensors of its shape (for
  a bfloat16 parameter the same tensors as ``"full"``; only their rounding differs);
* ``"8bit"``: ``exp_avg_codes`` and ``exp_avg_sq_codes`` (uint8, the parameter's shape,
  row-major) and ``exp_avg_scales`` and ``exp_avg_sq_scales`` (float32, one per block of 256
  elements): :mod:`adopt._state_formats`.

A state in another layout than its group asks for (the group's precision was changed, or a
checkpoint of another precision was loaded) is converted by :func:`converted`, decoding to
float32 and encoding with round-to-nearest (deterministic; no step is taken).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import _state_formats as formats
from ._state_path import local_shard, scale_blocks, shard_rows

__all__ = [
    "CODE_KEYS", "SCALE_KEYS", "target_format", "stored_format", "layout_of", "check_param",
    "zero_moments", "decoded", "converted", "restore_quantized", "check_loaded",
]

CODE_KEYS = {"exp_avg": "exp_avg_codes", "exp_avg_sq": "exp_avg_sq_codes"}
SCALE_KEYS = {"exp_avg": "exp_avg_scales", "exp_avg_sq": "exp_avg_sq_scales"}
_QUANTIZED_KEYS = (*CODE_KEYS.values(), *SCALE_KEYS.values())


def target_format(group: dict[str, Any], p: Tensor) -> str:
    """The layout ``p``'s state takes in ``group``: "full", "bf16" or "8bit" ("bf16" of a
    bfloat16 parameter is reported as "bf16": stored alike, rounded stochastically)."""
    return formats.storage_format(group["state_precision"], p.numel(), group["min_8bit_size"])


def stored_format(fmt: str, p: Tensor) -> str:
    """How moments of format ``fmt`` are stored for ``p``, as :func:`layout_of` reports it:
    "bf16" moments of a bfloat16 parameter are its "full" tensors (only their rounding differs)."""
    return "full" if fmt == "bf16" and p.dtype == torch.bfloat16 else fmt


def layout_of(state: dict[str, Any], p: Tensor) -> str:
    """The layout a state is stored in (see the module docstring)."""
    if "exp_avg_codes" in state:
        return "8bit"
    m = state.get("exp_avg")
    if isinstance(m, Tensor) and m.dtype == torch.bfloat16 and p.dtype != torch.bfloat16:
        return "bf16"
    return "full"


def check_param(p: Tensor, fmt: str, where: Callable[[], str]) -> None:
    """ValueError (naming ``where()``) unless a low-precision ``fmt`` can store ``p``'s moments."""
    if fmt == "full" or (type(p) in _PLAIN and p.dtype in formats.STATE_PARAM_DTYPES):
        return
    if p.dtype not in formats.STATE_PARAM_DTYPES:
        raise ValueError(
            f"state_precision={fmt!r} stores the moments of float32, bfloat16 and float16 parameters; {where()} is "
            f"{p.dtype} (give it a param group with state_precision='full')"
        )
    try:
        shard_rows(p)  # a DTensor in FSDP2's layout
    except ValueError as exc:
        raise ValueError(f"state_precision={fmt!r}: {where()}: {exc}") from None
    if not _is_dtensor(p):
        raise ValueError(
            f"state_precision={fmt!r} needs plain tensors or FSDP2 DTensors; {where()} is a {type(p).__name__} "
            "(use state_precision='full' for it)"
        )


_PLAIN = (Tensor, torch.nn.Parameter)


def _is_dtensor(p: Tensor) -> bool:
    try:
        return shard_rows(p) is not None
    except ValueError:
        return True


def _like(p: Tensor, local: Tensor, length: Optional[int] = None) -> Tensor:
    """``local`` (this rank's part) as a DTensor laid out like ``p`` (a scale tensor when
    ``length`` is given: sharded evenly along its one dim), or itself for a plain ``p``."""
    if shard_rows(p) is None:
        return local
    from torch.distributed.tensor import DTensor, Shard

    mesh = p.device_mesh  # type: ignore[attr-defined]
    if length is None:
        return DTensor.from_local(local, mesh, p.placements, run_check=False, shape=p.shape,  # type: ignore[attr-defined]
                                  stride=p.stride())
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size([length]), stride=(1,))


def zero_moments(p: Tensor, fmt: str) -> dict[str, Tensor]:
    """The moments of a fresh state in layout ``fmt`` (all zero)."""
    if fmt == "full":
        return {"exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    shard = local_shard(p)
    if fmt == "bf16":
        return {key: _like(p, torch.zeros(shard.shape, dtype=torch.bfloat16, device=shard.device))
                for key in formats.MOMENTS}
    moments: dict[str, Tensor] = {}
    blocks = scale_blocks(p)
    local_blocks = blocks // (p.device_mesh.size() if shard_rows(p) is not None else 1)  # type: ignore[attr-defined]
    for key in formats.MOMENTS:
        moments[CODE_KEYS[key]] = _like(p, torch.zeros(shard.shape, dtype=torch.uint8, device=shard.device))
        moments[SCALE_KEYS[key]] = _like(p, torch.zeros(local_blocks, dtype=torch.float32, device=shard.device),
                                         blocks)
    return moments


def decoded(state: dict[str, Any], p: Tensor, key: str) -> Tensor:
    """Moment ``key`` of a state in any layout, as float32 values of ``p``'s shape (complex
    parameters: complex64); for an FSDP2 DTensor, of this rank's shard."""
    shard = local_shard(p)
    if CODE_KEYS[key] in state:
        codes = local_shard(state[CODE_KEYS[key]]).reshape(-1)
        scales = local_shard(state[SCALE_KEYS[key]])[: -(-codes.numel() // formats.BLOCK_SIZE)]
        return formats.dequantize(formats.QuantizedMoment(codes, scales), key).view(shard.shape)
    value = local_shard(state[key])
    return value.to(torch.complex64 if value.is_complex() else torch.float32)


def converted(state: dict[str, Any], p: Tensor, fmt: str) -> dict[str, Any]:
    """A new state dict with ``state``'s moments in layout ``fmt`` (nearest rounding), the
    other entries (step, seed) shared."""
    moments = {key: decoded(state, p, key) for key in formats.MOMENTS}
    new = {k: v for k, v in state.items() if k not in formats.MOMENTS and k not in _QUANTIZED_KEYS}
    if fmt == "full":
        for key, value in moments.items():
            new[key] = _like(p, value.to(p.dtype).clone(memory_format=torch.contiguous_format))
    elif fmt == "bf16":
        for key, value in moments.items():
            new[key] = _like(p, value.to(torch.bfloat16).contiguous())
    else:
        fresh = zero_moments(p, "8bit")
        for key, value in moments.items():
            codes, scales = local_shard(fresh[CODE_KEYS[key]]), local_shard(fresh[SCALE_KEYS[key]])
            used = scales[: -(-codes.numel() // formats.BLOCK_SIZE)]
            formats.quantize(value.contiguous(), key, out=formats.QuantizedMoment(codes.view(-1), used))
            new[CODE_KEYS[key]], new[SCALE_KEYS[key]] = fresh[CODE_KEYS[key]], fresh[SCALE_KEYS[key]]
    return new


def restore_quantized(state: dict[str, Any], saved: dict[str, Any], p: Tensor, where: str) -> None:
    """Put ``saved``'s 8-bit codes and scales into ``state`` as they were saved (torch's
    loader casts them to the parameter's dtype), checked: ValueError naming ``where``."""
    present = [k for k in _QUANTIZED_KEYS if k in saved]
    if not present:
        return
    missing = [k for k in _QUANTIZED_KEYS if k not in saved]
    if missing:
        raise ValueError(f"loaded state of {where} has 8-bit moments without {', '.join(missing)}")
    blocks = scale_blocks(p)
    for key in formats.MOMENTS:
        codes, scales = saved[CODE_KEYS[key]], saved[SCALE_KEYS[key]]
        if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.shape != p.shape:
            raise ValueError(
                f"loaded state of {where} does not fit it: its {CODE_KEYS[key]} is {_describe(codes)}, expected "
                f"uint8 codes of the parameter's shape {tuple(p.shape)}"
            )
        if not isinstance(scales, Tensor) or scales.dtype != torch.float32 or scales.shape != (blocks,):
            raise ValueError(
                f"loaded state of {where} does not fit it: its {SCALE_KEYS[key]} is {_describe(scales)}, expected "
                f"float32 of shape ({blocks},) (one per block of {formats.BLOCK_SIZE})"
            )
        bad = _invalid_scales(local_shard(scales), formats.FORMATS[key])
        if bad is not None:
            raise ValueError(
                f"loaded state of {where} is corrupt: {SCALE_KEYS[key]}[{bad}] = {float(scales[bad])!r} is not a "
                "block scale (0, NaN or a power of two in the format's range)"
            )
        state[CODE_KEYS[key]] = codes.detach().to(p.device, copy=True).contiguous()
        state[SCALE_KEYS[key]] = scales.detach().to(p.device, copy=True).contiguous()
        state.pop(key, None)


def _invalid_scales(scales: Tensor, fmt: formats.CodeFormat) -> Optional[int]:
    """The index of the first value that no encoder writes as a block scale, or None."""
    bits = scales.detach().cpu().view(torch.int32).to(torch.int64)
    field = (bits >> 23) & 0xFF
    power = ((bits & 0x807FFFFF) == 0) & (field >= fmt.min_exponent_field) & (field <= 254)
    ok = power | (bits == 0) | torch.isnan(scales.detach().cpu())  # (a rank checks its own shard)
    if bool(ok.all()):
        return None
    return int((~ok).nonzero()[0, 0])


def check_loaded(state: dict[str, Any], p: Tensor, where: str) -> None:
    """ValueError naming ``where`` unless ``state`` holds a step and moments that fit ``p``."""
    if "step" not in state:
        raise ValueError(f"loaded state does not fit {where}: it has no step (keys: {sorted(state)})")
    if layout_of(state, p) == "8bit":
        return  # restore_quantized checked the codes and scales
    for key in formats.MOMENTS:
        value = state.get(key)
        if not isinstance(value, Tensor) or value.shape != p.shape:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
            raise ValueError(
                f"loaded state does not fit {where}: its {key} has {got}, the parameter has shape "
                f"{tuple(p.shape)} (a state_dict of another model?)"
            )


def _describe(t: object) -> str:
    return f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else repr(t)
