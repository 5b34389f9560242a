"""Tensor lists regrouped by device and dtype, complex tensors as real views: what multi-tensor
paths (foreach, fused) iterate over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, cast

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
    seeds: Optional[list[Tensor]] = None  # stochastic rounding's per-tensor seeds, when on

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
    seeds: Optional[list[Tensor]] = None,
) -> list[TensorGroup]:
    """The lists by device and dtype; ``seeds`` (int64 scalars, not grouped by dtype) follow
    their parameters."""
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, state_steps], with_indices=seeds is not None  # type: ignore[list-item]
    )
    groups = []
    for tensor_lists, indices in grouped.values():
        lists = [cast(list[Tensor], ts) for ts in tensor_lists]
        if has_complex:
            lists[:4] = [[torch.view_as_real(t) if t.is_complex() else t for t in ts] for ts in lists[:4]]
        group_seeds = None if seeds is None else [seeds[i] for i in cast(list[int], indices)]
        groups.append(TensorGroup(*lists, seeds=group_seeds))
    return groups
