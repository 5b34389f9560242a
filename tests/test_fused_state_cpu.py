"""The fused CPU step for low-memory state (``adopt._fused_state.fused_state_cpu``).

The reference is the contract of issue 9, built from independent pieces: decode m and v to
float32 (``_state_formats``), run the existing fused full-precision kernel on float32 copies
(``adopt.functional.adopt(..., fused=True)``; 16-bit params as float32 copies, written back
to nearest or with ``_random.stochastic_round_`` on stream 0), then encode the new moments
with ``_state_formats.quantize`` / ``round_bf16`` under ``state_key(seed, s, moment)``. The
kernel must match it bit for bit: codes, scales, bf16 moments, params and steps. Every test
runs twice where the CPU has AVX-512: with the kernel's AVX-512 block step (the default
there) and with its portable loops.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import pytest
import torch
from torch import Tensor

from adopt import _fused
from adopt._fused_state import fused_state_cpu, fused_state_cpu_available
from adopt._random import param_seed, step_key, stochastic_round_
from adopt._state_formats import BLOCK_SIZE, QuantizedMoment, dequantize, quantize, round_bf16, state_key
from adopt.functional import adopt as functional_adopt
from adopt.schedules import PowerClip

pytestmark = pytest.mark.skipif(not fused_state_cpu_available(), reason="the C kernel was not built")


def _kernel() -> Any:
    k = _fused._cpu_kernel()
    assert k is not None
    return k


def _avx512_available() -> bool:
    return fused_state_cpu_available() and bool(_kernel().avx512_available())


@pytest.fixture(autouse=True, params=["avx512", "portable"])
def block_loops(request: pytest.FixtureRequest) -> Any:
    """Which loops the kernel's common state step runs (adopt_cpu_avx512.h, or adopt_cpu.c's)."""
    if not fused_state_cpu_available():
        yield request.param
        return
    if request.param == "avx512" and not _avx512_available():
        pytest.skip("this CPU does not run the AVX-512 block step")
    previous = _kernel().use_avx512(request.param == "avx512")
    try:
        yield request.param
    finally:
        _kernel().use_avx512(previous)

# Sizes around the block size: a partial block, exact blocks, one element.
SIZES = [(300,), (16, 16), (5, 103), (1,), (1030,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class State:
    """One call's tensors: params, grads, moments (codes + scales, or bf16), steps, seeds."""

    def __init__(self, fmt: str, dtype: torch.dtype, sizes: list[tuple[int, ...]], steps: list[int], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.fmt = fmt
        self.params = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
        self.grads = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
        self.steps = [torch.tensor(float(k)) for k in steps]
        self.seeds = [torch.tensor(param_seed(i + 3 * seed), dtype=torch.int64) for i in range(len(sizes))]
        m32 = [torch.randn(s, generator=gen) * 0.1 for s in sizes]
        v32 = [torch.rand(s, generator=gen) * 0.01 for s in sizes]
        for k, (m, v) in enumerate(zip(m32, v32)):
            if steps[k] == 0:  # a fresh state: zero moments
                m.zero_()
                v.zero_()
        self.set_moments(m32, v32)

    def set_moments(self, m32: list[Tensor], v32: list[Tensor]) -> None:
        if self.fmt == "8bit":
            qm = [quantize(m, "exp_avg") for m in m32]
            qv = [quantize(v, "exp_avg_sq") for v in v32]
            self.exp_avgs = [q.codes.view(m.shape) for q, m in zip(qm, m32)]
            self.exp_avg_sqs = [q.codes.view(v.shape) for q, v in zip(qv, v32)]
            self.m_scales: Optional[list[Tensor]] = [q.scales for q in qm]
            self.v_scales: Optional[list[Tensor]] = [q.scales for q in qv]
        else:
            self.exp_avgs = [m.to(torch.bfloat16) for m in m32]
            self.exp_avg_sqs = [v.to(torch.bfloat16) for v in v32]
            self.m_scales = self.v_scales = None

    def decoded(self) -> tuple[list[Tensor], list[Tensor]]:
        if self.fmt == "8bit":
            assert self.m_scales is not None and self.v_scales is not None
            m = [dequantize(QuantizedMoment(c.reshape(-1), s), "exp_avg").view(c.shape)
                 for c, s in zip(self.exp_avgs, self.m_scales)]
            v = [dequantize(QuantizedMoment(c.reshape(-1), s), "exp_avg_sq").view(c.shape)
                 for c, s in zip(self.exp_avg_sqs, self.v_scales)]
            return m, v
        return [t.float() for t in self.exp_avgs], [t.float() for t in self.exp_avg_sqs]

    def clone(self) -> "State":
        other = object.__new__(State)
        for key, value in self.__dict__.items():
            setattr(other, key, [t.clone() for t in value] if isinstance(value, list) else value)
        return other

    def tensors(self) -> list[Tensor]:
        out = self.params + self.exp_avgs + self.exp_avg_sqs + self.steps
        return out + (self.m_scales or []) + (self.v_scales or [])

    def assert_equal(self, other: "State") -> None:
        for a, b in zip(self.tensors(), other.tensors()):
            assert a.dtype == b.dtype and a.shape == b.shape
            # Bitwise, NaN included.
            view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
            assert torch.equal(a.view(view), b.view(view)), (a, b)


HYPER: dict[str, Any] = dict(beta1=0.9, beta2=0.999, lr=1e-2, clip_lambda=PowerClip(0.25), weight_decay=0.0,
                             decouple=False, eps=1e-6, maximize=False, stochastic_rounding=False, nesterov=False,
                             caution=False, lr_max=None)


def kernel_step(st: State, grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None, **kw: Any) -> None:
    hyper = {**HYPER, **kw}
    fused_state_cpu(st.params, st.grads, st.exp_avgs, st.exp_avg_sqs, st.m_scales, st.v_scales, st.steps, st.seeds,
                    grad_scale, found_inf, fmt=st.fmt, **hyper)


def reference_step(st: State, grad_scale: Optional[Tensor] = None, **kw: Any) -> None:
    """The contract's reference, in place on st (no found_inf: a skipped step changes nothing)."""
    hyper = {**HYPER, **kw}
    m32, v32 = st.decoded()
    counts = [int(s) for s in st.steps]
    p32 = [p.float().clone() for p in st.params]
    g32 = [g.float() for g in st.grads]
    sr = hyper.pop("stochastic_rounding")
    lr_max = hyper.pop("lr_max")
    functional_adopt(p32, g32, m32, v32, st.steps, fused=True, grad_scale=grad_scale,
                     corrected_weight_decay=lr_max is not None, lr_max=lr_max, **hyper)
    for i, p in enumerate(st.params):
        if p.dtype == torch.float32:
            p.copy_(p32[i])
        elif sr:
            stochastic_round_(p, p32[i], step_key(int(st.seeds[i]), counts[i]))
        else:
            p.copy_(p32[i].to(p.dtype))
    if st.fmt == "8bit":
        assert st.m_scales is not None and st.v_scales is not None
        for i in range(len(st.params)):
            seed = int(st.seeds[i])
            qm = quantize(m32[i], "exp_avg", state_key(seed, counts[i], "exp_avg"))
            qv = quantize(v32[i], "exp_avg_sq", state_key(seed, counts[i], "exp_avg_sq"))
            st.exp_avgs[i].copy_(qm.codes.view(st.exp_avgs[i].shape))
            st.exp_avg_sqs[i].copy_(qv.codes.view(st.exp_avg_sqs[i].shape))
            st.m_scales[i].copy_(qm.scales)
            st.v_scales[i].copy_(qv.scales)
    else:
        for i in range(len(st.params)):
            seed = int(st.seeds[i])
            st.exp_avgs[i].copy_(round_bf16(m32[i], state_key(seed, counts[i], "exp_avg")))
            st.exp_avg_sqs[i].copy_(round_bf16(v32[i], state_key(seed, counts[i], "exp_avg_sq")))


def run_both(st: State, n_steps: int, regrad: bool = True, **kw: Any) -> tuple[State, State]:
    ref = st.clone()
    gen = torch.Generator().manual_seed(42)
    for _ in range(n_steps):
        kernel_step(st, **kw)
        reference_step(ref, **kw)
        st.assert_equal(ref)
        if regrad:
            for a, b in zip(st.grads, ref.grads):
                new = torch.randn(a.shape, generator=gen).to(a.dtype)
                a.copy_(new)
                b.copy_(new)
    return st, ref


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_over_steps(fmt: str, dtype: torch.dtype) -> None:
    # Tensors at different step counts in one call, the first step (s == 0) included.
    run_both(State(fmt, dtype, SIZES, [0, 3, 1, 7, 0]), 4)


VARIANTS: list[dict[str, Any]] = [
    dict(nesterov=True),
    dict(caution=True),
    dict(caution=True, nesterov=True),
    dict(weight_decay=0.1, decouple=True),
    dict(weight_decay=0.1, decouple=True, lr_max=0.05),
    dict(weight_decay=0.05),  # L2
    dict(maximize=True),
    dict(clip_lambda=None),
    dict(clip_lambda=lambda s: 0.5 + 0.1 * s),  # a custom schedule: a host table
    dict(lr=torch.tensor(3e-3)),
]


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_variants(fmt: str, variant: int) -> None:
    kw = VARIANTS[variant]
    for dtype in (torch.float32, torch.bfloat16):
        run_both(State(fmt, dtype, SIZES, [0, 2, 5, 1, 3], seed=variant), 3, **kw)


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_param_stochastic_rounding(fmt: str, dtype: torch.dtype) -> None:
    st, _ = run_both(State(fmt, dtype, SIZES, [1, 2, 3, 4, 0]), 3, stochastic_rounding=True)
    # The rounding is stochastic indeed: it differs from nearest somewhere.
    nearest = State(fmt, dtype, SIZES, [1, 2, 3, 4, 0])
    run_both(nearest, 3)
    assert any(not torch.equal(a, b) for a, b in zip(st.params, nearest.params))


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
def test_grad_scale_and_found_inf(fmt: str) -> None:
    st = State(fmt, torch.float32, SIZES, [1, 2, 3, 4, 5])
    scale = torch.tensor(1024.0)
    ref = st.clone()
    for g in st.grads + ref.grads:
        g.mul_(1024.0)
    kernel_step(st, grad_scale=scale, found_inf=torch.tensor(0.0))
    reference_step(ref, grad_scale=scale)
    st.assert_equal(ref)
    before = st.clone()
    kernel_step(st, grad_scale=scale, found_inf=torch.tensor(1.0))
    st.assert_equal(before)  # nothing at all changes, steps included


def test_first_step_keeps_m_and_params() -> None:
    st = State("8bit", torch.float32, [(1000,)], [0])
    m_before, _ = st.decoded()
    p_before = [p.clone() for p in st.params]
    run_both(st, 1, regrad=False)
    m_after, v_after = st.decoded()
    assert torch.equal(st.params[0], p_before[0])
    assert torch.equal(m_after[0], m_before[0])
    assert v_after[0].abs().sum() > 0 and float(st.steps[0]) == 1.0


def test_block_scales_and_special_values() -> None:
    """Blocks of zeros, NaN and huge values follow the format's scale rule."""
    st = State("8bit", torch.float32, [(4 * BLOCK_SIZE + 17,)], [3])
    g = st.grads[0]
    g[:BLOCK_SIZE] = 0.0
    st.params[0][:BLOCK_SIZE] = 0.0
    m32, v32 = st.decoded()
    m32[0][:BLOCK_SIZE] = 0.0
    v32[0][:BLOCK_SIZE] = 0.0
    m32[0][2 * BLOCK_SIZE : 3 * BLOCK_SIZE] *= 1e-30  # the subnormal code range
    st.set_moments(m32, v32)
    g[BLOCK_SIZE + 5] = float("nan")
    g[3 * BLOCK_SIZE + 1] = 3e19
    run_both(st, 2, regrad=False)
    assert st.m_scales is not None
    assert st.m_scales[0][0] == 0 and math.isnan(float(st.m_scales[0][1]))


def test_large_random_moments_bitexact() -> None:
    """Moments spanning many binades per block (every code range exercised)."""
    gen = torch.Generator().manual_seed(7)
    for fmt in ("8bit", "bf16"):
        st = State(fmt, torch.float32, [(8 * BLOCK_SIZE,)], [2])
        m = torch.randn(8 * BLOCK_SIZE, generator=gen) * torch.exp2(torch.randint(-40, 10, (8 * BLOCK_SIZE,), generator=gen).float())
        v = torch.rand(8 * BLOCK_SIZE, generator=gen) * torch.exp2(torch.randint(-60, 20, (8 * BLOCK_SIZE,), generator=gen).float())
        st.set_moments([m], [v])
        run_both(st, 2)


@pytest.mark.parametrize("block_loops", ["avx512"], indirect=True)  # it switches itself
@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hyper", [{}, dict(weight_decay=0.1, decouple=True, maximize=True, clip_lambda=None),
                                   dict(grad_scale=2.0**-3, stochastic_rounding=True)])
def test_avx512_blocks_match_portable_loops(block_loops: str, fmt: str, dtype: torch.dtype,
                                            hyper: dict[str, Any]) -> None:
    """The AVX-512 block step and the portable loops give the same bits on extreme blocks:
    moments over 60 binades, all-zero blocks, the subnormal code range down to where it rounds
    to 0, u whose decoded squares overflow, NaN and infinite values."""
    n = 24 * BLOCK_SIZE + 40
    gen = torch.Generator().manual_seed(11)
    start = State(fmt, dtype, [(n,)], [5], seed=4)
    m = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-60, 12, (n,), generator=gen).float())
    v = torch.rand(n, generator=gen) * torch.exp2(torch.randint(-90, 30, (n,), generator=gen).float())
    m[: 2 * BLOCK_SIZE] = 0.0  # zero blocks
    v[BLOCK_SIZE : 2 * BLOCK_SIZE] = 0.0
    m[2 * BLOCK_SIZE : 3 * BLOCK_SIZE] *= 2.0**-24  # far into the subnormal code range
    m[3 * BLOCK_SIZE] = 1.0  # ... of a block whose scale is 1
    # u near 2^64 (v near the float32 maximum): a code rounded up squares to infinity
    v[4 * BLOCK_SIZE : 6 * BLOCK_SIZE] = torch.finfo(torch.float32).max * (1 - torch.rand(2 * BLOCK_SIZE, generator=gen) / 4)
    m[4 * BLOCK_SIZE : 6 * BLOCK_SIZE] = 0.0  # so that the update there shows it (g / inf = 0)
    start.set_moments([m], [v])
    g = start.grads[0]
    g[6 * BLOCK_SIZE + 3] = float("nan")
    g[7 * BLOCK_SIZE + 9] = float("inf")
    g[8 * BLOCK_SIZE : 9 * BLOCK_SIZE] *= 1e-30
    scale = hyper.get("grad_scale")
    kw = {k: v for k, v in hyper.items() if k != "grad_scale"}
    grad_scale = None if scale is None else torch.tensor(scale)
    fast, portable = start.clone(), start.clone()
    for _ in range(3):  # compared after every step: a NaN block can hide an earlier difference
        for st, on in ((fast, True), (portable, False)):
            previous = _kernel().use_avx512(on)
            try:
                kernel_step(st, grad_scale=grad_scale, **kw)
            finally:
                _kernel().use_avx512(previous)
        fast.assert_equal(portable)
    assert start.exp_avgs[0].float().ne(fast.exp_avgs[0].float()).any()  # the steps did something


def test_threads_identical() -> None:
    for fmt in ("8bit", "bf16"):
        results = []
        for threads in (1, 2):
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                st = State(fmt, torch.bfloat16, [(70_000,), (50_001,), (300,)], [1, 0, 4])
                for _ in range(2):
                    kernel_step(st, caution=True, stochastic_rounding=True)
            finally:
                torch.set_num_threads(old)
            results.append(st)
        results[0].assert_equal(results[1])


def test_large_tensor_multithreaded_matches_reference() -> None:
    st = State("8bit", torch.float32, [(100_003,), (40_000,)], [2, 9])
    run_both(st, 2, caution=True)


# ---- validation: every error names the argument and changes nothing -----------------------


def _args(st: State) -> dict[str, Any]:
    return dict(params=st.params, grads=st.grads, exp_avgs=st.exp_avgs, exp_avg_sqs=st.exp_avg_sqs,
                exp_avg_scales=st.m_scales, exp_avg_sq_scales=st.v_scales, state_steps=st.steps, seeds=st.seeds)


def _call(args: dict[str, Any], fmt: str) -> None:
    fused_state_cpu(args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"], args["exp_avg_scales"],
                    args["exp_avg_sq_scales"], args["state_steps"], args["seeds"], None, None, fmt=fmt, **HYPER)


BAD_8BIT: list[tuple[str, str, Any]] = [
    ("exp_avgs", "exp_avgs\\[1\\] must be a uint8", lambda t: t.to(torch.int16)),
    ("exp_avgs", "exp_avgs\\[1\\] has 200", lambda t: t.reshape(-1)[:200]),
    ("exp_avg_sqs", "exp_avg_sqs\\[1\\] must be contiguous", lambda t: t.t()),
    ("exp_avg_scales", "exp_avg_scales\\[1\\] has 2", lambda t: torch.zeros(2)),
    ("exp_avg_sq_scales", "exp_avg_sq_scales\\[1\\] must be a float32", lambda t: t.double()),
    ("grads", "grads\\[1\\] does not match", lambda t: t.reshape(-1)),
    ("grads", "grads\\[1\\] must be", lambda t: t.double()),
    ("params", "grads\\[1\\] must be a bfloat16", lambda t: t.to(torch.bfloat16)),  # its own dtype group
    ("params", "params\\[1\\]: state_precision", lambda t: t.double()),
    ("state_steps", "state_steps\\[1\\] must be a float32", lambda t: t.double()),
    ("seeds", "seeds\\[1\\] must be a int64", lambda t: t.to(torch.int32)),
    ("seeds", "seeds\\[1\\] has 2", lambda t: torch.zeros(2, dtype=torch.int64)),
    ("seeds", "seeds\\[1\\] must be a plain", lambda t: 7),
]


@pytest.mark.parametrize("case", range(len(BAD_8BIT)))
def test_validation_errors_8bit(case: int) -> None:
    name, message, change = BAD_8BIT[case]
    st = State("8bit", torch.float32, [(300,), (16, 16), (50,)], [1, 2, 3])
    before = st.clone()
    args = _args(st)
    args[name] = list(args[name])
    args[name][1] = change(args[name][1])
    with pytest.raises((ValueError, TypeError), match=message):
        _call(args, "8bit")
    st.assert_equal(before)


def test_validation_bf16_and_lists() -> None:
    st = State("bf16", torch.float32, [(300,), (40,)], [1, 2])
    before = st.clone()
    args = _args(st)
    args["exp_avgs"] = [args["exp_avgs"][0], args["exp_avgs"][1].float()]
    with pytest.raises(ValueError, match="exp_avgs\\[1\\] must be a bfloat16"):
        _call(args, "bf16")
    args = _args(st)
    args["exp_avg_scales"] = [torch.zeros(2), torch.zeros(1)]
    with pytest.raises(ValueError, match="takes no scales"):
        _call(args, "bf16")
    args = _args(st)
    args["state_steps"] = args["state_steps"][:1]
    with pytest.raises(ValueError, match="state_steps has 1 entries"):
        _call(args, "bf16")
    with pytest.raises(ValueError, match="fmt must be"):
        _call(_args(st), "4bit")
    args = _args(st)
    args["params"] = [args["params"][0].double(), args["params"][1]]
    with pytest.raises(TypeError, match="params\\[0\\]"):
        _call(args, "bf16")
    st.assert_equal(before)


def test_overlaps_refused() -> None:
    st = State("8bit", torch.float32, [(300,), (300,)], [1, 2])
    before = st.clone()
    args = _args(st)
    args["exp_avg_sqs"] = [args["exp_avgs"][0], args["exp_avg_sqs"][1]]  # m and v codes share memory
    with pytest.raises(ValueError, match="share memory"):
        _call(args, "8bit")
    args = _args(st)
    args["params"] = [args["params"][0], args["params"][0]]  # the same parameter twice
    with pytest.raises(ValueError, match="share memory"):
        _call(args, "8bit")
    args = _args(st)
    args["exp_avg_sq_scales"] = [args["exp_avg_scales"][0][:2], args["exp_avg_sq_scales"][1]]
    with pytest.raises(ValueError, match="share memory"):
        _call(args, "8bit")
    st.assert_equal(before)
    # Grads may share memory (they are only read): one buffer viewed twice.
    args = _args(st)
    args["grads"] = [args["grads"][0], args["grads"][0]]
    _call(args, "8bit")


def test_storage_and_kernel_entry_safety() -> None:
    """The C entry itself (no Python glue) refuses what Python might pass."""
    kernel = _fused._cpu_kernel()
    st = State("8bit", torch.float32, [(300,)], [1])
    before = st.clone()
    base = [st.params, st.grads, st.exp_avgs, st.exp_avg_sqs, st.m_scales, st.v_scales, st.steps, st.seeds, None,
            None, None, kernel.STATE_8BIT, 1e-3, 0.9, 0.999, 0.0, 1e-6, 0.25, kernel.CLIP_POWER, False, False,
            False, False, 0.0, False, 1, False]
    with pytest.raises(TypeError, match="27 positional"):
        kernel.step_state(*base[:-1])
    bad = list(base)
    bad[11] = 7
    with pytest.raises(ValueError, match="unknown state format"):
        kernel.step_state(*bad)
    bad = list(base)
    bad[0] = [object()]
    with pytest.raises(TypeError, match="params\\[0\\]"):
        kernel.step_state(*bad)
    bad = list(base)
    bad[2] = [torch.zeros(300, dtype=torch.uint8, device="meta")]
    with pytest.raises((TypeError, ValueError), match="exp_avgs\\[0\\]"):
        kernel.step_state(*bad)
    bad = list(base)
    shrunk = torch.zeros(300, dtype=torch.uint8)
    shrunk.untyped_storage().resize_(10)
    bad[3] = [shrunk]
    with pytest.raises(ValueError, match="exp_avg_sqs\\[0\\].*storage"):
        kernel.step_state(*bad)
    bad = list(base)
    bad[8] = None
    bad[18] = kernel.CLIP_TABLE
    with pytest.raises(ValueError, match="clip_table"):
        kernel.step_state(*bad)
    bad = list(base)
    bad[9] = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="grad_scale"):
        kernel.step_state(*bad)
    bad = list(base)
    bad[4] = None
    with pytest.raises(TypeError):
        kernel.step_state(*bad)
    st.assert_equal(before)
    kernel.step_state(*base[:-1], True)  # dry run: nothing changes
    st.assert_equal(before)


def test_mixed_dtypes_one_call() -> None:
    """params of several dtypes in one call: one kernel call per dtype, each as the reference."""
    for fmt in ("8bit", "bf16"):
        a = State(fmt, torch.float32, [(300,), (20,)], [1, 0], seed=1)
        b = State(fmt, torch.float16, [(260,)], [2], seed=2)
        mixed = a.clone()
        for key in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "seeds", "m_scales", "v_scales"):
            ours, theirs = getattr(mixed, key), getattr(b, key)
            if ours is not None:
                setattr(mixed, key, [ours[0], theirs[0], ours[1]])
        ref_a, ref_b = a.clone(), b.clone()
        kernel_step(mixed, nesterov=True)
        reference_step(ref_a, nesterov=True)
        reference_step(ref_b, nesterov=True)
        expected = ref_a.clone()
        for key in ("params", "exp_avgs", "exp_avg_sqs", "steps", "m_scales", "v_scales"):
            ours, theirs = getattr(expected, key), getattr(ref_b, key)
            if ours is not None:
                setattr(expected, key, [ours[0], theirs[0], ours[1]])
        mixed.assert_equal(expected)
