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
    *,
    strict: bool = False,
) -> list[TensorGroup]:
    """The tensors grouped by their parameter's device and dtype; ``seeds`` (stochastic
    rounding's int64 scalars, not grouped by dtype) follow their parameters.

    While compiling, torch's grouping helper returns everything as one group and leaves the
    split to the compiler, which is right for foreach ops. ``strict=True`` splits there as
    well, for callers that hand each group to one opaque kernel (the fused paths): device
    and dtype are static while tracing, so the split costs no graph ops.
    """
    tensor_lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    grouped: list[tuple[list[list[Tensor]], list[int]]]
    if strict and torch.compiler.is_compiling():
        split: dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor]], list[int]]] = {}
        for i, p in enumerate(params):
            lists, indices = split.setdefault((p.device, p.dtype), ([[] for _ in tensor_lists], []))
            for ts, source in zip(lists, tensor_lists):
                ts.append(source[i])
            indices.append(i)
        grouped = list(split.values())
    else:
        by_torch = Optimizer._group_tensors_by_device_and_dtype(tensor_lists, with_indices=True)  # type: ignore[arg-type]
        grouped = [([cast(list[Tensor], ts) for ts in lists], indices)
                   for lists, indices in by_torch.values()]
    groups = []
    for lists, indices in grouped:
        if has_complex:
            lists[:4] = [[torch.view_as_real(t) if t.is_complex() else t for t in ts] for ts in lists[:4]]
        group_seeds = None if seeds is None else [seeds[i] for i in indices]
        groups.append(TensorGroup(lists[0], lists[1], lists[2], lists[3], lists[4], group_seeds))
    return groups
