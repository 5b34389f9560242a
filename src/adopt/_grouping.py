"""Tensor lists regrouped by device and dtype, complex tensors as real views: what multi-tensor
paths (foreach, fused) iterate over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor
from torch.optim import Optimizer


@dataclass
class TensorGroup:
    """The tensors of one device and dtype; index ``i`` of every list is the same parameter."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]

    @property
    def device(self) -> torch.device:
        return self.params[0].device


def group_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    has_complex: bool,
) -> list[TensorGroup]:
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, state_steps]  # type: ignore[list-item]
    )
    groups = []
    for tensor_lists, _ in grouped.values():
        lists = [cast(list[Tensor], ts) for ts in tensor_lists]
        if has_complex:
            lists[:4] = [[torch.view_as_real(t) if t.is_complex() else t for t in ts] for ts in lists[:4]]
        groups.append(TensorGroup(*lists))
    return groups
