"""Argument types shared by the command-line tools (``adopt demo``, ``adopt bench``)."""

from __future__ import annotations

import argparse
from typing import Any

_KIND_HINT = {"cpu": "cpu", "cuda": "cuda, cuda:N", "mps": "mps"}


def device_type(kinds: tuple[str, ...]) -> Any:
    """An argparse ``type`` that turns ``--device`` text into a ``torch.device`` of one of
    ``kinds`` that exists on this machine, or fails with a message naming what is wrong."""

    def parse(text: str) -> Any:
        import torch

        hint = ", ".join(_KIND_HINT[k] for k in kinds)
        try:
            device = torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"unknown device {text!r}; use {hint}") from None
        if device.type not in kinds:
            raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use {hint}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise argparse.ArgumentTypeError(f"{text!r} requested but CUDA is not available here; use cpu")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} requested but MPS is not available here; use cpu")
        return device

    parse.__name__ = "device"  # argparse names the type in its own messages
    return parse
