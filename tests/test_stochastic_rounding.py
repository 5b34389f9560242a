"""stochastic_rounding=True: the counter-based random bits, the rounding rule, the write-back
of bfloat16/float16 parameters on every path, checkpoints, and the stall it prevents."""

from __future__ import annotations

import functools
import inspect
import io
import math
import random
from typing import Any

import pytest
import torch

import adopt
from adopt import ADOPT, _random
from adopt._fused import _cpu_kernel
from helpers import PATHS as ALL_PATHS

KERNEL = _cpu_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the C extension is not built")

LOW = (torch.bfloat16, torch.float16)
# The paths of helpers.PATHS but fused-capturable (the same C kernel as fused on the CPU).
PATHS: dict[str, dict[str, Any]] = {k: v for k, v in ALL_PATHS.items() if k != "fused-capturable"}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, with every NaN as one pattern (paths may produce different NaN payloads)."""
    raw = t.view(torch.int16).to(torch.int32)
    return torch.where(torch.isnan(t), -1, raw)


# ---- the rule -------------------------------------------------------------------------


def _mix32_reference(x: int) -> int:
    """lowbias32 written out with explicit wrapping, independent of _random's formulation."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    return x ^ (x >> 16)


def test_mix32_matches_the_reference_on_ints_and_tensors() -> None:
    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + [random.Random(0).randrange(2**32) for _ in range(200)]
    expected = [_mix32_reference(x) for x in xs]
    assert [_random.mix32(x) for x in xs] == expected
    assert _random.mix32(torch.tensor(xs, dtype=torch.int64)).tolist() == expected


def test_host_and_device_keys_agree() -> None:
    for seed, step in ((0, 0), (12345, 1), (2**40 + 7, 99999), (-5, 3)):
        host = _random.step_key(seed, step)
        device = _random.step_key(torch.tensor(seed), torch.tensor(float(step)).to(torch.int64))
        assert host == int(device)


def _word_reference(key: int, pair: int) -> int:
    return _mix32_reference(((pair % 2**32) * 0x9E3779B9 % 2**32) ^ key ^ _mix32_reference(pair >> 32))


def test_two_elements_share_a_word_low_half_first() -> None:
    key = _random.step_key(_random.param_seed(2), 4)
    expected = []
    for pair in range(4):
        word = _word_reference(key, pair)
        expected += [word & 0xFFFF, word >> 16]
    draws = _random.element_draws(key, 0, 8, torch.device("cpu"))
    assert draws.tolist() == expected
    for start, count in ((1, 1), (3, 5), (2, 3), (7, 1)):  # odd starts and ends
        assert _random.element_draws(key, start, count, torch.device("cpu")).tolist() == expected[start : start + count]


def test_element_draws_fold_in_the_high_pair_part() -> None:
    key = _random.step_key(_random.param_seed(3), 10)
    low = _random.element_draws(key, 5, 1, torch.device("cpu"))
    high = _random.element_draws(key, 5 + 2**33, 1, torch.device("cpu"))  # pair 2 + 2**32
    assert int(low) != int(high)  # the same low 32 bits of the pair index, another word
    assert int(high) == _word_reference(key, 2 + 2**32) >> 16  # odd: the high half
    assert int(low) == _word_reference(key, 2) >> 16


def test_draws_are_uniform() -> None:
    draws = _random.element_draws(_random.step_key(7, 1), 0, 1 << 17, torch.device("cpu"))
    assert 0 <= int(draws.min()) and int(draws.max()) < 2**16
    for shift in (0, 4, 8, 12, 15):
        frac = ((draws >> shift) & 1).double().mean().item()
        assert abs(frac - 0.5) < 0.01, (shift, frac)
    even, odd = draws[0::2].double(), draws[1::2].double()  # the two halves of one word
    assert abs(torch.corrcoef(torch.stack([even, odd]))[0, 1].item()) < 0.02


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("value", [1.0 + 1e-4, -1.0 - 3e-4, 3e-7, -4.1e-6, 6.0e-5, 1234.56, 1e-30])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype: torch.dtype, value: float) -> None:
    n = 1 << 18
    x = torch.full((n,), value)
    out = _random.stochastic_round(x, _random.element_draws(99, 0, n, x.device), dtype)
    down = x.to(dtype).double()[0].item()
    values = set(out.double().unique().tolist())
    assert len(values) <= 2 and all(math.isclose(v, down) or v != down for v in values)
    mean = out.double().mean().item()
    ulp = max(abs(v - down) for v in values | {down}) or 1.0
    assert abs(mean - value) < 0.01 * ulp + 1e-45, (mean, value)


@pytest.mark.parametrize("dtype", LOW)
def test_representable_values_and_specials_are_kept(dtype: torch.dtype) -> None:
    exact = torch.randn(4096).to(dtype)
    draws = _random.element_draws(5, 0, exact.numel(), exact.device)
    assert torch.equal(_random.stochastic_round(exact.float(), draws, dtype), exact)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    out = _random.stochastic_round(special, draws[:5], dtype)
    assert out[0] == float("inf") and out[1] == -float("inf") and torch.isnan(out[2])
    assert torch.equal(out[3:].view(torch.int16), special[3:].to(dtype).view(torch.int16))


@needs_kernel
def test_the_c_kernel_draws_and_rounds_as_the_rule() -> None:
    rng = random.Random(1)
    for _ in range(500):
        seed, step = rng.randrange(-2**40, 2**40), rng.randrange(2**24)
        index = rng.choice([rng.randrange(2**20), rng.randrange(2**40)])
        key = _random.step_key(seed, step)
        assert KERNEL.random_draw(seed, step, index) == int(_random.element_draws(key, index, 1, torch.device("cpu")))
    values = torch.randn(6000) * torch.logspace(-30, 30, 6000)
    values = torch.cat([values, torch.tensor([65519.0, 65520.0, 65535.9, 1e-8, -3e-6, 6.1e-5, float("inf")])])
    draws = torch.randint(0, 2**16, (values.numel(),), dtype=torch.int64)
    for half, dtype in ((False, torch.bfloat16), (True, torch.float16)):
        expected = _random.stochastic_round(values, draws, dtype).view(torch.int16).to(torch.int64) & 0xFFFF
        got = [KERNEL.round_stochastic(float(v), int(w), half) for v, w in zip(values.tolist(), draws.tolist())]
        assert got == expected.tolist(), dtype


# ---- the optimizer -------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.complex32])
@pytest.mark.parametrize("path", list(PATHS))
def test_updates_below_half_an_ulp_are_not_lost(dtype: torch.dtype, path: str) -> None:
    """The stall: 1.0 with lr=1e-4 does not move under round-to-nearest; with stochastic
    rounding its mean follows the exact update sum lr * sum(m_t) within 2 %."""
    if path == "fused" and dtype == torch.complex32:
        pytest.skip("fused=True does not take complex32")
    n, steps, lr = 8192, 1000, 1e-4
    moved = {}
    for rounding in (False, True):
        p = torch.nn.Parameter(torch.ones(n, dtype=dtype))
        opt = ADOPT([p], lr=lr, stochastic_rounding=rounding, **PATHS[path])
        expected = 0.0
        for t in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
            if t > 0:  # an update step: the parameter moved by lr * m (m as stored)
                expected += lr * _real(opt.state[p]["exp_avg"])[0].item()
        values = _real(p.detach())
        moved[rounding] = 1.0 - values.mean().item()
        if rounding:
            assert abs(moved[rounding] - expected) < 0.02 * expected, (moved[rounding], expected)
    assert moved[False] == 0.0
    assert expected > 0.09


def _real(t: torch.Tensor) -> torch.Tensor:
    """The real parts, flattened, as float64."""
    return (torch.view_as_real(t)[..., 0] if t.is_complex() else t).flatten().double()


def _run(kwargs: dict[str, Any], dtype: torch.dtype, steps: int = 8, **hyper: Any) -> list[torch.Tensor]:
    """Three tensors (one joins late, so steps differ), gradients of +-1 so that every path's
    moments are exact and the rounding is compared on identical float32 inputs."""
    gen = torch.Generator().manual_seed(0)
    sizes = (70001, 300, 5)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in sizes]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}]
    opt = ADOPT(groups, lr=1e-3, stochastic_rounding=True, **hyper, **kwargs)
    signs = [torch.randint(0, 2, (n,), generator=gen).to(dtype) * 2 - 1 for n in sizes]
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (i == 1 and t < 3) else signs[i].clone()
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("hyper", [{}, dict(weight_decay=0.1, decouple=True), dict(maximize=True)],
                         ids=["plain", "decoupled", "maximize"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("path", [p for p in PATHS if p != "single"])
def test_every_path_rounds_as_the_single_tensor_path(path: str, dtype: torch.dtype, hyper: dict[str, Any]) -> None:
    if path == "fused" and KERNEL is None:
        pytest.skip("the C extension is not built")
    reference = _run(PATHS["single"], dtype, **hyper)
    for a, b in zip(reference, _run(PATHS[path], dtype, **hyper)):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", LOW)
def test_fused_random_data_agrees_within_one_ulp(dtype: torch.dtype) -> None:
    """On general data the 16-bit paths round their intermediate values differently (the
    single-tensor path in the parameter dtype, the kernel in float32 registers), so one step
    from the same state may give parameters one ulp apart where their float32 inputs differ."""
    if KERNEL is None:
        pytest.skip("the C extension is not built")
    gen = torch.Generator().manual_seed(0)
    p, g, m = (torch.randn(20000, generator=gen).to(dtype) for _ in range(3))
    v = torch.rand(20000, generator=gen).to(dtype)
    results = []
    for path in ("single", "fused"):
        tensors = [t.clone() for t in (p, g, m, v)] + [torch.tensor(5.0)]
        adopt.functional.adopt(
            *[[t] for t in tensors], foreach=False if path == "single" else None, fused=path == "fused",
            beta1=0.9, beta2=0.999, lr=1e-3, clip_lambda=None, weight_decay=0.1, decouple=True, eps=1e-6,
            maximize=False, stochastic_rounding=True, seeds=[torch.tensor(3)],
        )
        results.append(tensors[0].double())
    ulp = (p.double().abs() * 2.0 ** (-7 if dtype == torch.bfloat16 else -10)).clamp(min=1e-30)
    gap = (results[0] - results[1]).abs()
    assert bool((gap <= 2 * ulp).all())
    assert (gap == 0).double().mean().item() > 0.9


@needs_kernel
@pytest.mark.parametrize("state_precision", ["full", "8bit"])
def test_fused_threads_split_pairs_as_the_serial_step(state_precision: str) -> None:
    """Two elements share a word: a thread's range that starts at an odd element (the first
    tensors' sizes are odd) still draws each element's half, so 2 threads equal 1 bit for bit."""
    sizes = [37, 37, 37, 300_001, 70_001]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            gen = torch.Generator().manual_seed(4)
            params = [torch.nn.Parameter((torch.randn(k, generator=gen) + 3).to(torch.bfloat16)) for k in sizes]
            opt = ADOPT(params, lr=1e-3, fused=True, stochastic_rounding=True, state_precision=state_precision)
            for _ in range(3):
                for q in params:
                    q.grad = torch.randn(q.shape, generator=gen).to(torch.bfloat16)
                opt.step()
            results.append([q.detach().clone() for q in params])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(_bits(a), _bits(b))


def test_float32_and_float64_parameters_are_unaffected() -> None:
    for dtype in (torch.float32, torch.float64):
        for path in ("single", "foreach", "fused"):
            results = []
            for rounding in (False, True):
                gen = torch.Generator().manual_seed(0)
                p = torch.nn.Parameter(torch.randn(1000, generator=gen, dtype=dtype))
                opt = ADOPT([p], lr=1e-3, stochastic_rounding=rounding, **PATHS[path])
                for _ in range(5):
                    p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
                    opt.step()
                results.append(p.detach().clone())
            assert torch.equal(results[0], results[1]), (dtype, path)


@pytest.mark.parametrize("path", ["single", "foreach", "fused"])
def test_a_resumed_run_equals_an_uninterrupted_one(path: str) -> None:
    def make() -> tuple[torch.nn.Parameter, ADOPT]:
        p = torch.nn.Parameter(torch.linspace(-2, 2, 5000).to(torch.bfloat16))
        return p, ADOPT([p], lr=1e-3, weight_decay=0.01, decouple=True, stochastic_rounding=True, **PATHS[path])

    def grads(t: int) -> torch.Tensor:
        return torch.randn(5000, generator=torch.Generator().manual_seed(t)).to(torch.bfloat16)

    p, opt = make()
    for t in range(10):
        p.grad = grads(t)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"p": p.detach().clone(), "opt": opt.state_dict()}, buffer)
    for t in range(10, 20):
        p.grad = grads(t)
        opt.step()

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    q, resumed = make()
    with torch.no_grad():
        q.copy_(saved["p"])
    resumed.load_state_dict(saved["opt"])
    assert resumed.state[q]["seed"].dtype == torch.int64
    assert int(resumed.state[q]["seed"]) == int(opt.state[p]["seed"])
    for t in range(10, 20):
        q.grad = grads(t)
        resumed.step()
    assert torch.equal(_bits(p.detach()), _bits(q.detach()))


def test_a_corrupt_seed_is_refused_and_nothing_changes() -> None:
    p = torch.nn.Parameter(torch.ones(10, dtype=torch.bfloat16))
    opt = ADOPT([p], stochastic_rounding=True)
    p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["seed"] = torch.tensor(1.5)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] has a seed"):
        opt.load_state_dict(sd)
    assert torch.equal(opt.state[p]["seed"], before["state"][0]["seed"])


def test_seeds_differ_between_parameters_and_live_next_to_the_step() -> None:
    params = [torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16)) for _ in range(3)]
    opt = ADOPT([{"params": params[:1]}, {"params": params[1:], "stochastic_rounding": False}], stochastic_rounding=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert "seed" not in opt.state[params[1]]  # its group rounds to nearest
    seed = opt.state[params[0]]["seed"]
    assert seed.dtype == torch.int64 and seed.device == opt.state[params[0]]["step"].device
    assert int(seed) == _random.param_seed(0)
    opt.param_groups[1]["stochastic_rounding"] = True
    opt.step()
    assert [int(opt.state[p]["seed"]) for p in params[1:]] == [_random.param_seed(1), _random.param_seed(2)]


def test_found_inf_leaves_everything_untouched() -> None:
    if KERNEL is None:
        pytest.skip("the C extension is not built")
    p = torch.ones(100, dtype=torch.bfloat16)
    m, v = torch.full_like(p, 0.5), torch.ones_like(p)
    step, seed = torch.tensor(3.0), torch.tensor(11)
    adopt.functional.adopt(
        [p], [torch.ones_like(p)], [m], [v], [step], fused=True, found_inf=torch.ones(()), beta1=0.9, beta2=0.999,
        lr=1.0, clip_lambda=None, weight_decay=0.0, decouple=False, eps=1e-6, maximize=False,
        stochastic_rounding=True, seeds=[seed],
    )
    assert torch.equal(p, torch.ones_like(p)) and float(step) == 3.0 and torch.equal(m, torch.full_like(p, 0.5))


def test_bad_arguments_are_clear_errors() -> None:
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="stochastic_rounding must be True or False, got stochastic_rounding='yes'"):
        ADOPT([p], stochastic_rounding="yes")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="does not support differentiable=True"):
        ADOPT([p], stochastic_rounding=True, differentiable=True)
    with pytest.raises(RuntimeError, match="does not support differentiable=True"):
        ADOPT([{"params": [p], "stochastic_rounding": True}], differentiable=True)
    t = torch.ones(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"needs one seed per parameter \(1\), got None"):
        adopt.functional.adopt([t], [t], [t], [t], [torch.tensor(1.0)], beta1=0.9, beta2=0.9, lr=1e-3,
                               clip_lambda=None, weight_decay=0.0, decouple=False, eps=1e-6, maximize=False,
                               stochastic_rounding=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("path, fullgraph", [("foreach-capturable", True), ("single-capturable", True),
                                             ("foreach", False)])
def test_compiled_step_matches_eager(path: str, fullgraph: bool) -> None:
    """Compiled (inductor) agrees with eager; capturable paths as one full graph (the step body
    without torch's no_grad wrapper, whose graph break is deliberate). float32 bit for bit;
    16-bit parameters within one ulp, since inductor keeps the 16-bit intermediates of the
    moments in float32 and so some momenta, the rounding's inputs, differ."""
    if path == "fused" and KERNEL is None:
        pytest.skip("the C extension is not built")
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n, dtype in
                  ((4000, torch.bfloat16), (300, torch.float16), (50, torch.float32))]
        opt = ADOPT(params, lr=1e-3, weight_decay=0.1, decouple=True, stochastic_rounding=True, **PATHS[path])
        body = functools.partial(inspect.unwrap(ADOPT._general_step), opt, None, tried_fused=False)
        step = torch.compile(body, fullgraph=fullgraph) if compiled else body
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            with torch.no_grad():
                step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        if a.dtype not in LOW:
            assert torch.equal(a, b)
            continue
        gap = (a.double() - b.double()).abs()
        ulp = a.double().abs() * 2.0 ** (-7 if a.dtype == torch.bfloat16 else -10)
        assert bool((gap <= 2 * ulp).all()) and (gap == 0).double().mean().item() > 0.99
