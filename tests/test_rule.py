"""Every path against the float64 oracle, and against the single-tensor path."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from adopt import ADOPT, PowerClip
from helpers import PATHS, make_problem, real64, run_adopt, run_oracle
from oracle import quarter_power

STEPS = 7
CLIPS = {"none": (None, None), "const": (lambda s: 0.5, lambda s: 0.5), "default": (PowerClip(0.25), quarter_power)}
DECAYS = {"none": (0.0, False), "l2": (0.1, False), "decoupled": (0.1, True)}

GRID = list(itertools.product([1e-3, 0.1], [0.1, 0.9999], [1e-6, 1e-2], CLIPS, DECAYS, [False, True]))


def _hp(lr, beta2, eps, clip, decay, maximize):
    wd, decouple = DECAYS[decay]
    opt_kw = dict(lr=lr, betas=(0.9, beta2), eps=eps, clip_lambda=CLIPS[clip][0], weight_decay=wd,
                  decouple=decouple, maximize=maximize)
    oracle_kw = dict(lr=lr, beta1=0.9, beta2=beta2, eps=eps, clip=CLIPS[clip][1], weight_decay=wd,
                     decouple=decouple, maximize=maximize)
    return opt_kw, oracle_kw


def _assert_matches_oracle(params, opt, states, rtol, atol):
    for p, st in zip(params, states):
        torch.testing.assert_close(real64(p), st.p, rtol=rtol, atol=atol)
    for group_p, st in zip(opt.param_groups[0]["params"], states):
        state = opt.state[group_p]
        if st.s == 0:
            assert len(state) == 0
            continue
        assert int(state["step"].item()) == st.s
        torch.testing.assert_close(real64(state["exp_avg"]), st.m, rtol=rtol, atol=atol)
        torch.testing.assert_close(real64(state["exp_avg_sq"]), st.v, rtol=rtol, atol=atol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lr,beta2,eps,clip,decay,maximize", GRID)
def test_float64_matches_oracle(path, lr, beta2, eps, clip, decay, maximize):
    opt_kw, oracle_kw = _hp(lr, beta2, eps, clip, decay, maximize)
    init, grads = make_problem(STEPS)
    params, opt = run_adopt(init, grads, **opt_kw, **PATHS[path])
    _assert_matches_oracle(params, opt, run_oracle(init, grads, **oracle_kw), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_updates_real_view(path, dtype):
    opt_kw, oracle_kw = _hp(0.1, 0.5, 1e-6, "default", "decoupled", False)
    init, grads = make_problem(STEPS, dtype=dtype)
    params, opt = run_adopt(init, grads, **opt_kw, **PATHS[path])
    tol = 1e-10 if dtype == torch.complex128 else 2e-5
    _assert_matches_oracle(params, opt, run_oracle(init, grads, **oracle_kw), rtol=tol, atol=tol)


@pytest.mark.parametrize("lr_shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("path", [p for p in PATHS if p != "foreach"])
def test_tensor_lr_any_shape(path, lr_shape):
    opt_kw, oracle_kw = _hp(0.05, 0.9999, 1e-6, "default", "decoupled", False)
    opt_kw["lr"] = torch.full(lr_shape, 0.05, dtype=torch.float64)
    init, grads = make_problem(STEPS)
    params, opt = run_adopt(init, grads, **opt_kw, **PATHS[path])
    _assert_matches_oracle(params, opt, run_oracle(init, grads, **oracle_kw), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", [p for p in PATHS if p != "single"])
def test_paths_agree_with_single_tensor(path, dtype):
    """Per tensor, uneven step counts included: bit for bit for the torch-op paths; the fused
    kernel orders a few roundings differently, so it agrees to a few ulps."""
    init, grads = make_problem(STEPS, dtype=dtype, seed=3)
    kw = dict(lr=0.1, betas=(0.9, 0.5), weight_decay=0.01, decouple=True)
    ref, ref_opt = run_adopt(init, grads, **kw, **PATHS["single"])
    got, got_opt = run_adopt(init, grads, **kw, **PATHS[path])
    ulps = 0 if "fused" not in path else 8
    tol = dict(rtol=ulps * torch.finfo(dtype).eps, atol=ulps * torch.finfo(dtype).eps)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, **tol)
    for pa, pb in zip(ref_opt.param_groups[0]["params"], got_opt.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(ref_opt.state[pa][key].cpu(), got_opt.state[pb][key].cpu(), **tol)


def test_float32_matches_oracle():
    opt_kw, oracle_kw = _hp(0.01, 0.9999, 1e-6, "default", "l2", False)
    init, grads = make_problem(STEPS, dtype=torch.float32)
    for path in PATHS:
        params, opt = run_adopt(init, grads, **opt_kw, **PATHS[path])
        _assert_matches_oracle(params, opt, run_oracle(init, grads, **oracle_kw), rtol=1e-5, atol=1e-5)


def test_first_step_only_initialises_second_moment():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = ADOPT([p], lr=1.0, weight_decay=0.5, decouple=True)
    p.grad = torch.tensor([3.0, 0.5])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0]))
    assert torch.equal(opt.state[p]["exp_avg_sq"], torch.tensor([9.0, 0.25]))
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(2))


def test_default_clip_is_one_at_first_real_update():
    """With v = g0² and g1 = 100·g0 the normalised gradient is 100, clipped to c(1) = 1."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = ADOPT([p], lr=1.0, betas=(0.0, 0.5))
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    p.grad = torch.full((1,), 100.0, dtype=torch.float64)
    opt.step()
    assert p.item() == -1.0
    p.grad = torch.full((1,), 1e6, dtype=torch.float64)
    opt.step()
    assert p.item() == pytest.approx(-1.0 - math.pow(2, 0.25))


def test_grad_is_never_modified():
    for path in PATHS.values():
        p = torch.nn.Parameter(torch.randn(4))
        opt = ADOPT([p], weight_decay=0.1, maximize=True, **path)
        g = torch.randn(4)
        for _ in range(3):
            p.grad = g.clone()
            opt.step()
            assert torch.equal(p.grad, g)
