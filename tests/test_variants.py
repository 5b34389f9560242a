"""nesterov, caution and corrected_weight_decay: on every path, against the float64 oracle,
against the single-tensor path, against timm's numbers, and their validation."""

from __future__ import annotations

import copy
import itertools
from typing import Any, Optional

import pytest
import torch

from adopt import ADOPT, PowerClip
from helpers import PATHS, make_problem, real64
from oracle import OracleState, oracle_step, quarter_power
from path_params import path_params, usable_paths

STEPS = 7
# lr per step, as a schedule sets it: corrected weight decay differs from plain only when lr
# moves away from the lr the group was built with.
SCHEDULE = [0.1, 0.1, 0.05, 0.02, 0.08, 0.01, 0.1]
OPTIONS = [
    dict(nesterov=n, caution=c, corrected_weight_decay=w)
    for n, c, w in itertools.product([False, True], repeat=3)
    if n or c or w
]


def _ids(kw: dict[str, bool]) -> str:
    return "+".join(k.split("_")[0] for k, v in kw.items() if v)


def _run(init: list[torch.Tensor], grads: list[list[Optional[torch.Tensor]]], **kw: Any) -> tuple[list[torch.Tensor], ADOPT]:
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = ADOPT(params, **{"lr": SCHEDULE[0], **kw})
    for lr, row in zip(SCHEDULE, grads):
        opt.param_groups[0]["lr"] = lr if not isinstance(opt.param_groups[0]["lr"], torch.Tensor) else (
            opt.param_groups[0]["lr"].fill_(lr))
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
    return [p.detach() for p in params], opt


def _oracle(init: list[torch.Tensor], grads: list[list[Optional[torch.Tensor]]], options: dict[str, bool],
            **hp: Any) -> list[OracleState]:
    states = [OracleState(p) for p in init]
    lr_max = SCHEDULE[0] if options["corrected_weight_decay"] else None
    for lr, row in zip(SCHEDULE, grads):
        for st, g in zip(states, row):
            if g is not None:
                oracle_step(st, g, lr=lr, nesterov=options["nesterov"], caution=options["caution"], lr_max=lr_max,
                            **hp)
    return states


@pytest.mark.parametrize("path", path_params())
@pytest.mark.parametrize(
    "options,decay",
    [(o, d) for o in OPTIONS for d in ("decoupled", "l2-maximize") if d == "decoupled" or not o["corrected_weight_decay"]],
    ids=lambda x: _ids(x) if isinstance(x, dict) else x,
)
def test_float64_matches_oracle(path: str, options: dict[str, bool], decay: str) -> None:
    """Uneven step counts (a tensor joins late, one skips steps) and an lr schedule."""
    decouple = decay == "decoupled"
    init, grads = make_problem(STEPS, seed=5)
    hp = dict(betas=(0.9, 0.5), weight_decay=0.1, decouple=decouple, maximize=not decouple)
    params, _ = _run(init, grads, **hp, **options, **usable_paths()[path])
    states = _oracle(init, grads, options, beta1=0.9, beta2=0.5, eps=1e-6, clip=quarter_power, weight_decay=0.1,
                     decouple=decouple, maximize=not decouple)
    for p, st in zip(params, states):
        torch.testing.assert_close(real64(p), st.p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_paths_agree_with_single_tensor(dtype: torch.dtype, options: dict[str, bool]) -> None:
    """Bit for bit for the torch-op paths (a cautious step's two foreach passes included); the
    fused kernel orders a few roundings differently, so it agrees to a few ulps."""
    init, grads = make_problem(STEPS, dtype=dtype, seed=6)
    kw = dict(betas=(0.9, 0.5), weight_decay=0.01, decouple=True, **options)
    ref, _ = _run(init, grads, **kw, **PATHS["single"])
    eps = torch.finfo(dtype).eps
    for path, path_kw in usable_paths().items():
        got, _ = _run(init, grads, **kw, **path_kw)
        ulps = 8 if "fused" in path else 0
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b, rtol=ulps * eps, atol=ulps * eps, msg=lambda m: f"{path}: {m}")


@pytest.mark.parametrize("path", [p for p in PATHS if p != "foreach"])
def test_corrected_decay_with_tensor_lr(path: str) -> None:
    opt_kw = dict(lr=torch.tensor(SCHEDULE[0], dtype=torch.float64), weight_decay=0.5, decouple=True,
                  corrected_weight_decay=True, caution=True)
    init, grads = make_problem(STEPS, seed=7)
    params, opt = _run(init, grads, **opt_kw, **PATHS[path])
    assert opt.param_groups[0]["lr_max"] == SCHEDULE[0]
    states = _oracle(init, grads, dict(nesterov=False, caution=True, corrected_weight_decay=True), beta1=0.9,
                     beta2=0.9999, eps=1e-6, clip=quarter_power, weight_decay=0.5, decouple=True, maximize=False)
    for p, st in zip(params, states):
        torch.testing.assert_close(real64(p), st.p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", path_params())
def test_caution_keeps_only_agreeing_elements_and_rescales(path: str) -> None:
    """A hand-computed step: m becomes [1, 0, 0, -1] for g = [1, 1, -1, -1]; two of four
    elements agree in sign, so those two move twice as far and the others not at all."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = ADOPT([p], lr=1.0, betas=(0.5, 0.5), clip_lambda=None, caution=True, **usable_paths()[path])
    p.grad = torch.ones(4)
    opt.step()  # v = 1, no update
    opt.state[p]["exp_avg"].copy_(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    p.grad = torch.tensor([1.0, 1.0, -1.0, -1.0])
    opt.step()
    assert torch.equal(opt.state[p]["exp_avg"], torch.tensor([1.0, 0.0, 0.0, -1.0]))
    assert torch.equal(p.detach(), torch.tensor([-2.0, 0.0, 0.0, 2.0]))


@pytest.mark.parametrize("path", path_params())
def test_caution_floor_when_nothing_agrees(path: str) -> None:
    """No element agrees: the update is zero everywhere (the weight is capped at 1 / 1e-3)."""
    p = torch.nn.Parameter(torch.ones(6))
    opt = ADOPT([p], lr=0.1, betas=(0.0, 0.5), caution=True, **usable_paths()[path])
    p.grad = torch.ones(6)
    opt.step()
    opt.state[p]["exp_avg"].fill_(0.0)
    p.grad = torch.zeros(6)  # n = 0, m = 0: sign 0 never agrees
    opt.step()
    assert torch.equal(p.detach(), torch.ones(6))


def test_fused_caution_is_the_same_on_one_and_two_threads() -> None:
    """The per-tensor counts are summed over threads: the result cannot depend on them."""
    pytest.importorskip("adopt._kernels._adopt_cpu")
    results = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            gen = torch.Generator().manual_seed(3)
            params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (200_000, 77, 90_001)]
            opt = ADOPT(params, fused=True, caution=True, nesterov=True)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            results.append([p.detach().clone() for p in params])
        finally:
            torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", [p for p in path_params() if "fused" in p.id])
def test_found_inf_leaves_a_cautious_step_untouched(path: str) -> None:
    p = torch.nn.Parameter(torch.randn(50))
    opt = ADOPT([p], caution=True, nesterov=True, **usable_paths()[path])
    for _ in range(2):
        p.grad = torch.randn(50)
        opt.step()
    before = (p.detach().clone(), copy.deepcopy(opt.state[p]))
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    p.grad = torch.randn(50)
    opt.step()
    assert torch.equal(p.detach(), before[0])
    for key, value in before[1].items():
        assert torch.equal(opt.state[p][key], value), key


def test_gradcheck_through_the_variants() -> None:
    """differentiable=True: autograd runs through Nesterov, the cautious mask (piecewise
    constant) and corrected weight decay (through lr as well)."""

    def run(p0: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, g3: torch.Tensor, lr: torch.Tensor) -> tuple:
        p = p0.clone()
        opt = ADOPT([p], lr=lr, betas=(0.8, 0.7), differentiable=True, weight_decay=0.1, decouple=True,
                    nesterov=True, caution=True, corrected_weight_decay=True)
        opt.param_groups[0]["lr_max"] = 0.3
        for g in (g1, g2, g3):
            p.grad = g
            opt.step()
        return p, opt.state[p]["exp_avg"]

    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(4)]
    inputs.append(torch.tensor(0.1, dtype=torch.float64))
    for t in inputs:
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(run, tuple(inputs))


@pytest.mark.parametrize("path", path_params())
def test_bf16_stochastic_rounding_with_the_variants(path: str) -> None:
    """The variants' update is what stochastic rounding writes back; the torch-op paths agree
    bit for bit, the fused kernel (float32 arithmetic throughout) to a few ulps: an ulp apart
    at one step (test_stochastic_rounding's one-step test), the two then round later steps
    from different values, so over STEPS steps their gap can grow by an ulp or two."""
    init, grads = make_problem(STEPS, dtype=torch.bfloat16, seed=9)
    kw = dict(weight_decay=0.1, decouple=True, nesterov=True, caution=True, stochastic_rounding=True)
    ref, _ = _run(init, grads, **kw, foreach=False)
    got, _ = _run(init, grads, **kw, **usable_paths()[path])
    for a, b in zip(ref, got):
        if "fused" in path:
            torch.testing.assert_close(a, b, rtol=2 ** -5, atol=1e-6)  # 4 to 8 bfloat16 ulps
        else:
            assert torch.equal(a, b)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("key", ["nesterov", "caution", "corrected_weight_decay"])
def test_non_bool_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match=rf"{key} must be True or False, got {key}=1"):
        ADOPT([torch.nn.Parameter(torch.zeros(2))], decouple=True, **{key: 1})


def test_corrected_weight_decay_needs_decoupled_decay_and_a_positive_lr_max() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="needs decouple=True"):
        ADOPT([p], weight_decay=0.1, corrected_weight_decay=True)
    with pytest.raises(ValueError, match=r"lr_max=0\.0 .*construct the optimizer with the peak lr"):
        ADOPT([p], lr=0.0, decouple=True, corrected_weight_decay=True)
    with pytest.raises(ValueError, match=r"lr_max=-1"):
        ADOPT([{"params": [p], "lr_max": -1}], decouple=True, corrected_weight_decay=True)


def test_lr_max_is_each_groups_lr_and_survives_a_state_dict_round_trip() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = ADOPT([{"params": [a]}, {"params": [b], "lr": 0.5}, ], lr=0.1, decouple=True, corrected_weight_decay=True)
    assert [g["lr_max"] for g in opt.param_groups] == [0.1, 0.5]
    c = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [c], "lr": 0.25, "lr_max": 1.0})
    assert opt.param_groups[2]["lr_max"] == 1.0
    saved = opt.state_dict()
    fresh = ADOPT([{"params": [a]}, {"params": [b]}, {"params": [c]}], lr=0.3, decouple=True,
                  corrected_weight_decay=True)
    fresh.load_state_dict(saved)
    assert [g["lr_max"] for g in fresh.param_groups] == [0.1, 0.5, 1.0]


def test_loaded_group_that_cannot_apply_is_refused_and_changes_nothing() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ADOPT([p], decouple=True)
    saved = opt.state_dict()
    saved["param_groups"][0].update(corrected_weight_decay=True, decouple=False)
    before = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=r"loaded state_dict, param_groups\[0\]: corrected_weight_decay=True"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["decouple"] is True and opt.param_groups[0]["corrected_weight_decay"] is False
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in before]


# ---------------------------------------------------------------- timm's numbers


def _timm_adopt() -> type:
    from test_checkpoints import _timm_adopt as load

    return load()


@pytest.mark.parametrize("path", path_params())
@pytest.mark.parametrize("timm_kw", [dict(caution=True), dict(caution=True, weight_decay=0.1, decoupled=True,
                                                                corrected_weight_decay=True)],
                         ids=["caution", "caution-corrected"])
def test_matches_timm(path: str, timm_kw: dict[str, Any]) -> None:
    """timm's ``Adopt`` and ADOPT from the same start on the same gradients, with the lr
    changed between steps, agree (float64, up to rounding order)."""
    adopt_cls = _timm_adopt()
    gen = torch.Generator().manual_seed(0)
    shapes = [(3,), (2, 4), (50,)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(STEPS)]
    ours_kw = dict(caution=True, clip_lambda=PowerClip(0.333), weight_decay=timm_kw.get("weight_decay", 0.0),
                   decouple=timm_kw.get("decoupled", False),
                   corrected_weight_decay=timm_kw.get("corrected_weight_decay", False))
    results = []
    for make in (lambda ps: adopt_cls(ps, lr=SCHEDULE[0], **timm_kw),
                 lambda ps: ADOPT(ps, lr=SCHEDULE[0], **ours_kw, **usable_paths()[path])):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(params)
        for lr, row in zip(SCHEDULE, grads):
            opt.param_groups[0]["lr"] = lr
            for p, g in zip(params, row):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
