"""Clip schedules: the threshold ``c(s)`` that bounds ADOPT's normalised gradient.

ADOPT clamps ``g / max(sqrt(v), eps)`` to ``[-c(s), c(s)]`` where ``s`` is the number of
earlier steps of that tensor (``s >= 1`` at every real update). The paper's default is
``c(s) = s ** 0.25``. A schedule is any callable; the built-in :class:`PowerClip` is a
small object rather than a lambda so optimizers that use it can be pickled, deep-copied
and printed.

What a schedule is called with
------------------------------
* ``int`` when the step counters live on the host: ``capturable=False`` in the
  single-tensor and foreach paths, and the fused path on CPU.
* a 0-d ``float32`` step tensor on the parameter's device when the counter lives there
  (``capturable=True``, or the fused path on CUDA), so that no value leaves the device.

Write custom schedules with arithmetic that works for both (``s ** 0.5``,
``torch.clamp``-free expressions), as :class:`PowerClip` does.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

__all__ = ["PowerClip", "ClipSchedule", "DEFAULT_CLIP"]

ClipSchedule = Callable[..., Union[float, Tensor]]


class PowerClip:
    """``c(s) = s ** exponent``; the ADOPT paper uses ``exponent = 0.25``.

    Works on ints, floats and tensors (elementwise), so kernels may evaluate it on a
    whole vector of step counts at once.
    """

    __slots__ = ("exponent",)

    def __init__(self, exponent: float = 0.25) -> None:
        self.exponent = float(exponent)

    def __call__(self, step: int | float | Tensor) -> float | Tensor:
        if isinstance(step, Tensor):
            # float64 (where the device has it) so float64 parameters see the host's threshold.
            wide = torch.float32 if step.device.type == "mps" else torch.float64
            return step.to(wide).pow(self.exponent)
        return float(step) ** self.exponent

    def __repr__(self) -> str:
        return f"PowerClip(exponent={self.exponent!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PowerClip) and other.exponent == self.exponent

    def __hash__(self) -> int:
        return hash(("PowerClip", self.exponent))

    def __getstate__(self) -> float:
        return self.exponent

    def __setstate__(self, exponent: float) -> None:
        self.exponent = exponent


DEFAULT_CLIP = PowerClip(0.25)


def check_schedule(clip_lambda: object) -> None:
    """Raise ValueError unless ``clip_lambda`` is a callable schedule or None."""
    if clip_lambda is not None and not callable(clip_lambda):
        raise ValueError(f"clip_lambda must be callable or None, got {clip_lambda!r}")


def host_thresholds(clip_lambda: ClipSchedule, steps: list[int]) -> list[float]:
    """Evaluate the schedule once per distinct step count (steps on the host).

    A tensor at its first step (``s == 0``) is not clipped; its entry is the schedule at 1,
    so a schedule is never called with 0 (``lambda s: 1 / s`` stays valid).
    """
    cache: dict[int, float] = {}
    out = []
    for s in steps:
        s = max(s, 1)
        if s not in cache:
            cache[s] = float(clip_lambda(s))
        out.append(cache[s])
    return out


def device_thresholds(clip_lambda: ClipSchedule, state_steps: list[Tensor]) -> Tensor:
    """Per-tensor thresholds as one 1-d tensor on the steps' device, with no host sync.

    :class:`PowerClip` is evaluated on the stacked steps in one kernel; any other callable
    receives each 0-d step tensor, as the single-tensor path gives it.
    """
    if isinstance(clip_lambda, PowerClip):
        return clip_lambda(torch.stack(state_steps))  # type: ignore[return-value]
    device = state_steps[0].device
    return torch.stack(
        [torch.as_tensor(clip_lambda(s), device=device).reshape(()) for s in state_steps]
    )
