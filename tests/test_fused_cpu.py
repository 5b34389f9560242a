"""The fused CPU path (C kernel) against an independent float64 rendering of the ADOPT rule.

Every step is checked on its own: the reference starts from the fused path's state before
the step (converted to float64) and its result is rounded to the storage dtype, so the
tolerance is one rounding of that dtype, not drift accumulated over many steps.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import pytest
import torch
from torch import Tensor

from adopt import ADOPT, _fused
from adopt._fused import FusedFallbackWarning, fused_adopt, fused_cpu_available, fused_supported_dtypes
from adopt.schedules import PowerClip

Clip = Optional[Callable[..., Any]]

# (rtol, atol) of one rounding to the storage dtype after float32 (float64) math.
TOLERANCES = {
    torch.float64: (1e-13, 1e-300),
    torch.float32: (2e-6, 1e-30),
    torch.float16: (2e-3, 1e-7),
    torch.bfloat16: (1.6e-2, 1e-30),
}
DTYPES = list(TOLERANCES)
HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-6)


def reference_step(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: int, *, lr: float, weight_decay: float, decouple: bool,
    maximize: bool, clip: Optional[float], inv_scale: float = 1.0, beta1: float, beta2: float, eps: float,
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """One ADOPT step in float64: the new (p, m, v), and the magnitude of the terms summed
    into each (what a rounding error is relative to, where terms may cancel)."""
    p, g, m, v = (t.detach().to(torch.float64) for t in (p, g, m, v))
    g = g * inv_scale
    if maximize:
        g = -g
    g_mag = g.abs()
    if weight_decay != 0 and not decouple:
        g = g + weight_decay * p
        g_mag = g_mag + weight_decay * p.abs()
    if s == 0:
        return (p, m, g * g), (p.abs(), m.abs(), g_mag**2)
    p_mag = p.abs()
    if decouple:
        p = p * (1 - lr * weight_decay)
    denom = torch.maximum(v.sqrt(), torch.tensor(eps, dtype=torch.float64))
    n, n_mag = g / denom, g_mag / denom
    if clip is not None:
        n, n_mag = n.clamp(-clip, clip), n_mag.clamp(max=abs(clip))
    m_mag = m.abs() + (1 - beta1) * (n_mag + m.abs())
    m = m + (1 - beta1) * (n - m)
    p = p - lr * m
    v_mag = beta2 * v + (1 - beta2) * g_mag**2
    v = beta2 * v + (1 - beta2) * g * g
    return (p, m, v), (p_mag + lr * m_mag, m_mag, v_mag)


class State:
    """Params and ADOPT state for a list of tensor sizes, in one dtype."""

    def __init__(self, sizes: list[int], dtype: torch.dtype, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.params = [self.randn(n) for n in sizes]
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in self.params]

    def randn(self, n: int, scale: float = 1.0) -> Tensor:
        shape = (n, 2) if self.dtype.is_complex else (n,)
        x = torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale
        return torch.view_as_complex(x).to(self.dtype) if self.dtype.is_complex else x.to(self.dtype)

    def grads(self) -> list[Tensor]:
        return [self.randn(p.shape[0]) for p in self.params]

    def snapshot(self, idx: list[int]) -> list[tuple[Tensor, ...]]:
        return [
            tuple(t.detach().clone() for t in (self.params[i], self.exp_avgs[i], self.exp_avg_sqs[i]))
            + (int(self.steps[i]),)  # type: ignore[operator]
            for i in idx
        ]


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def assert_step(
    state: State,
    idx: list[int],
    grads: list[Tensor],
    before: list[tuple[Any, ...]],
    *,
    clip: Clip,
    clip_arg: Callable[[int], Any] = int,
    inv_scale: float = 1.0,
    lr: Union[float, Tensor],
    **options: Any,
) -> None:
    """The state of tensors `idx` equals one reference step from `before`."""
    storage = _real(state.params[idx[0]]).dtype
    rtol, atol = TOLERANCES[storage]
    lr_value = float(lr)
    for k, i in enumerate(idx):
        p0, m0, v0, s = before[k]
        threshold = None if clip is None or s == 0 else float(clip(clip_arg(s)))
        wants, mags = reference_step(
            _real(p0), _real(grads[k]), _real(m0), _real(v0), s, lr=lr_value, clip=threshold,
            inv_scale=inv_scale, **options, **HYPER,
        )
        gots = (state.params[i], state.exp_avgs[i], state.exp_avg_sqs[i])
        for name, got, want, mag in zip(("param", "exp_avg", "exp_avg_sq"), gots, wants, mags):
            got = _real(got).double()
            want = want.to(storage).double()  # the reference, rounded as it is stored
            same = (got == want) | (got.isnan() & want.isnan())  # infinities included
            err = torch.where(same, 0.0, (got - want).abs())
            bound = rtol * (want.abs() + mag) + atol
            assert bool((same | (err <= bound)).all()), (
                f"{name} of tensor {i} (dtype {storage}, step {s}): max error {err.max().item():.3g}, "
                f"worst ratio {(err / bound).max().item():.3g}"
            )
        assert int(state.steps[i]) == s + 1


def fused_step(
    state: State, idx: list[int], grads: list[Tensor], *, grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None, capturable: bool = False, differentiable: bool = False, **options: Any,
) -> None:
    fused_adopt(
        [state.params[i] for i in idx], grads, [state.exp_avgs[i] for i in idx],
        [state.exp_avg_sqs[i] for i in idx], [state.steps[i] for i in idx], grad_scale, found_inf,
        has_complex=state.dtype.is_complex, capturable=capturable, differentiable=differentiable, **options, **HYPER,
    )


def run_and_check(
    dtype: torch.dtype, sizes: list[int], n_steps: int, *, clip: Clip = PowerClip(0.25),
    active: Callable[[int, int], bool] = lambda step, i: True, clip_arg: Callable[[int], Any] = int,
    capturable: bool = False, **options: Any,
) -> State:
    state = State(sizes, dtype)
    for step in range(n_steps):
        idx = [i for i in range(len(sizes)) if active(step, i)]
        grads = [g for i, g in enumerate(state.grads()) if i in idx]
        before = state.snapshot(idx)
        fused_step(state, idx, grads, clip_lambda=clip, capturable=capturable, **options)
        assert_step(state, idx, grads, before, clip=clip, clip_arg=clip_arg, **options)
    return state


SIZES = [1, 3, 17, 64, 1000, 4099]  # odd sizes exercise the vector loops' tails


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("decay", ["none", "l2", "decoupled"])
def test_matches_reference(dtype: torch.dtype, maximize: bool, decay: str) -> None:
    run_and_check(
        dtype, SIZES, 4, lr=1e-2, maximize=maximize,
        weight_decay=0.0 if decay == "none" else 0.1, decouple=decay == "decoupled",
    )


CLIPS: dict[str, Clip] = {
    "none": None,
    "constant": lambda s: 0.5,
    "power": PowerClip(0.25),
    "custom": lambda s: 0.3 + s**0.5,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", list(CLIPS), ids=str)
def test_clip_schedules(dtype: torch.dtype, clip: str) -> None:
    run_and_check(dtype, SIZES, 5, clip=CLIPS[clip], lr=1e-2, maximize=False, weight_decay=0.0, decouple=False)


def test_custom_clip_receives_host_ints() -> None:
    seen: list[Any] = []

    def clip(s: Any) -> float:
        seen.append(s)
        return 1.0

    run_and_check(torch.float32, [5, 6], 3, clip=clip, lr=1e-2, maximize=False, weight_decay=0.0, decouple=False)
    assert seen and all(type(s) is int for s in seen)


@pytest.mark.parametrize("clip", ["power", "custom"])
def test_capturable_on_cpu(clip: str) -> None:
    """capturable=True: custom schedules get 0-d float32 tensors, as on the device."""
    seen: list[Any] = []
    schedule = CLIPS[clip]

    def recording(s: Any) -> Any:
        seen.append(s)
        return schedule(s)  # type: ignore[misc]

    run_and_check(
        torch.float32, SIZES, 4, clip=recording if clip == "custom" else schedule, capturable=True,
        clip_arg=lambda s: torch.tensor(float(s)), lr=torch.tensor(1e-2), maximize=False,
        weight_decay=0.1, decouple=True,
    )
    if clip == "custom":
        assert seen and all(isinstance(s, Tensor) and s.dim() == 0 for s in seen)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1d", "2d"])
def test_tensor_lr(shape: tuple[int, ...]) -> None:
    run_and_check(
        torch.float32, SIZES, 3, lr=torch.full(shape, 1e-2), maximize=False, weight_decay=0.1, decouple=False,
    )


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_params(dtype: torch.dtype) -> None:
    run_and_check(dtype, [1, 7, 300], 4, lr=1e-2, maximize=True, weight_decay=0.1, decouple=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_uneven_steps(dtype: torch.dtype) -> None:
    """Tensors whose grad is missing at some steps lag behind; each keeps its own count."""

    def active(step: int, i: int) -> bool:
        return i == 0 or step % (i + 1) == i  # tensor i joins at step i, then every (i+1)th

    state = run_and_check(
        dtype, [5, 64, 1000, 33], 9, active=active, clip=CLIPS["custom"], lr=1e-2, maximize=False,
        weight_decay=0.1, decouple=True,
    )
    assert [int(s) for s in state.steps] == [9, 4, 3, 2]


def test_many_tensors_and_threads_agree() -> None:
    """200 small tensors plus a large one: threaded results equal the serial ones bit for bit."""
    sizes = [37] * 200 + [300_001]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            state = State(sizes, torch.float32)
            for _ in range(3):
                fused_step(state, list(range(len(sizes))), state.grads(), lr=1e-2, clip_lambda=PowerClip(0.25),
                           maximize=False, weight_decay=0.0, decouple=False)
            results.append(state)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0].params + results[0].exp_avg_sqs, results[1].params + results[1].exp_avg_sqs):
        assert torch.equal(a, b)


def test_mixed_dtypes_and_non_contiguous() -> None:
    """A call with several dtypes is split into groups; non-contiguous tensors are updated in place."""
    state32, state16 = State([10, 20], torch.float32), State([30], torch.bfloat16, seed=1)
    transposed = torch.randn(8, 5, dtype=torch.float32).t()  # non-contiguous param
    params = state32.params + state16.params + [transposed]
    exp_avgs = state32.exp_avgs + state16.exp_avgs + [torch.zeros_like(transposed)]
    exp_avg_sqs = state32.exp_avg_sqs + state16.exp_avg_sqs + [torch.zeros_like(transposed)]
    steps = state32.steps + state16.steps + [torch.zeros(())]
    options = dict(lr=1e-2, clip_lambda=None, maximize=False, weight_decay=0.0, decouple=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        before = [(p.clone(), m.clone(), v.clone(), int(s)) for p, m, v, s in zip(params, exp_avgs, exp_avg_sqs, steps)]
        fused_adopt(params, grads, exp_avgs, exp_avg_sqs, steps, None, None, has_complex=False,
                    capturable=False, differentiable=False, **options, **HYPER)  # type: ignore[arg-type]
        for i, (p0, m0, v0, s) in enumerate(before):
            (p, m, v), _ = reference_step(p0, grads[i], m0, v0, s, lr=1e-2, weight_decay=0.0, decouple=False,
                                          maximize=False, clip=None, **HYPER)
            rtol = TOLERANCES[params[i].dtype][0]
            torch.testing.assert_close(params[i].double(), p.to(params[i].dtype).double(), rtol=rtol, atol=1e-6)
            torch.testing.assert_close(exp_avg_sqs[i].double(), v.to(params[i].dtype).double(), rtol=rtol, atol=1e-6)
    assert not transposed.is_contiguous() and [int(s) for s in steps] == [3, 3, 3, 3]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_dtensor_params_update_their_local_shards() -> None:
    """DTensors (FSDP2) are updated through their local shards, with the same result."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain = State([6, 40], torch.float32)
        params = [distribute_tensor(p.clone(), mesh, [Shard(0)]) for p in plain.params]
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        steps = [torch.zeros(()) for _ in params]
        options: dict[str, Any] = dict(lr=1e-2, clip_lambda=PowerClip(0.25), maximize=False, weight_decay=0.1,
                                       decouple=True)
        for _ in range(3):
            grads = plain.grads()
            fused_step(plain, [0, 1], grads, **options)
            fused_adopt(params, [distribute_tensor(g, mesh, [Shard(0)]) for g in grads], exp_avgs, exp_avg_sqs,
                        steps, None, None, has_complex=False, capturable=False, differentiable=False,
                        **options, **HYPER)
        for got, want in zip(params + exp_avg_sqs, plain.params + plain.exp_avg_sqs):
            assert torch.equal(got.to_local(), want)
        assert [int(s) for s in steps] == [3, 3]
    finally:
        dist.destroy_process_group()


def _amp_state() -> tuple[State, list[Tensor]]:
    state = State([3, 100, 4099], torch.float32)
    fused_step(state, [0, 1, 2], state.grads(), lr=1e-2, clip_lambda=PowerClip(0.25), maximize=False,
               weight_decay=0.0, decouple=False)
    return state, state.grads()


def test_grad_scale_unscales_in_kernel() -> None:
    state, grads = _amp_state()
    scale = 1024.0
    scaled = [g * scale for g in grads]
    kept = [g.clone() for g in scaled]
    before = state.snapshot([0, 1, 2])
    fused_step(state, [0, 1, 2], scaled, grad_scale=torch.tensor([scale]), found_inf=torch.zeros(1), lr=1e-2,
               clip_lambda=PowerClip(0.25), maximize=True, weight_decay=0.1, decouple=False)
    assert_step(state, [0, 1, 2], scaled, before, clip=PowerClip(0.25), inv_scale=1 / scale, lr=1e-2,
                maximize=True, weight_decay=0.1, decouple=False)
    assert all(torch.equal(a, b) for a, b in zip(scaled, kept))  # grads are never modified


def test_found_inf_changes_nothing() -> None:
    state, grads = _amp_state()
    before = state.snapshot([0, 1, 2])
    fused_step(state, [0, 1, 2], grads, grad_scale=torch.tensor([2.0]), found_inf=torch.ones(1), lr=1e-2,
               clip_lambda=PowerClip(0.25), maximize=False, weight_decay=0.1, decouple=True)
    for i, (p, m, v, s) in enumerate(before):
        assert torch.equal(state.params[i], p) and torch.equal(state.exp_avgs[i], m)
        assert torch.equal(state.exp_avg_sqs[i], v) and int(state.steps[i]) == s


def test_grad_scaler_cpu_with_injected_inf() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    params = list(model.parameters())
    optimizer = ADOPT(params, lr=1e-2, betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"], fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x, y = torch.randn(32, 16), torch.randn(32, 4)

    def backward() -> None:
        optimizer.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()

    def snapshot() -> list[dict[str, Tensor]]:
        return [{"param": p.detach().clone(), **{k: t.clone() for k, t in optimizer.state[p].items()}} for p in params]

    for step in range(3):
        backward()
        grads = [p.grad / scaler.get_scale() for p in params]  # type: ignore[operator]
        before = snapshot()
        scaler.step(optimizer)
        scaler.update()
        for p, g, old in zip(params, grads, before):
            zeros = torch.zeros_like(p)
            (want, _, _), _ = reference_step(
                old["param"], g, old.get("exp_avg", zeros), old.get("exp_avg_sq", zeros), step, lr=1e-2,
                weight_decay=0.0, decouple=False, maximize=False, clip=step**0.25 if step else None, **HYPER,
            )
            torch.testing.assert_close(p.detach().double(), want.float().double(), rtol=2e-6, atol=1e-7)

    backward()
    model.weight.grad[0, 0] = float("inf")  # type: ignore[index]
    scale = scaler.get_scale()
    before = snapshot()
    scaler.step(optimizer)
    scaler.update()
    for old, new in zip(before, snapshot()):
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert scaler.get_scale() < scale  # the scaler saw the inf and backed off


def _four_steps(model: torch.nn.Module, optimizer: ADOPT, step: Callable[[], Any]) -> list[Tensor]:
    """Four training steps of ``model`` on fixed inputs through ``step``; the params and
    optimizer state after them, for comparing compiled and eager runs."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        model(torch.randn(8, 4, generator=gen)).square().mean().backward()
        step()
        optimizer.zero_grad()
    return [t for p in model.parameters() for t in (p.detach(), *optimizer.state[p].values())]


def test_inductor_compiles_the_fused_step_as_one_graph() -> None:
    """Under torch.compile each CPU group is one adopt::fused_adopt_cpu_ op: one graph, same result."""
    with warnings.catch_warnings():  # torch's own deprecation warning when inductor imports mkldnn
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import torch.utils.mkldnn  # noqa: F401

    def setup() -> tuple[torch.nn.Module, ADOPT]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        return model, ADOPT(model.parameters(), lr=1e-2, weight_decay=1e-2, decouple=True, fused=True)

    def run(compile_step: bool) -> list[Tensor]:
        model, optimizer = setup()
        return _four_steps(model, optimizer, torch.compile(optimizer.step) if compile_step else optimizer.step)

    torch._dynamo.reset()
    try:
        model, optimizer = setup()
        model(torch.ones(1, 4)).sum().backward()
        explanation = torch._dynamo.explain(optimizer.step)()
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        torch._dynamo.reset()
        compiled = run(compile_step=True)
    finally:
        torch._dynamo.reset()
    for got, want in zip(compiled, run(compile_step=False), strict=True):
        assert torch.equal(got, want)


def test_float16_bfloat16_conversions_round_to_nearest_even() -> None:
    """Every 16-bit pattern survives load/store, and f32 results round as torch rounds them."""
    for dtype in (torch.float16, torch.bfloat16):
        bits = torch.arange(-(2**15), 2**15, dtype=torch.int16)
        values = bits.view(dtype)
        finite = values[torch.isfinite(values)]
        # lr = 0 and g = 0 at a later step: p is loaded and stored unchanged.
        p = values.clone()
        m, v = torch.zeros_like(p), torch.ones_like(p)
        fused_adopt([p], [torch.zeros_like(p)], [m], [v], [torch.ones(())], None, None, has_complex=False,
                    lr=0.0, clip_lambda=None, weight_decay=0.0, decouple=False, maximize=False,
                    capturable=False, differentiable=False, **HYPER)
        nan = torch.isnan(values)
        assert torch.equal(p[~nan].view(torch.int16), bits[~nan]) and bool(torch.isnan(p[nan]).all())
        # First step: v = g * g, exact in float32 for 16-bit g, then rounded by the kernel.
        g = torch.cat([finite, finite * 3.7, finite / 300.0]).to(dtype)
        v = torch.zeros_like(g)
        fused_adopt([torch.zeros_like(g)], [g], [torch.zeros_like(g)], [v], [torch.zeros(())], None, None,
                    has_complex=False, lr=0.0, clip_lambda=None, weight_decay=0.0, decouple=False,
                    maximize=False, capturable=False, differentiable=False, **HYPER)
        want = (g.float() * g.float()).to(dtype)
        assert torch.equal(v.view(torch.int16), want.view(torch.int16))


def test_errors_leave_everything_untouched() -> None:
    state = State([4, 5], torch.float32)
    grads = state.grads()
    bad_exp_avgs = [state.exp_avgs[0], torch.zeros(6)]  # wrong size for the second param
    before = state.snapshot([0, 1])
    with pytest.raises(ValueError, match="exp_avgs"):
        fused_adopt(state.params, grads, bad_exp_avgs, state.exp_avg_sqs, state.steps, None, None,
                    has_complex=False, lr=1e-2, clip_lambda=None, weight_decay=0.0, decouple=False,
                    maximize=False, capturable=False, differentiable=False, **HYPER)
    with pytest.raises(RuntimeError, match="differentiable"):
        fused_step(state, [0, 1], grads, lr=1e-2, clip_lambda=None, maximize=False, weight_decay=0.0,
                   decouple=False, capturable=False, differentiable=True)
    with pytest.raises(ZeroDivisionError):  # a failing schedule, before anything runs
        fused_step(state, [0, 1], grads, lr=1e-2, clip_lambda=lambda s: 1 / 0, maximize=False,
                   weight_decay=0.0, decouple=False)
    for i, (p, m, v, s) in enumerate(before):
        assert torch.equal(state.params[i], p) and torch.equal(state.exp_avg_sqs[i], v)
        assert int(state.steps[i]) == s


def test_supported_dtypes() -> None:
    assert {torch.float32, torch.float64, torch.float16, torch.bfloat16} <= fused_supported_dtypes()
    assert fused_cpu_available()


def test_fallback_without_extension_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the extension missing, CPU groups run the foreach path after one warning."""
    monkeypatch.setattr(_fused, "_cpu_kernel", lambda: None)
    monkeypatch.setattr(_fused, "_fallback_warned", False)
    state = State(SIZES, torch.float32)
    options = dict(lr=torch.tensor(1e-2), maximize=True, weight_decay=0.1, decouple=False)
    clip = PowerClip(0.25)
    idx = list(range(len(SIZES)))
    with pytest.warns(FusedFallbackWarning, match="foreach"):
        fused_step(state, idx, state.grads(), clip_lambda=clip, **options)
    for step in range(1, 4):
        grads = state.grads()
        before = state.snapshot(idx)
        scale = 8.0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            fused_step(state, idx, [g * scale for g in grads], grad_scale=torch.tensor([scale]),
                       found_inf=torch.zeros(1), clip_lambda=clip, **options)
        assert_step(state, idx, grads, before, clip=clip, **options)
    before = state.snapshot(idx)
    fused_step(state, idx, state.grads(), found_inf=torch.ones(1), clip_lambda=clip, **options)
    assert all(torch.equal(state.params[i], p) and int(state.steps[i]) == s for i, (p, _, _, s) in enumerate(before))


def test_bench_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "adopt.bench", "--quick", "--sizes", "20k:10", "--repeats", "2", "--warmup", "1",
         "--out", str(out)],
        check=True, capture_output=True, timeout=120,
    )
    report = json.loads(out.read_text())
    (case,) = report["cases"]
    assert case["params"] == 20_000 and case["tensors"] == 10
    assert math.isfinite(case["roofline"]["bandwidth_gb_s"])
    paths = {row["path"]: row for row in case["results"]}
    assert set(paths) == {"adopt-single", "adopt-foreach", "adopt-fused", "adamw-foreach", "adamw-fused"}
    assert all("median_ms" in row and row["vs_roofline"] > 0 for row in paths.values())


def test_bench_times_stochastic_rounding_by_default_only_for_16_bit_dtypes(tmp_path: Path) -> None:
    """adopt-fused-sr is the adopt-fused step unless the parameters are 16-bit."""
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "adopt.bench", "--quick", "--sizes", "20k:10", "--repeats", "2", "--warmup", "1",
         "--cache", "warm", "--dtype", "bfloat16", "--out", str(out)],
        check=True, capture_output=True, timeout=120,
    )
    (case,) = json.loads(out.read_text())["cases"]
    assert {row["path"] for row in case["results"]} == {
        "adopt-single", "adopt-foreach", "adopt-fused", "adopt-fused-sr", "adamw-foreach", "adamw-fused"
    }
    from adopt.bench import _make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    assert _make_optimizer("adopt-fused-sr", params).param_groups[0]["stochastic_rounding"] is True
    assert _make_optimizer("adopt-fused", params).param_groups[0]["stochastic_rounding"] is False


@pytest.mark.parametrize("capturable", [False, True])
def test_compiled_fused_step_with_a_custom_schedule_matches_eager(capturable: bool) -> None:
    """Under torch.compile a custom schedule becomes the op's per-tensor threshold table.

    Dynamo traces every torch.optim step as capturable, so both cases reach the schedule with
    step tensors; the results must still equal eager's (where capturable=False passes ints)."""
    with warnings.catch_warnings():  # torch's own deprecation warning when compiling imports mkldnn
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import torch.utils.mkldnn  # noqa: F401

    def run(compile_step: bool) -> list[Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        # 0.2 + s/10 binds at every step, so the thresholds decide the result.
        optimizer = ADOPT(model.parameters(), lr=1e-2, clip_lambda=lambda s: 0.2 + s / 10, fused=True,
                          capturable=capturable)
        step = torch.compile(optimizer.step, backend="eager") if compile_step else optimizer.step
        return _four_steps(model, optimizer, step)

    torch._dynamo.reset()
    try:
        compiled = run(compile_step=True)
    finally:
        torch._dynamo.reset()
    for got, want in zip(compiled, run(compile_step=False), strict=True):
        assert torch.equal(got, want)
