"""ADOPT.step()'s one-call CPU path (``_fused.fused_cpu_step`` / ``step_groups`` in C).

In the steady state of CPU training the whole step is one C call that gathers each group's
gradients and state itself. These tests check that it is taken when it should be, that it
declines (changing nothing) whenever the general path is needed, and that either way the
result is bit for bit the general path's: the reference is the same optimizer with the
one-call path switched off.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
from torch import Tensor

import adopt.optimizer
from adopt import ADOPT, _fused
from adopt.schedules import PowerClip

pytestmark = pytest.mark.skipif(not _fused.fused_cpu_available(), reason="the C kernel was not built")

SIZES = [(3, 5), (7,), (64,), (2, 2, 2)]


class Recorder:
    """Wraps fused_cpu_step as ADOPT.step calls it; records whether each call did the step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, enabled: bool = True) -> None:
        self.taken: list[bool] = []
        self.enabled = enabled
        monkeypatch.setattr(adopt.optimizer, "fused_cpu_step", self)

    def __call__(self, *args: Any) -> bool:
        done = self.enabled and _fused.fused_cpu_step(*args)
        self.taken.append(done)
        return done


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SIZES]


def groups_of(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """Two groups with different hyperparameters, as a model with decay / no-decay groups has."""
    return [
        {"params": params[:2], "weight_decay": 0.1, "decouple": True},
        {"params": params[2:], "lr": 3e-2, "weight_decay": 0.05, "maximize": True},
    ]


def set_grads(params: list[torch.nn.Parameter], step: int, skip: Optional[int] = None) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i == skip else torch.randn(p.shape, generator=gen).to(p.dtype)


def state_of(opt: ADOPT, params: list[torch.nn.Parameter]) -> list[list[Tensor]]:
    return [[p.detach().clone()] + [t.clone() for t in opt.state[p].values()] for p in params]


def assert_identical(a: list[list[Tensor]], b: list[list[Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y))


def run(
    monkeypatch: pytest.MonkeyPatch,
    enabled: bool,
    steps: int = 4,
    between: Optional[Callable[[int, ADOPT, list[torch.nn.Parameter]], None]] = None,
    **kwargs: Any,
) -> tuple[list[list[Tensor]], list[bool]]:
    """``steps`` steps of a two-group optimizer; ``between(step, opt, params)`` runs before each."""
    with monkeypatch.context() as patch:
        recorder = Recorder(patch, enabled)
        params = make_params(kwargs.pop("dtype", torch.float32))
        opt = ADOPT(groups_of(params), **{"lr": 1e-2, **kwargs})
        for step in range(steps):
            set_grads(params, step, skip=1 if step == 2 else None)
            if between is not None:
                between(step, opt, params)
            opt.step()
        return state_of(opt, params), recorder.taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(fused=True), dict(), dict(fused=True, capturable=True)])
def test_one_call_from_the_second_step_and_same_result(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, options: dict[str, Any]
) -> None:
    fast, taken = run(monkeypatch, True, dtype=dtype, **options)
    general, _ = run(monkeypatch, False, dtype=dtype, **options)
    assert taken == [False, True, True, True]  # the first step creates state
    assert_identical(fast, general)


@pytest.mark.parametrize(
    "options",
    [
        dict(fused=True, clip_lambda=lambda s: 2.0 * s**0.5),  # a schedule the kernel cannot evaluate
        dict(foreach=True),
        dict(foreach=False),
    ],
    ids=["custom-clip", "foreach", "single"],
)
def test_other_settings_take_the_general_path(monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]) -> None:
    _, taken = run(monkeypatch, True, **options)
    assert not any(taken)


def test_differentiable_takes_the_general_path() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    opt = ADOPT([p], differentiable=True)
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.ones(3)}
    p.grad = torch.randn(3)
    assert not _fused.fused_cpu_step(opt.param_groups, opt.state, opt.clip_lambda, None, None)
    assert int(opt.state[p]["step"]) == 1


def test_power_clip_none_and_tensor_lr_stay_on_the_one_call_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for options in (dict(clip_lambda=None), dict(clip_lambda=PowerClip(0.5)), dict(lr=torch.tensor(1e-2))):
        fast, taken = run(monkeypatch, True, fused=True, **options)
        general, _ = run(monkeypatch, False, fused=True, **options)
        assert taken == [False, True, True, True], options
        assert_identical(fast, general)


class RefusingKernel:
    """Stands in for the C module; fails the test if step_groups is called."""

    CLIP_NONE, CLIP_POWER, DONE = 0, 2, 0

    def step_groups(self, *args: Any) -> int:
        raise AssertionError("step_groups was called")


@pytest.mark.parametrize("where", ["meta", "complex"])
def test_non_cpu_or_complex_groups_do_not_reach_the_c_call(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Off the CPU (CUDA; here the meta device) or complex, the C call would gather every
    tensor of every step only to decline, so the groups are not handed to it at all."""
    monkeypatch.setattr(_fused, "_CPU_KERNEL", RefusingKernel())
    p = torch.zeros(3, device="meta") if where == "meta" else torch.zeros(3, dtype=torch.complex64)
    cpu = torch.zeros(3)
    groups = [{"params": [cpu], "fused": True, "lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.0, "eps": 1e-6,
               "decouple": False, "maximize": False, "stochastic_rounding": False, "nesterov": False, "caution": False,
               "corrected_weight_decay": False, "lr_max": 1e-3, "state_precision": "full"}, {"params": [p], "fused": True}]
    assert not _fused.fused_cpu_step(groups, {}, PowerClip(0.25), None, None)


def test_complex_params_decline(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    opt = ADOPT([p], fused=True)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    assert recorder.taken == [False, False, False]
    assert int(opt.state[p]["step"]) == 3


def _swap_param_storage(step: int, opt: ADOPT, params: list[torch.nn.Parameter]) -> None:
    if step == 2:
        params[0].data = params[0].data.clone()  # same object, new memory


def _replace_state_tensor(step: int, opt: ADOPT, params: list[torch.nn.Parameter]) -> None:
    if step == 2:
        state = opt.state[params[2]]
        state["exp_avg"] = state["exp_avg"].clone()
        state["exp_avg_sq"].set_(state["exp_avg_sq"].clone())


def _reset_state(step: int, opt: ADOPT, params: list[torch.nn.Parameter]) -> None:
    if step == 2:
        del opt.state[params[3]]


def _non_contiguous_grad(step: int, opt: ADOPT, params: list[torch.nn.Parameter]) -> None:
    if step == 3:
        params[0].grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(7)).t()


def _reverse_state_order(step: int, opt: ADOPT, params: list[torch.nn.Parameter]) -> None:
    if step == 2:  # the one-call path walks the state dict in parameter order first
        entries = list(opt.state.items())
        opt.state.clear()
        opt.state.update(reversed(entries))


def _load_state_dict(step: int, opt: ADOPT, params: list[torch.nn.Parameter]) -> None:
    if step == 2:
        opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    "change",
    [
        _swap_param_storage, _replace_state_tensor, _reset_state, _non_contiguous_grad, _reverse_state_order,
        _load_state_dict,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_changes_between_steps_are_seen(monkeypatch: pytest.MonkeyPatch, change: Callable[..., None]) -> None:
    """New memory behind the same tensor object, new state tensors, state removed, grads the
    kernel cannot read in place: every later step still equals the general path's."""
    fast, taken = run(monkeypatch, True, steps=5, between=change, fused=True)
    general, _ = run(monkeypatch, False, steps=5, between=change, fused=True)
    assert taken[1] and taken[4]
    assert_identical(fast, general)


def test_declined_in_one_group_runs_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sparse gradient in the second group: the one-call path could run the first group but
    declines the whole step, and the general path reports the error before any update."""
    recorder = Recorder(monkeypatch)
    params = make_params()
    opt = ADOPT(groups_of(params), lr=1e-2, fused=True)
    for step in range(2):
        set_grads(params, step)
        opt.step()
    set_grads(params, 2)
    params[3].grad = params[3].grad.to_sparse()  # type: ignore[union-attr]
    before = state_of(opt, params)
    with pytest.raises(RuntimeError, match=r"SparseAdam instead: param_groups\[1\]\['params'\]\[1\]"):
        opt.step()
    assert_identical(state_of(opt, params), before)
    assert recorder.taken == [False, True, False]


def test_state_of_the_wrong_shape_is_refused_at_load() -> None:
    params = make_params()
    opt = ADOPT(groups_of(params), fused=True)
    set_grads(params, 0)
    opt.step()
    other = [torch.nn.Parameter(torch.zeros(s)) for s in [(3, 5), (7,), (63,), (2, 2, 2)]]
    donor = ADOPT(groups_of(other))
    for p in other:
        p.grad = torch.ones_like(p)
    donor.step()
    donor.param_groups[1]["lr"] = 0.5
    before = state_of(opt, params)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\]: its exp_avg has shape \(63,\)"):
        opt.load_state_dict(donor.state_dict())
    assert_identical(state_of(opt, params), before)
    assert opt.param_groups[1]["lr"] == 3e-2
    set_grads(params, 1)
    opt.step()  # the optimizer it was before still steps
    assert int(opt.state[params[2]]["step"]) == 2


def test_found_inf_skips_every_group(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch)
    params = make_params()
    opt = ADOPT(groups_of(params), fused=True)
    set_grads(params, 0)
    opt.step()
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)  # as GradScaler sets them
    before = state_of(opt, params)
    opt.step()
    assert recorder.taken == [False, True]
    assert_identical(state_of(opt, params), before)


def test_grad_scale_on_the_one_call_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scaled grads with grad_scale give exactly the step of the unscaled grads (a power of 2)."""

    def scaled(step: int, opt: ADOPT, params: list[torch.nn.Parameter]) -> None:
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(1024.0)

    fast, taken = run(monkeypatch, True, between=scaled, fused=True)
    plain, _ = run(monkeypatch, False, fused=True)
    assert taken == [False, True, True, True]
    assert_identical(fast, plain)
