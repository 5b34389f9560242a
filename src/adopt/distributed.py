"""ADOPT as a *functional* optimizer for ``torch.distributed``'s optimizer-overlap machinery.

``torch.distributed.optim`` keeps a map from optimizer classes to "functional" optimizers:
objects that hold per-parameter state but take the gradients as arguments instead of reading
``param.grad``. Two features run only such optimizers:

* ``DistributedDataParallel._register_fused_optim(optim_cls, *args, **kwargs)``: each
  parameter is updated as soon as its gradient bucket is all-reduced, inside backward
  (``step_param``).
* ``ZeroRedundancyOptimizer(..., overlap_with_ddp=True)`` with
  ``torch.distributed.algorithms.ddp_comm_hooks.ddp_zero_hook.hook_with_zero_step``: the
  ZeRO shard step runs inside DDP's communication hook (``step(gradients)``). PyTorch
  allows this only on NCCL/HCCL; with gloo ``hook_with_zero_step`` raises.

Importing this module registers :class:`FunctionalADOPT` with
``torch.distributed.optim.utils.register_functional_optim`` under its own class, so pass
``FunctionalADOPT`` (not ``ADOPT``) to those two APIs:

>>> from adopt.distributed import FunctionalADOPT
>>> ddp_model._register_fused_optim(FunctionalADOPT, lr=1e-3, weight_decay=0.01, decouple=True)

``ADOPT`` itself is deliberately *not* mapped. ``torch.distributed.optim.DistributedOptimizer``
(RPC) compiles every mapped functional optimizer with TorchScript, which cannot compile a
Python clip schedule and is deprecated (``torch.jit.script`` warns from PyTorch 2.13). Left
unmapped, ``DistributedOptimizer(ADOPT, ...)`` runs the regular :class:`~adopt.ADOPT` on each
worker, as it does for any optimizer without a functional twin. Everything else
(``ZeroRedundancyOptimizer`` without overlap, DDP, FSDP2) takes ``ADOPT`` directly.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch
from torch import Tensor

with warnings.catch_warnings():
    # Importing torch.distributed.optim scripts torch's own functional optimizers, and
    # torch.jit.script / torch.jit.interface warn that they are deprecated (PyTorch >= 2.13):
    # torch's internals, not something a user of this module can act on.
    warnings.filterwarnings(
        "ignore", message="`torch.jit.(script|interface)` is deprecated", category=DeprecationWarning
    )
    from torch.distributed.optim.utils import register_functional_optim

from .functional import adopt
from .optimizer import _number, _validate_hyperparameters, _validate_options
from .schedules import DEFAULT_CLIP, ClipSchedule, check_schedule

__all__ = ["FunctionalADOPT"]


class FunctionalADOPT:
    """ADOPT with gradients passed in: the functional-optimizer protocol of ``torch.distributed``.

    It computes exactly what :class:`adopt.ADOPT` computes (same functional kernel, same state
    layout: ``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) for one parameter group.
    Hyperparameters are read from :attr:`param_group` at every step, so a learning rate that
    ``ZeroRedundancyOptimizer`` syncs into it (e.g. from an LR scheduler) takes effect.

    Args:
        params: the parameters :meth:`step` updates; may be empty with
            ``_allow_empty_param_list=True`` when only :meth:`step_param` is used.
        lr, betas, eps, clip_lambda, weight_decay, decouple, foreach, maximize, capturable,
        fused, nesterov, caution, corrected_weight_decay: as for :class:`adopt.ADOPT`
        (``lr_max``, for corrected weight decay, is ``lr`` at construction).
        _allow_empty_param_list: accept an empty ``params`` (set by ``torch.distributed``).

    Raises:
        ValueError: an out-of-range hyperparameter, a non-callable ``clip_lambda``, or an
            empty ``params`` without ``_allow_empty_param_list``.
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        clip_lambda: Optional[ClipSchedule] = DEFAULT_CLIP,
        weight_decay: float = 0.0,
        decouple: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        fused: Optional[bool] = None,
        nesterov: bool = False,
        caution: bool = False,
        corrected_weight_decay: bool = False,
        _allow_empty_param_list: bool = False,
    ) -> None:
        _validate_hyperparameters(lr, betas, eps, weight_decay, foreach=foreach, capturable=capturable)
        check_schedule(clip_lambda)
        if len(params) == 0 and not _allow_empty_param_list:
            raise ValueError("optimizer got an empty parameter list")
        self.defaults: dict[str, Any] = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decouple=decouple,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            fused=fused,
            nesterov=nesterov,
            caution=caution,
            corrected_weight_decay=corrected_weight_decay,
            lr_max=_number(lr),
        )
        _validate_options(self.defaults)
        # One group only, as for torch's functional optimizers; ZeroRedundancyOptimizer wraps it
        # into ``param_groups`` and syncs its own group's hyperparameters into this dict.
        self.param_group: dict[str, Any] = {"params": list(params), **self.defaults}
        self.clip_lambda = clip_lambda
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    def step_param(self, param: Tensor, grad: Optional[Tensor]) -> None:
        """Update one parameter with ``grad`` (no-op for ``None``); used by DDP's overlap hook."""
        if grad is not None:
            self._update([param], [grad])

    def step(self, gradients: list[Optional[Tensor]]) -> None:
        """Update ``param_group['params']`` with ``gradients`` (same order; ``None`` skips one).

        Raises:
            ValueError: ``gradients`` and the parameters differ in length.
        """
        params = self.param_group["params"]
        if len(params) != len(gradients):
            raise ValueError(
                f"got {len(gradients)} gradients for {len(params)} parameters; they must match one to one"
            )
        pairs = [(p, g) for p, g in zip(params, gradients) if g is not None]
        self._update([p for p, _ in pairs], [g for _, g in pairs])

    def _update(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """One ADOPT step over ``params``, creating state like :class:`adopt.ADOPT` on first sight."""
        if not params:
            return
        group = self.param_group
        on_device = group["capturable"] or group["fused"]
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        state_steps: list[Tensor] = []
        for p in params:
            state = self.state.get(p)
            if state is None:
                state = self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
        beta1, beta2 = group["betas"]
        with torch.no_grad():
            adopt(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                state_steps,
                foreach=group["foreach"],
                capturable=group["capturable"],
                fused=group["fused"],
                has_complex=any(torch.is_complex(p) for p in params),
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                clip_lambda=self.clip_lambda,
                weight_decay=group["weight_decay"],
                decouple=group["decouple"],
                eps=group["eps"],
                maximize=group["maximize"],
                nesterov=group["nesterov"],
                caution=group["caution"],
                corrected_weight_decay=group["corrected_weight_decay"],
                lr_max=group["lr_max"],
            )


register_functional_optim(FunctionalADOPT, FunctionalADOPT)  # type: ignore[no-untyped-call]  # torch leaves it untyped
