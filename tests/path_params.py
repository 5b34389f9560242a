"""Execution paths as pytest parameters, with the fused path included once it is usable here.

The fused path lives in ``adopt._fused``. Its cases run when that module exists, reports the
CPU kernel as built (``fused_cpu_available()``) and ``ADOPT(fused=True)`` is accepted;
otherwise they are skipped with the reason. Once they run, any error in a step fails them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Optional

import pytest
import torch

from adopt import ADOPT
from helpers import PATHS


def fused_skip_reason() -> Optional[str]:
    """Why fused cases cannot run here, or None when they can."""
    if importlib.util.find_spec("adopt._fused") is None:
        return "adopt._fused is not there yet (the fused path lands separately)"
    if not importlib.import_module("adopt._fused").fused_cpu_available():
        return "the fused C kernel is not built here (adopt._fused.fused_cpu_available() is False)"
    try:
        ADOPT([torch.nn.Parameter(torch.ones(1))], fused=True)
    except RuntimeError as exc:
        return f"ADOPT(fused=True) is not accepted yet: {exc}"
    return None


FUSED_SKIP = fused_skip_reason()

#: Every path as optimizer keyword arguments, fused included (it may be skipped).
ALL_PATHS: dict[str, dict[str, Any]] = {**PATHS, "fused": dict(fused=True)}


def path_params(names: Optional[list[str]] = None) -> list[Any]:
    """``pytest.param`` per path name (default: all), fused marked skip with the reason when unusable."""
    out = []
    for name in names if names is not None else list(ALL_PATHS):
        marks = pytest.mark.skip(reason=FUSED_SKIP) if name.startswith("fused") and FUSED_SKIP else ()
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def usable_paths() -> dict[str, dict[str, Any]]:
    """The paths that can run here (fused left out while it is unusable)."""
    return {k: v for k, v in ALL_PATHS.items() if not (k.startswith("fused") and FUSED_SKIP)}
