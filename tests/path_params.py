"""Execution paths as pytest parameters; fused cases are skipped where the C kernel is not built.

Without the compiled kernel, ``fused=True`` on the CPU falls back to foreach with a warning,
so a fused case would test foreach (and fail on the warning); it is skipped with the reason.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest

from adopt._fused import fused_cpu_available
from helpers import PATHS

FUSED_SKIP: Optional[str] = (
    None if fused_cpu_available() else "the fused C kernel is not built here (adopt._fused.fused_cpu_available())"
)


def path_params() -> list[Any]:
    """``pytest.param`` per path of ``helpers.PATHS``, fused ones marked skip when unusable."""
    skip = pytest.mark.skip(reason=FUSED_SKIP)
    return [
        pytest.param(name, marks=skip if name.startswith("fused") and FUSED_SKIP else (), id=name) for name in PATHS
    ]


def usable_paths() -> dict[str, dict[str, Any]]:
    """The paths that can run here (fused left out while its kernel is unavailable)."""
    return {k: v for k, v in PATHS.items() if not (k.startswith("fused") and FUSED_SKIP)}
