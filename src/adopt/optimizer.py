"""The :class:`ADOPT` optimizer: a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Optional, Union, cast

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _use_grad_for_differentiable

from ._checkpoint import translate_state_dict
from ._checks import check_tensors
from ._fused import fused_cpu_step, fused_cuda_available, fused_supported_dtypes
from . import _state_formats as formats
from ._random import param_seed
from . import _state_layout as layout
from ._state_path import check_state_tensors, fused_state_available, state_adopt
from .functional import adopt, check_lr_max, default_path
from .schedules import DEFAULT_CLIP, ClipSchedule, check_schedule

__all__ = ["ADOPT"]

_is_sparse = operator.attrgetter("is_sparse")
_get_exp_avg = operator.itemgetter("exp_avg")
_get_exp_avg_sq = operator.itemgetter("exp_avg_sq")
_get_step = operator.itemgetter("step")


class ADOPT(Optimizer):
    r"""ADOPT: Adam that normalises by the *previous* second moment before momentum.

    Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any β2 with the Optimal Rate",
    NeurIPS 2024. Per parameter tensor, with ``s`` the number of steps it has taken before:

    .. code-block:: text

        s == 0:  v = g²                                   (no parameter change)
        s >= 1:  n = clamp(g / max(√v, eps), -c(s), c(s))
                 m = β1·m + (1 - β1)·n
                 θ = θ - lr·m
                 v = β2·v + (1 - β2)·g²

    Because ``g`` is divided by a ``v`` that does not yet contain ``g``, the update stays
    unbiased for any β2, which is why ADOPT converges where Adam can diverge.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate, a float or a 1-element Tensor (default: 1e-3).
        betas: (β1, β2) for the momentum and the second moment (default: (0.9, 0.9999)).
        eps: lower bound on ``√v`` in the normalisation (default: 1e-6).
        clip_lambda: step → clip threshold for the normalised gradient, or None for no clip
            (default: :class:`~adopt.schedules.PowerClip` ``(0.25)``, i.e. ``s ** 0.25``).
            It receives an ``int`` when step counters live on the host and a 0-d tensor
            when they live on the device (``capturable=True``, or fused on CUDA).
        weight_decay: weight decay coefficient (default: 0).
        decouple: decoupled (AdamW-style) weight decay ``θ ← θ·(1 - lr·wd)`` instead of
            adding ``wd·θ`` to the gradient (default: False).
        foreach: use the multi-tensor path (default: None, chosen automatically).
        maximize: maximise the objective (default: False).
        capturable: no host synchronisation in ``step()``, so it can be captured in a CUDA
            graph or compiled with ``fullgraph=True`` (default: False).
        differentiable: let autograd run through ``step()`` (default: False).
        fused: use the fused one-pass kernel (default: None: fused wherever its kernel is
            available for every parameter (the C kernel on CPU, Triton on CUDA), unless
            ``foreach`` or ``differentiable`` is set or the step is being compiled; see
            docs/execution-paths.md).
        stochastic_rounding: write bfloat16/float16 parameters back with stochastic rounding,
            so that updates below half an ulp are not lost (pure low-precision training);
            float32/float64 parameters are unaffected (default: False). The random bits are
            a function of a per-parameter seed (``state["seed"]``), the step and the element,
            so every path rounds alike and a resumed run equals an uninterrupted one; see
            docs/low-precision.md.
        nesterov: Nesterov momentum: the update is ``β1·m + (1 - β1)·n`` with the new ``m``
            (as optax's contrib ADOPT) instead of ``m`` (default: False).
        caution: the cautious update (Liang et al. 2024, "Cautious Optimizers"): elements
            whose update disagrees in sign with the gradient are dropped, the rest scaled by
            the inverse of the kept fraction (at least 1e-3), per tensor (default: False).
        corrected_weight_decay: decoupled decay ``θ ← θ·(1 - lr²/lr_max·wd)``, so that decay
            follows the shape of the lr schedule rather than its scale (Defazio et al. 2025;
            needs ``decouple=True``). ``lr_max`` is each group's ``lr`` when it was added
            (``group["lr_max"]``, saved in the state_dict; set it in a group's dict to choose
            another) (default: False).
        state_precision: how ``exp_avg`` and ``exp_avg_sq`` are stored: ``"full"`` (the
            parameter's dtype), ``"bf16"`` (bfloat16, 4 bytes per parameter) or ``"8bit"``
            (8-bit block floating point, about 2.03 bytes per parameter), the latter two
            written back with stochastic rounding so that the moments keep tracking; the
            arithmetic is float32 either way. For float32, bfloat16 and float16 parameters
            (default: "full"; see docs/state-precision.md).
        min_8bit_size: under ``"8bit"``, tensors with fewer elements keep full-precision
            state (biases, norms: small and the most sensitive) (default: 4096).

    Example:
        >>> model = torch.nn.Linear(10, 1)
        >>> optimizer = ADOPT(model.parameters(), lr=1e-3, weight_decay=0.01, decouple=True)
    """

    def __init__(
        self,
        params: ParamsT,
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
        differentiable: bool = False,
        fused: Optional[bool] = None,
        stochastic_rounding: bool = False,
        nesterov: bool = False,
        caution: bool = False,
        corrected_weight_decay: bool = False,
        state_precision: str = "full",
        min_8bit_size: int = formats.MIN_8BIT_SIZE,
    ) -> None:
        _validate_hyperparameters(lr, betas, eps, weight_decay, foreach=foreach, capturable=capturable)
        _validate_rounding(stochastic_rounding, differentiable)
        _validate_state_precision(state_precision, min_8bit_size, differentiable)
        check_schedule(clip_lambda)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decouple=decouple,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            stochastic_rounding=stochastic_rounding,
            nesterov=nesterov,
            caution=caution,
            corrected_weight_decay=corrected_weight_decay,
            lr_max=None,  # each group's own lr when it is added
            state_precision=state_precision,
            min_8bit_size=min_8bit_size,
        )
        super().__init__(params, defaults)
        self.clip_lambda = clip_lambda
        if fused:
            # After the params are checked, as torch.optim.Adam does (its order of errors).
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
            # GradScaler then hands over grad_scale/found_inf: unscaling and the inf skip
            # happen inside the kernel instead of in extra passes over the gradients.
            self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, validating any hyperparameters it overrides."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_hyperparameters(
            group["lr"], group["betas"], group["eps"], group["weight_decay"],
            foreach=group["foreach"], capturable=group["capturable"],
        )
        _validate_rounding(group["stochastic_rounding"], group["differentiable"])
        _validate_state_precision(group["state_precision"], group["min_8bit_size"], group["differentiable"])
        if group["lr_max"] is None:
            group["lr_max"] = _number(group["lr"])
        _validate_options(group)

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults/state/param_groups; keep the schedule too.
        return {**super().__getstate__(), "clip_lambda": self.clip_lambda}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore from a pickle, filling options older versions did not have.

        Step counters that are not what ADOPT creates (numbers from old checkpoints or other
        implementations, tensors of another dtype, shape or device) become float32 0-d
        tensors of the same count where :meth:`_create_state` would put them.
        """
        if "clip_lambda" not in state:  # load_state_dict passes only state and param_groups
            state = {**state, "clip_lambda": self.__dict__.get("clip_lambda", DEFAULT_CLIP)}
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decouple", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("stochastic_rounding", False)
            group.setdefault("nesterov", False)
            group.setdefault("caution", False)
            group.setdefault("corrected_weight_decay", False)
            group.setdefault("state_precision", "full")
            group.setdefault("min_8bit_size", formats.MIN_8BIT_SIZE)
            if group.get("lr_max") is None:
                group["lr_max"] = _number(group["lr"])
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if p_state and layout.layout_of(p_state, p) != "full":
                    self._low_precision_seen = True  # full groups then check their layouts
                step = p_state.get("step")
                if step is None:
                    continue  # no state (or no step: load_state_dict reports it)
                device = _step_device(group, p)
                if not (torch.is_tensor(step) and step.dtype == torch.float32 and step.dim() == 0
                        and step.device == device):
                    count = float(step.detach().reshape(()).item()) if torch.is_tensor(step) else float(step)
                    p_state["step"] = torch.tensor(count, dtype=torch.float32, device=device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict as ``torch.optim.Optimizer`` does, then check that every
        parameter's state has a step and moments of its shape.

        State dicts of other ADOPT implementations (timm's ``Adopt``, pytorch_optimizer's
        ``ADOPT``) are translated first, and a setting missing from a saved group takes the
        value this optimizer was constructed with (see ``adopt._checkpoint`` and
        docs/api.md); a saved setting ADOPT cannot honour is a ValueError naming it.
        ``state_precision`` and ``min_8bit_size`` stay as this optimizer has them: the loaded
        moments are converted to its storage (docs/state-precision.md). State
        saved for another model is reported here, naming the parameter, rather than by a
        later ``step()`` that could fail halfway through the param groups. On error the
        optimizer keeps the state it had.
        """
        translated, clip = translate_state_dict(state_dict, self.param_groups, frozenset(self.defaults))
        previous = self.__getstate__()  # load_state_dict installs new objects; these stay intact
        storage = [(g["state_precision"], g["min_8bit_size"]) for g in self.param_groups]
        super().load_state_dict(translated)
        for group, (precision, min_size) in zip(self.param_groups, storage):
            group["state_precision"], group["min_8bit_size"] = precision, min_size
        try:
            for g_idx, group in enumerate(self.param_groups):
                _validate_options(group, f"loaded state_dict, param_groups[{g_idx}]: ")
            self._restore_raw(state_dict)
            self._check_state_shapes()
            self._conform_loaded()
        except ValueError:
            self.__setstate__(previous)
            raise
        if clip is not None:
            (self.clip_lambda,) = clip

    def _restore_raw(self, state_dict: dict[str, Any]) -> None:
        """Put back the saved seeds (int64 scalars next to their steps) and 8-bit codes and
        scales as they were saved, checked (ValueError naming the parameter).

        torch's loader casts every state tensor but ``step`` to the parameter's dtype, which
        would turn an int64 seed into a rounded bfloat16 or float32 value and uint8 codes
        and float32 scales into the parameter's dtype.
        """
        for g_idx, (saved, group) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            for p_idx, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
                saved_state = state_dict["state"].get(saved_id, {})
                where = f"param_groups[{g_idx}]['params'][{p_idx}]"
                if p in self.state:
                    layout.restore_quantized(self.state[p], saved_state, p, where)
                seed = saved_state.get("seed")
                if seed is not None:
                    self._restore_seed(p, seed, where)

    def _conform_loaded(self) -> None:
        """Convert loaded state to the layout each group asks for (a full-precision
        checkpoint into a low-precision optimizer and the other way round)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if self.state.get(p)]
            if group["state_precision"] != "full" or any(layout.layout_of(self.state[p], p) != "full" for p in params):
                for p in params:
                    layout.check_param(p, layout.target_format(group, p), functools.partial(self._where_param, group, p))
                self._conform(group, params, [self.state[p] for p in params])

    def _restore_seed(self, p: Tensor, seed: object, where: str) -> None:
        """One saved seed, checked, into the state of ``p``; ValueError naming ``where``."""
        if not isinstance(seed, Tensor) or seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
            got = f"a {seed.dtype} tensor of shape {tuple(seed.shape)}" if isinstance(seed, Tensor) else repr(seed)
            raise ValueError(f"loaded state of {where} has a seed that is not an integer scalar tensor: {got}")
        p_state = self.state[p]
        p_state["seed"] = seed.detach().reshape(()).to(torch.int64).to(p_state["step"].device, copy=True)

    def _check_state_shapes(self) -> None:
        """Raise ValueError naming the first parameter whose step is missing or whose moments
        are missing or do not fit it (another shape: a state_dict of another model?)."""
        for g_idx, group in enumerate(self.param_groups):
            for p_idx, p in enumerate(group["params"]):
                p_state = self.state.get(p)
                if p_state:
                    layout.check_loaded(p_state, p, f"param_groups[{g_idx}]['params'][{p_idx}]")

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        seeds: Optional[list[Tensor]] = None,
        exp_avg_scales: Optional[list[Tensor]] = None,
        exp_avg_sq_scales: Optional[list[Tensor]] = None,
    ) -> Union[bool, tuple[bool, int, int]]:
        """Fill the lists with the group's parameters that have gradients and their state
        (``seeds``: with stochastic rounding, each one's ``state["seed"]``, created if missing).
        A group with low-precision state is filled by :meth:`_init_low_precision_group`
        instead (whose return value is a tuple).

        Validates first (an error names the parameter), then creates missing state, then
        checks that every gradient and state tensor matches its parameter (shape, dtype,
        device, layout), so that no path can fail halfway through the step. Returns
        whether any parameter is complex. ``torch.compile`` runs this method eagerly rather
        than tracing it, so it may use C-level ``map``: for many small tensors this loop, not
        the arithmetic, bounds the step time.
        """
        if group["state_precision"] != "full":
            assert seeds is not None and exp_avg_scales is not None and exp_avg_sq_scales is not None
            return self._init_low_precision_group(group, params, grads, exp_avgs, exp_avg_sqs, state_steps, seeds,
                                                  exp_avg_scales, exp_avg_sq_scales)
        all_grads = [p.grad for p in group["params"]]
        params.extend([p for p, g in zip(group["params"], all_grads) if g is not None])
        grads.extend([g for g in all_grads if g is not None])
        self._check_grads(group, all_grads, grads)
        states = [state or None for state in map(self.state.get, params)]  # {} is no state, as in torch
        if group["differentiable"] and any(state and state["step"].requires_grad for state in states):
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
        if None in states:
            self._create_state(group, params, states)
        if getattr(self, "_low_precision_seen", False):
            self._conform(group, params, states)  # moments stored in low precision: back to full
        ready = cast(list[dict[str, Any]], states)
        exp_avgs.extend(map(_get_exp_avg, ready))
        exp_avg_sqs.extend(map(_get_exp_avg_sq, ready))
        state_steps.extend(map(_get_step, ready))
        check_tensors(params, grads, exp_avgs, exp_avg_sqs, state_steps, name=lambda i: self._where_param(group, params[i]))
        if group["stochastic_rounding"] and seeds is not None:
            seeds.extend(self._seeds(params, ready))
        return any(map(Tensor.is_complex, params))

    def _check_grads(self, group: dict[str, Any], all_grads: list[Optional[Tensor]], grads: list[Tensor]) -> None:
        """Raise for a sparse gradient (naming its parameter) or a Tensor lr with foreach and
        capturable=False; ``all_grads``: one per parameter of the group, ``grads``: those set."""
        if any(map(_is_sparse, grads)):
            p_idx = next(i for i, g in enumerate(all_grads) if g is not None and g.is_sparse)
            raise RuntimeError(  # torch.optim.Adam's words, with ADOPT's name
                "ADOPT does not support sparse gradients, please consider SparseAdam instead: "
                f"{self._where(group, p_idx)} (shape {tuple(group['params'][p_idx].shape)}) has a sparse gradient"
            )
        if group["foreach"] and isinstance(group["lr"], Tensor) and not group["capturable"]:
            raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")

    def _init_low_precision_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        seeds: list[Tensor],
        exp_avg_scales: list[Tensor],
        exp_avg_sq_scales: list[Tensor],
    ) -> tuple[bool, int, int]:
        """:meth:`_init_group` of a group with ``state_precision`` "bf16" or "8bit".

        The lists are filled in the order of the storage formats: first ``n_full`` tensors
        with full-precision state (those under ``min_8bit_size``), then ``n_bf16`` with
        bfloat16 moments, then the rest with 8-bit codes in ``exp_avgs``/``exp_avg_sqs`` and
        their scales in the two scale lists; ``seeds`` for all. Creates missing state,
        converts state stored in another layout (recorded for a failed step's rollback), then
        checks every tensor. Returns ``(has_complex, n_full, n_bf16)``.
        """
        all_grads = [p.grad for p in group["params"]]
        with_grad = [p for p, g in zip(group["params"], all_grads) if g is not None]
        self._check_grads(group, all_grads, [g for g in all_grads if g is not None])
        wanted = {p: layout.target_format(group, p) for p in with_grad}
        for p in with_grad:
            layout.check_param(p, wanted[p], functools.partial(self._where_param, group, p))
        order = {"full": 0, "bf16": 1, "8bit": 2}
        ordered = sorted(with_grad, key=lambda p: order[wanted[p]])  # stable: the group's order within a format
        states: list[Optional[dict[str, Any]]] = [state or None for state in map(self.state.get, ordered)]
        if None in states:
            self._create_state(group, ordered, states)
        self._conform(group, ordered, states)
        ready = cast(list[dict[str, Any]], states)
        params.extend(ordered)
        grads.extend(cast(Tensor, p.grad) for p in ordered)
        seeds.extend(self._seeds(ordered, ready))
        state_steps.extend(state["step"] for state in ready)
        for p, state in zip(ordered, ready):
            if wanted[p] == "8bit":
                exp_avgs.append(state[layout.CODE_KEYS["exp_avg"]])
                exp_avg_sqs.append(state[layout.CODE_KEYS["exp_avg_sq"]])
                exp_avg_scales.append(state[layout.SCALE_KEYS["exp_avg"]])
                exp_avg_sq_scales.append(state[layout.SCALE_KEYS["exp_avg_sq"]])
            else:
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
        n_full = sum(1 for p in ordered if wanted[p] == "full")
        n_bf16 = sum(1 for p in ordered if wanted[p] == "bf16")
        def where(i: int) -> str:
            return self._where_param(group, params[i])

        check_tensors(params[:n_full], grads[:n_full], exp_avgs[:n_full], exp_avg_sqs[:n_full], state_steps[:n_full],
                      name=where)
        for fmt, begin, end in (("bf16", n_full, n_full + n_bf16), ("8bit", n_full + n_bf16, len(params))):
            if begin == end:
                continue
            eight_bit = fmt == "8bit"
            check_state_tensors(params[begin:end], grads[begin:end], exp_avgs[begin:end], exp_avg_sqs[begin:end],
                                exp_avg_scales if eight_bit else None, exp_avg_sq_scales if eight_bit else None,
                                state_steps[begin:end], seeds[begin:end], fmt,
                                name=functools.partial(_offset_name, where, begin))
        return any(p.is_complex() for p in params[:n_full]), n_full, n_bf16

    def _low_precision_calls(self, group: dict[str, Any]) -> list[tuple[dict[str, Any], str, list[Any], bool]]:
        """A low-precision group's tensors as one call per storage format."""
        lists: list[list[Tensor]] = [[] for _ in range(8)]
        params, grads, exp_avgs, exp_avg_sqs, steps, seeds, m_scales, v_scales = lists
        has_complex, n_full, n_bf16 = cast(tuple[bool, int, int], self._init_group(group, *lists))
        calls: list[tuple[dict[str, Any], str, list[Any], bool]] = []
        if n_full:
            calls.append((group, "full", [ts[:n_full] for ts in lists[:6]], has_complex))
        end = n_full + n_bf16
        if n_bf16:
            calls.append((group, "bf16", [ts[n_full:end] for ts in lists[:4]] + [None, None, steps[n_full:end],
                                                                              seeds[n_full:end]], False))
        if len(params) > end:
            calls.append((group, "8bit", [ts[end:] for ts in lists[:4]] + [m_scales, v_scales, steps[end:],
                                                                        seeds[end:]], False))
        return calls

    def _conform(self, group: dict[str, Any], params: list[Tensor], states: list[Optional[dict[str, Any]]]) -> None:
        """Convert the states stored in another layout than ``group`` asks for (replacing
        the state dict, the old one recorded in ``self._replaced`` for rollback)."""
        replaced = getattr(self, "_replaced", None)
        for i, p in enumerate(params):
            state = states[i]
            if state is None:
                continue
            wanted = layout.target_format(group, p)
            stored = layout.stored_format(wanted, p)
            if layout.layout_of(state, p) == stored:
                continue
            new = layout.converted(state, p, stored)
            if replaced is not None:
                replaced.append((p, state))
            states[i] = self.state[p] = new
            if wanted != "full":
                self._low_precision_seen = True

    def _seeds(self, params: list[Tensor], states: list[dict[str, Any]]) -> list[Tensor]:
        """Each parameter's stochastic-rounding seed, created next to its step where missing
        (recorded in ``self._seeded`` so that a failed step can remove it again)."""
        missing = [i for i, state in enumerate(states) if "seed" not in state]
        if missing:
            ordinals = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
            seeded = getattr(self, "_seeded", [])
            for i in missing:
                device = states[i]["step"].device
                states[i]["seed"] = torch.tensor(param_seed(ordinals[id(params[i])]), dtype=torch.int64, device=device)
                seeded.append(states[i])
        return [state["seed"] for state in states]

    def _create_state(
        self, group: dict[str, Any], params: list[Tensor], states: list[Optional[dict[str, Any]]]
    ) -> None:
        """Zero state for the parameters seen for the first time (``states[i] is None``)."""
        if group["fused"]:
            # Checked once per parameter, when its state is created, in the words of torch's
            # fused Adam (whose list of devices is longer: ADOPT's kernels run on these two).
            supported = fused_supported_dtypes()
            for p, state in zip(params, states):
                if state is None and (p.dtype not in supported or not (p.is_cpu or p.is_cuda)):
                    raise RuntimeError(
                        "`fused=True` requires all the params to be floating point Tensors of supported devices: "
                        f"['cpu', 'cuda'] but {p.dtype} and {p.device.type} ({self._where_param(group, p)}; "
                        "the fused kernels take float64, float32, float16, bfloat16 and complex tensors)"
                    )
        low_precision = group["state_precision"] != "full"
        for i, p in enumerate(params):
            if states[i] is not None:
                continue
            fmt = layout.target_format(group, p) if low_precision else "full"
            self.state.pop(p, None)  # re-added as a new key, so a failed step's rollback removes it
            states[i] = self.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=_step_device(group, p)),
                **layout.zero_moments(p, layout.stored_format(fmt, p)),
            }
            if fmt != "full":
                self._low_precision_seen = True

    def _where_param(self, group: dict[str, Any], p: Tensor) -> str:
        return self._where(group, next(i for i, q in enumerate(group["params"]) if q is p))

    def _where(self, group: dict[str, Any], p_idx: int) -> str:
        g_idx = next(i for i, g in enumerate(self.param_groups) if g is group)
        return f"param_groups[{g_idx}]['params'][{p_idx}]"

    def _prepare(self) -> list[tuple[dict[str, Any], str, list[Any], bool]]:
        """Every group's tensor lists (and, with stochastic rounding, the seeds as a sixth
        list), all validated before any update runs: ``(group, state format, lists,
        has_complex)``, a group with low-precision state split by format.

        If a group fails validation, state created for earlier groups in this call is
        removed again, so a failed ``step()`` leaves the optimizer as it was.
        """
        known = len(self.state)
        self._seeded: list[dict[str, Any]] = []
        self._replaced: list[tuple[Tensor, dict[str, Any]]] = []
        prepared: list[tuple[dict[str, Any], str, list[Any], bool]] = []
        try:
            for group in self.param_groups:
                if group["state_precision"] != "full":
                    prepared.extend(self._low_precision_calls(group))
                    continue
                lists: list[list[Tensor]] = [[], [], [], [], [], []]
                has_complex = cast(bool, self._init_group(group, *lists))
                prepared.append((group, "full", lists, has_complex))
        except Exception:
            for p_state in self._seeded:
                p_state.pop("seed", None)
            for p, old in reversed(self._replaced):
                self.state[p] = old
            for p in list(self.state)[known:]:
                del self.state[p]
            raise
        finally:
            del self._replaced
        return prepared

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Perform one optimization step; returns the closure's loss if a closure is given."""
        # The common CPU case is one C call. It switches no grad mode (the kernel writes
        # through data pointers, outside autograd, and bumps the parameters' version counters
        # itself) and has no CUDA graph to check, so it skips what the general step sets up.
        if closure is None and self._fused_cpu_step():
            return None
        return self._general_step(closure, tried_fused=closure is None)

    def _fused_cpu_step(self) -> bool:
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        return fused_cpu_step(self.param_groups, self.state, self.clip_lambda, grad_scale, found_inf)

    @_use_grad_for_differentiable
    def _general_step(self, closure: Optional[Callable[[], float]], *, tried_fused: bool) -> Optional[float]:
        """``step()`` as ``torch.optim.Adam`` runs it: grad mode off (unless differentiable)."""
        _graph_capture_health_check(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not tried_fused and self._fused_cpu_step():
            return loss
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group, fmt, lists, has_complex in self._prepare():
            if fmt != "full":
                self._low_precision_step(group, fmt, lists, grad_scale, found_inf)
                continue
            params, grads, exp_avgs, exp_avg_sqs, state_steps = lists[:5]
            beta1, beta2 = group["betas"]
            adopt(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                state_steps,
                foreach=group["foreach"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                fused=group["fused"],
                grad_scale=grad_scale,
                found_inf=found_inf,
                has_complex=has_complex,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                clip_lambda=self.clip_lambda,
                weight_decay=group["weight_decay"],
                decouple=group["decouple"],
                eps=group["eps"],
                maximize=group["maximize"],
                stochastic_rounding=group["stochastic_rounding"],
                seeds=lists[5] if group["stochastic_rounding"] else None,
                nesterov=group["nesterov"],
                caution=group["caution"],
                corrected_weight_decay=group["corrected_weight_decay"],
                lr_max=group["lr_max"],
            )
        return loss

    def _low_precision_step(
        self, group: dict[str, Any], fmt: str, lists: list[Any], grad_scale: Optional[Tensor],
        found_inf: Optional[Tensor],
    ) -> None:
        """One group's tensors with state stored as ``fmt`` ("bf16" or "8bit")."""
        params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps, seeds = lists
        if group["fused"]:
            path = "fused"
        elif group["foreach"] is not None:
            path = "foreach" if group["foreach"] else "single"
        else:
            path = default_path(params, False, group["lr"], group["capturable"])
            if path == "fused" and not fused_state_available(params):
                path = "foreach"
        beta1, beta2 = group["betas"]
        state_adopt(
            params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps, seeds,
            grad_scale if path == "fused" else None, found_inf if path == "fused" else None,
            fmt=fmt, path=path, beta1=beta1, beta2=beta2, lr=group["lr"], clip_lambda=self.clip_lambda,
            weight_decay=group["weight_decay"], decouple=group["decouple"], eps=group["eps"],
            maximize=group["maximize"], capturable=group["capturable"],
            stochastic_rounding=group["stochastic_rounding"], nesterov=group["nesterov"], caution=group["caution"],
            lr_max=group["lr_max"] if group["corrected_weight_decay"] else None, checked=True,
        )


def _offset_name(name: Callable[[int], str], offset: int, i: int) -> str:
    return name(offset + i)


def _step_device(group: dict[str, Any], p: Tensor) -> torch.device:
    """Where a parameter's step counter lives: on its device where the kernel reads it there
    (capturable, fused, and the automatic choice of the fused path for CUDA parameters),
    else on the CPU."""
    auto = group["fused"] is None and group["foreach"] is None and not group["differentiable"]
    on_device = group["capturable"] or group["fused"] or (auto and p.is_cuda and fused_cuda_available())
    return p.device if on_device else torch.device("cpu")


def _graph_capture_health_check(optimizer: Optimizer) -> None:
    """torch's check that capturable is on when a CUDA graph is being captured (renamed in 2.8)."""
    check = getattr(optimizer, "_accelerator_graph_capture_health_check", None)
    (check or optimizer._cuda_graph_capture_health_check)()


def _validate_hyperparameters(
    lr: Union[float, Tensor],
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    *,
    foreach: Optional[bool],
    capturable: bool,
) -> None:
    """Raise ValueError naming the argument and its value for anything out of range.

    Where ``torch.optim.Adam`` rejects the same value, the check runs in Adam's order and the
    message begins with Adam's words (PyTorch's optimizer tests match them); the detail
    after them is ADOPT's. ADOPT also rejects infinite values and betas as Tensors.
    """
    if isinstance(lr, Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    if not _finite_at_least_zero(lr):
        raise ValueError(f"Invalid learning rate: {lr} (lr must be a finite number >= 0)")
    if not _finite_at_least_zero(eps):
        raise ValueError(f"Invalid epsilon value: {eps} (eps must be a finite number >= 0)")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got betas={betas!r}")
    for i, beta in enumerate(betas):
        value = _number(beta)
        if value is None or not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (betas[{i}] must be in [0, 1))")
    if not _finite_at_least_zero(weight_decay):
        raise ValueError(
            f"Invalid weight_decay value: {weight_decay} (weight_decay must be a finite number >= 0)"
        )
    tensor_betas = [isinstance(beta, Tensor) for beta in betas]
    if any(tensor_betas):
        if not all(tensor_betas):
            raise ValueError(f"betas must be either both floats or both Tensors, got betas={betas!r}")
        if foreach and not capturable:  # Adam's next check, made on betas[0] first
            raise ValueError("betas[0] as a Tensor is not supported for capturable=False and foreach=True")
        raise ValueError(f"ADOPT takes betas as floats, got betas={betas!r}")


def _number(x: object) -> Optional[float]:
    """``x`` as a float if it is a real number or a 1-element tensor, else None."""
    if isinstance(x, Tensor):
        return float(x.detach().reshape(())) if x.numel() == 1 and not x.is_complex() else None
    return float(x) if isinstance(x, (int, float)) else None


def _finite_at_least_zero(x: object) -> bool:
    value = _number(x)
    return value is not None and 0.0 <= value < float("inf")


def _validate_options(group: dict[str, Any], prefix: str = "") -> None:
    """Raise ValueError for a nesterov/caution/corrected_weight_decay that is not a bool, or a
    corrected weight decay that cannot apply (L2 decay, or no positive ``lr_max``)."""
    for key in ("nesterov", "caution", "corrected_weight_decay"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{prefix}{key} must be True or False, got {key}={group[key]!r}")
    if group["corrected_weight_decay"]:
        if not group["decouple"]:
            raise ValueError(
                f"{prefix}corrected_weight_decay=True scales decoupled weight decay: it needs decouple=True"
            )
        try:
            check_lr_max(group["lr_max"])
        except ValueError as exc:
            raise ValueError(
                f"{prefix}{exc} (lr_max is the group's lr when it was added: construct the optimizer with the "
                "peak lr, or set 'lr_max' in the param group)"
            ) from None


def _validate_rounding(stochastic_rounding: object, differentiable: bool) -> None:
    """Raise for a ``stochastic_rounding`` that is not a bool or cannot be honoured."""
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"stochastic_rounding must be True or False, got stochastic_rounding={stochastic_rounding!r}")
    if stochastic_rounding and differentiable:
        raise RuntimeError("stochastic_rounding=True does not support differentiable=True")


def _validate_state_precision(state_precision: object, min_8bit_size: object, differentiable: bool) -> None:
    """Raise for a ``state_precision`` or ``min_8bit_size`` that is not valid or cannot be
    honoured (ValueError naming the value; RuntimeError with ``differentiable``)."""
    if state_precision not in formats.STATE_PRECISIONS:
        raise ValueError(
            f"state_precision must be one of {', '.join(map(repr, formats.STATE_PRECISIONS))}, "
            f"got state_precision={state_precision!r}"
        )
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be an integer >= 0, got min_8bit_size={min_8bit_size!r}")
    if state_precision != "full" and differentiable:
        raise RuntimeError(f"state_precision={state_precision!r} does not support differentiable=True")
