"""Checkpoints of the other ADOPT implementations load into :class:`adopt.ADOPT` and continue.

The state_dicts built here follow the peers' layouts (checked against timm 1.0.31 and
pytorch-optimizer 4.1.0, whose real optimizers are run at the end where installed):

* timm ``Adopt``: state per parameter ``{"step": 0-d float tensor, "exp_avg", "exp_avg_sq"}``;
  group keys ``lr, betas, eps, weight_decay, clip_exp, decoupled, corrected_weight_decay,
  max_lr_snapshot, caution, maximize, foreach, capturable, differentiable, params``. Its
  clip at the ``s``-th earlier step is ``s ** clip_exp``.
* pytorch_optimizer ``ADOPT``: state per parameter ``{"exp_avg", "exp_avg_sq"}`` only; group
  keys ``lr, betas, weight_decay, weight_decouple, fixed_decay, foreach, eps, step, params``
  (``step``: the group's int step count; optional ``cautious``/``stable_adamw`` from its
  kwargs). Its clip is ``clip_lambda(s + 1)``.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import sys
import types
import warnings
from typing import Any, Callable, Optional

import pytest
import torch

from adopt import ADOPT, DEFAULT_CLIP, PowerClip
from helpers import make_problem, real64, run_oracle
from oracle import OracleState, oracle_step

LR, BETAS, EPS, WD = 0.02, (0.9, 0.999), 1e-6, 0.01


def _oracle_hp(clip: Optional[Callable[[int], float]], decouple: bool) -> dict[str, Any]:
    return dict(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, clip=clip, weight_decay=WD, decouple=decouple,
                maximize=False)


def _timm_group(**overrides: Any) -> dict[str, Any]:
    group = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, clip_exp=0.333, decoupled=True,
                 corrected_weight_decay=False, max_lr_snapshot=LR, caution=False, maximize=False, foreach=None,
                 capturable=False, differentiable=False, params=[0, 1, 2, 3])
    group.update(overrides)
    return group


def _po_group(step: int, **overrides: Any) -> dict[str, Any]:
    group = dict(lr=LR, betas=BETAS, weight_decay=WD, weight_decouple=True, fixed_decay=False, foreach=None,
                 eps=EPS, step=step, params=[0, 1, 2, 3])
    group.update(overrides)
    return group


def _state(states: list[OracleState], with_step: bool) -> dict[int, dict[str, Any]]:
    return {
        i: {**({"step": torch.tensor(float(st.s))} if with_step else {}), "exp_avg": st.m.clone(),
            "exp_avg_sq": st.v.clone()}
        for i, st in enumerate(states)
    }


def _continue_and_compare(opt: ADOPT, params: list[torch.nn.Parameter], states: list[OracleState],
                          grads: list[list[Optional[torch.Tensor]]], hp: dict[str, Any]) -> None:
    for row in grads:
        for p, st, g in zip(params, states, row):
            p.grad = None if g is None else g.clone()
            if g is not None:
                oracle_step(st, g, **hp)
        opt.step()
    for p, st in zip(params, states):
        torch.testing.assert_close(real64(p), st.p, rtol=1e-12, atol=1e-14)


def _snapshot(opt: ADOPT) -> tuple[Any, ...]:
    return (copy.deepcopy(opt.param_groups), copy.deepcopy(dict(opt.state)), opt.clip_lambda)


def _assert_untouched(opt: ADOPT, before: tuple[Any, ...]) -> None:
    groups, state, clip = before
    assert opt.clip_lambda is clip
    assert len(opt.param_groups) == len(groups)
    for got, want in zip(opt.param_groups, groups):
        assert got.keys() == want.keys()
        assert all(torch.equal(a, b) for a, b in zip(got["params"], want["params"]))
        assert {k: v for k, v in got.items() if k != "params"} == {k: v for k, v in want.items() if k != "params"}
    assert len(opt.state) == len(state)
    for (_, got_state), (_, want_state) in zip(opt.state.items(), state.items()):
        assert got_state.keys() == want_state.keys()
        assert all(torch.equal(got_state[k], want_state[k]) for k in got_state)


# ---------------------------------------------------------------- timm's layout

@pytest.mark.parametrize("decoupled", [True, False])
def test_timm_checkpoint_keeps_its_decay_and_clip(decoupled: bool) -> None:
    """timm's decoupled and clip_exp are honoured: ADOPT continues as the rule with them,
    whatever it was constructed with (decouple was once reset to False, the clip ignored)."""
    init, grads = make_problem(9, seed=3)
    hp = _oracle_hp(lambda s: s ** 0.333, decoupled)
    states = run_oracle(init, grads[:5], **hp)
    checkpoint = {"state": _state(states, with_step=True), "param_groups": [_timm_group(decoupled=decoupled)]}
    saved = copy.deepcopy(checkpoint)
    params = [torch.nn.Parameter(st.p.clone()) for st in states]
    opt = ADOPT(params, decouple=not decoupled)
    opt.load_state_dict(checkpoint)
    group = opt.param_groups[0]
    assert group["decouple"] is decoupled and opt.clip_lambda == PowerClip(0.333)
    for key in ("decoupled", "clip_exp", "max_lr_snapshot"):
        assert key not in group
    assert group["caution"] is False and group["corrected_weight_decay"] is False and group["lr_max"] == LR
    assert checkpoint["param_groups"] == saved["param_groups"]  # the caller's dict is not rewritten
    assert checkpoint["state"][0].keys() == saved["state"][0].keys()
    _continue_and_compare(opt, params, states, grads[5:], hp)


def test_timm_clip_exp_none_means_no_clip() -> None:
    opt = ADOPT([torch.nn.Parameter(torch.zeros(3)) for _ in range(4)])
    opt.load_state_dict({"state": {}, "param_groups": [_timm_group(clip_exp=None)]})
    assert opt.clip_lambda is None


def test_clip_exp_that_differs_between_groups_is_refused() -> None:
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    opt = ADOPT([{"params": params[:2]}, {"params": params[2:]}])
    before = _snapshot(opt)
    groups = [_timm_group(clip_exp=0.25, params=[0, 1]), _timm_group(clip_exp=0.5, params=[2, 3])]
    with pytest.raises(ValueError, match=r"clip_exp differs between param groups \(param_groups\[0\]: 0.25, "
                                         r"param_groups\[1\]: 0.5, of 2 groups\)"):
        opt.load_state_dict({"state": {}, "param_groups": groups})
    _assert_untouched(opt, before)


# ---------------------------------------------------------------- pytorch_optimizer's layout

def test_pytorch_optimizer_checkpoint_gets_per_parameter_steps() -> None:
    """A group step count and no per-parameter step: each parameter's state gets the group's
    count (as a float32 tensor); weight_decouple is decouple; the clip stays ADOPT's own, here
    set to pytorch_optimizer's one-step-later clip so that the run continues as it would."""
    init, grads = make_problem(9, seed=4)
    grads = [[g if g is not None else torch.zeros_like(init[i]) for i, g in enumerate(row)] for row in grads]
    hp = _oracle_hp(lambda s: (s + 1) ** 0.25, decouple=True)
    states = run_oracle(init, grads[:5], **hp)
    checkpoint = {"state": _state(states, with_step=False), "param_groups": [_po_group(step=5)]}
    params = [torch.nn.Parameter(st.p.clone()) for st in states]
    shifted = lambda s: (s + 1) ** 0.25  # noqa: E731
    opt = ADOPT(params, clip_lambda=shifted)
    opt.load_state_dict(checkpoint)
    assert opt.clip_lambda is shifted and opt.param_groups[0]["decouple"] is True
    assert not {"weight_decouple", "fixed_decay", "step"} & opt.param_groups[0].keys()
    for p in params:
        step = opt.state[p]["step"]
        assert step.dtype == torch.float32 and step.dim() == 0 and step.item() == 5.0
    _continue_and_compare(opt, params, states, grads[5:], hp)


# ---------------------------------------------------------------- every layout

@pytest.mark.parametrize(
    ("key", "constructed"),
    [("decouple", True), ("decouple", False), ("maximize", True), ("fused", False), ("capturable", True)],
)
def test_missing_setting_takes_the_constructed_value(key: str, constructed: bool) -> None:
    """A saved group without one of ADOPT's settings (the peers lack decouple, fused, maximize
    or capturable) keeps the value the optimizer was built with, not the hard default."""
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    opt = ADOPT(params, **{key: constructed})
    group = _timm_group()
    for name in (key, "decoupled"):
        group.pop(name, None)
    opt.load_state_dict({"state": {}, "param_groups": [group]})
    assert opt.param_groups[0][key] is constructed


@pytest.mark.parametrize(
    ("key", "layout"),
    [("fixed_decay", "po"), ("stable_adamw", "po")],
)
def test_setting_adopt_cannot_honour_is_refused_and_changes_nothing(key: str, layout: str) -> None:
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    opt = ADOPT(params, clip_lambda=PowerClip(0.5))
    for p in params:
        p.grad = torch.randn(3)
    opt.step()
    before = _snapshot(opt)
    group = _timm_group(**{key: True}) if layout == "timm" else _po_group(step=3, **{key: True})
    state = {i: {"step": torch.tensor(3.0), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)} for i in range(4)}
    with pytest.raises(ValueError, match=rf"param_groups\[0\] has {key}=True \(.*\), which ADOPT does not support"):
        opt.load_state_dict({"state": state, "param_groups": [group]})
    _assert_untouched(opt, before)


@pytest.mark.parametrize("key", ["fixed_decay", "stable_adamw"])
def test_setting_adopt_does_not_have_is_dropped_when_off(key: str) -> None:
    opt = ADOPT([torch.nn.Parameter(torch.zeros(3)) for _ in range(4)])
    opt.load_state_dict({"state": {}, "param_groups": [_timm_group(**{key: False})]})
    assert key not in opt.param_groups[0]


def test_timm_caution_and_corrected_decay_are_honoured() -> None:
    """timm's caution and corrected_weight_decay (relative to its max_lr_snapshot) continue as
    the rule with them, though ADOPT was built without either."""
    init, grads = make_problem(9, seed=4)
    hp = {**_oracle_hp(lambda s: s ** 0.333, True), "caution": True, "lr_max": 4 * LR}
    states = run_oracle(init, grads[:5], **hp)
    group = _timm_group(caution=True, corrected_weight_decay=True, max_lr_snapshot=4 * LR)
    params = [torch.nn.Parameter(st.p.clone()) for st in states]
    opt = ADOPT(params, lr=LR, weight_decay=WD, decouple=True)
    opt.load_state_dict({"state": _state(states, with_step=True), "param_groups": [group]})
    loaded = opt.param_groups[0]
    assert loaded["caution"] and loaded["corrected_weight_decay"] and loaded["lr_max"] == 4 * LR
    _continue_and_compare(opt, params, states, grads[5:], hp)


def test_pytorch_optimizer_cautious_becomes_caution_with_a_warning() -> None:
    opt = ADOPT([torch.nn.Parameter(torch.zeros(3)) for _ in range(4)])
    with pytest.warns(UserWarning, match=r"param_groups\[0\] has cautious=True: pytorch_optimizer rescales"):
        opt.load_state_dict({"state": {}, "param_groups": [_po_group(step=0, cautious=True)]})
    assert opt.param_groups[0]["caution"] is True
    opt.load_state_dict({"state": {}, "param_groups": [_po_group(step=0, cautious=False)]})  # no warning when off
    assert opt.param_groups[0]["caution"] is False


def test_conflicting_synonyms_are_refused() -> None:
    opt = ADOPT([torch.nn.Parameter(torch.zeros(3)) for _ in range(4)])
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has decouple=False but decoupled=True"):
        opt.load_state_dict({"state": {}, "param_groups": [_timm_group(decouple=False)]})
    _assert_untouched(opt, before)


def test_unknown_setting_warns_and_known_bookkeeping_does_not() -> None:
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    opt = ADOPT([{"params": params, "name": "backbone"}])
    saved = {**opt.state_dict()["param_groups"][0], "initial_lr": 1e-3, "name": "encoder"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user's own key and a scheduler's: no warning
        opt.load_state_dict({"state": {}, "param_groups": [saved]})
    assert opt.param_groups[0]["name"] == "encoder" and opt.param_groups[0]["initial_lr"] == 1e-3
    with pytest.warns(UserWarning, match=r"param_groups\[0\] has amsgrad=True, a setting ADOPT does not have"):
        opt.load_state_dict({"state": {}, "param_groups": [{**saved, "amsgrad": True}]})


def test_state_without_a_step_is_refused_and_changes_nothing() -> None:
    """pytorch_optimizer's per-parameter layout without its group step: nothing to count from."""
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    opt = ADOPT(params)
    before = _snapshot(opt)
    group = _po_group(step=2)
    del group["step"]
    state = {i: {"exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)} for i in range(4)}
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: it has no step"):
        opt.load_state_dict({"state": state, "param_groups": [group]})
    _assert_untouched(opt, before)


@pytest.mark.parametrize(
    "step", [3, 3.0, torch.tensor(3.0, dtype=torch.float64), torch.tensor([3.0]), torch.tensor(3, dtype=torch.int64)],
    ids=["int", "float", "float64", "shape-1", "int64"],
)
@pytest.mark.parametrize("kw", [dict(), dict(foreach=True), dict(fused=True, capturable=True)], ids=["auto", "foreach", "fused"])
def test_saved_steps_of_any_kind_become_float32_scalars(step: Any, kw: dict[str, Any]) -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = ADOPT([p], **kw)
    group = {**opt.state_dict()["param_groups"][0]}
    opt.load_state_dict({"state": {0: {"step": step, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.ones(3)}},
                         "param_groups": [group]})
    loaded = opt.state[p]["step"]
    assert loaded.dtype == torch.float32 and loaded.dim() == 0 and loaded.item() == 3.0
    p.grad = torch.ones(3)
    opt.step()
    assert opt.state[p]["step"].item() == 4.0 and not torch.equal(p.detach(), torch.ones(3))


def test_default_clip_unchanged_when_checkpoint_has_none() -> None:
    opt = ADOPT([torch.nn.Parameter(torch.zeros(3)) for _ in range(4)])
    opt.load_state_dict({"state": {}, "param_groups": [_po_group(step=0)]})
    assert opt.clip_lambda is DEFAULT_CLIP


# ---------------------------------------------------------------- the real packages

def _timm_adopt() -> type:
    """timm's ``Adopt`` class from its source file, loaded without timm's package ``__init__``:
    that imports torchvision, which may not match the installed torch (the optimizer module
    needs only torch). Skips where timm is not installed."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    name = "_timm_optim_for_tests"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [f"{spec.submodule_search_locations[0]}/optim"]
        sys.modules[name] = package
    try:
        return importlib.import_module(f"{name}.adopt").Adopt  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"timm's optim/adopt.py is not loadable on its own here: {exc}")


def _train_real(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for row in grads:
        for p, g in zip(params, row):
            p.grad = g.clone()
        opt.step()


def _real_run(make_peer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
              make_ours: Callable[[list[torch.nn.Parameter]], ADOPT], lr_after: Optional[float] = None) -> None:
    """The peer trains 4 steps; its state_dict (deep-copied: load_state_dict shares tensors
    that need no cast) goes into ADOPT; both take 5 more steps (at ``lr_after``, as a schedule
    would set it, if given) and must agree."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3,), (2, 4), (5,)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(9)]
    peer_params = [torch.nn.Parameter(t.clone()) for t in init]
    peer = make_peer(peer_params)
    _train_real(peer, peer_params, grads[:4])
    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in peer_params]
    ours = make_ours(ours_params)
    ours.load_state_dict(copy.deepcopy(peer.state_dict()))
    if lr_after is not None:
        for opt in (peer, ours):
            opt.param_groups[0]["lr"] = lr_after
    _train_real(peer, peer_params, grads[4:])
    _train_real(ours, ours_params, grads[4:])
    for a, b in zip(peer_params, ours_params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "kw", [dict(), dict(weight_decay=0.1, decoupled=True), dict(weight_decay=0.1), dict(clip_exp=None),
           dict(clip_exp=0.25, foreach=True), dict(caution=True), dict(caution=True, foreach=True),
           dict(weight_decay=0.1, decoupled=True, corrected_weight_decay=True)],
    ids=["defaults", "decoupled", "l2", "no-clip", "clip-0.25", "caution", "caution-foreach", "corrected"],
)
def test_real_timm_checkpoint_continues_as_timm(kw: dict[str, Any]) -> None:
    """Each with the lr lowered after the load (where corrected weight decay differs)."""
    adopt_cls = _timm_adopt()
    _real_run(lambda ps: adopt_cls(ps, lr=1e-2, **kw), lambda ps: ADOPT(ps, lr=1e-2), lr_after=3e-3)


@pytest.mark.parametrize(
    "kw", [dict(), dict(weight_decay=0.1, weight_decouple=True), dict(weight_decay=0.1), dict(foreach=False)],
    ids=["defaults", "decoupled", "l2", "per-param"],
)
def test_real_pytorch_optimizer_checkpoint_continues_as_pytorch_optimizer(kw: dict[str, Any]) -> None:
    """With ADOPT built with pytorch_optimizer's one-step-later clip, ``(s + 1) ** 0.25``."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    _real_run(lambda ps: pytorch_optimizer.ADOPT(ps, lr=1e-2, **kw),
              lambda ps: ADOPT(ps, lr=1e-2, clip_lambda=lambda s: math.pow(s + 1, 0.25)))
