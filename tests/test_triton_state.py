"""The Triton kernel for low-memory optimizer state (adopt/_kernels/triton_state.py), run by
Triton's interpreter on CPU tensors, against the issue 9 reference, bit for bit:

    decode m, v to float32 (adopt/_state_formats.py)
    -> the full-precision Triton kernel (triton_adopt.launch_group, same interpreter) on
       float32 copies of the params, grads and moments
    -> params back to their dtype (nearest, or stochastic rounding with the stream-0 key),
       moments encoded with _state_formats.quantize / round_bf16 under
       state_key(seed, s, moment), s the step count before the step.

Each launch is compared with the reference applied to the state the launch started from,
over several steps, with tensors of different step counts (0 included) in one launch and
sizes that are not multiples of 256 (or of a program's 2048 elements). No tolerance: the
float32 arithmetic is the same operations in the same order, and the encoder is integer
arithmetic on the bits. NaN elements are compared as NaN (payloads are not specified).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import importlib
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import pytest
import torch
from torch import Tensor

pytest.importorskip("triton")

from adopt import _random  # noqa: E402
from adopt import _state_formats as sf  # noqa: E402
from adopt._kernels import triton_adopt, triton_state  # noqa: E402

if not (triton_adopt._INTERPRETED and triton_state._INTERPRETED):  # imported without the interpreter
    triton_adopt = importlib.reload(triton_adopt)
    triton_state = importlib.reload(triton_state)

# Partial blocks and partial programs: 300 (two blocks, one partial), 2053 (a full program,
# then one partial block), 256 (one block), 5000 (two full programs and a partial one);
# the last tensor starts from fresh (all-zero) state.
SIZES = [300, 2053, 256, 5000, 700]
STEPS = [0, 1, 7, 3, 0]


@dataclass
class Config:
    """Hyperparameters of one launch; ``clip`` is None, a power exponent, or 'tensor'."""

    lr: Union[float, str] = 0.05  # 'tensor': a 1-element tensor
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.0
    decouple: bool = False
    maximize: bool = False
    clip: Union[None, float, str] = 0.25
    grad_scale: Optional[float] = None
    nesterov: bool = False
    caution: bool = False
    lr_max: Optional[float] = None  # corrected weight decay
    stochastic_rounding: bool = False


CONFIGS = {
    "default": Config(),
    "maximize_l2": Config(maximize=True, weight_decay=0.1),
    "decoupled_tensor_lr": Config(weight_decay=0.5, decouple=True, lr="tensor"),
    "no_clip_scaled": Config(clip=None, grad_scale=1000.0),
    "tensor_clip": Config(clip="tensor", beta2=0.99, eps=1e-3),
    "nesterov_corrected": Config(nesterov=True, weight_decay=0.5, decouple=True, lr_max=0.2),
    "caution_l2_maximize": Config(caution=True, weight_decay=0.1, maximize=True),
    "caution_nesterov_tensor_lr": Config(caution=True, nesterov=True, weight_decay=0.5, decouple=True, lr="tensor",
                                         lr_max=0.1, grad_scale=8.0),
}


@dataclass
class State:
    """One launch's tensors: ``m``/``v`` are the stored moments (8bit: codes; bf16: bfloat16),
    ``ms``/``vs`` the 8-bit scales (None for bf16)."""

    fmt: str
    params: List[Tensor]
    grads: List[Tensor]
    m: List[Tensor]
    v: List[Tensor]
    ms: Optional[List[Tensor]]
    vs: Optional[List[Tensor]]
    steps: List[Tensor]
    seeds: Tensor

    def snapshot(self) -> "State":
        copy = lambda ts: None if ts is None else [t.clone() for t in ts]  # noqa: E731
        return State(self.fmt, copy(self.params), copy(self.grads), copy(self.m), copy(self.v), copy(self.ms),
                     copy(self.vs), copy(self.steps), self.seeds.clone())

    def tensors(self) -> List[Tensor]:
        return self.params + self.m + self.v + (self.ms or []) + (self.vs or []) + self.steps


def _wide(gen: torch.Generator, n: int, spread: float, scale: float = 1.0) -> Tensor:
    """Normal values times log-normal magnitudes: blocks whose small elements reach the
    codes' subnormal range and the lowest code."""
    return torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * spread) * scale


def make_state(fmt: str, dtype: torch.dtype = torch.float32, sizes=SIZES, steps=STEPS, seed: int = 0) -> State:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    grads = [_wide(gen, n, 1.5).to(dtype) for n in sizes]
    m32 = [_wide(gen, n, 1.5, 0.1) for n in sizes]
    v32 = [_wide(gen, n, 2.0).square() for n in sizes]
    m32[-1].zero_()
    v32[-1].zero_()
    if fmt == "8bit":
        qm = [sf.quantize(x, "exp_avg", 11 + i) for i, x in enumerate(m32)]
        qv = [sf.quantize(x, "exp_avg_sq", 23 + i) for i, x in enumerate(v32)]
        m, ms = [q.codes for q in qm], [q.scales for q in qm]
        v, vs = [q.codes for q in qv], [q.scales for q in qv]
    else:
        m, v, ms, vs = [sf.round_bf16(x, 5) for x in m32], [sf.round_bf16(x, 6) for x in v32], None, None
    seeds = torch.tensor([_random.param_seed(i + seed) for i in range(len(sizes))], dtype=torch.int64)
    return State(fmt, params, grads, m, v, ms, vs, [torch.tensor(float(s)) for s in steps], seeds)


def thresholds_for(count: int) -> Tensor:
    """Arbitrary per-tensor thresholds for the 'tensor' clip mode."""
    return torch.tensor([0.5 + 0.25 * i for i in range(count)], dtype=torch.float32)


def _clip(cfg: Config, count: int):
    if cfg.clip is None:
        return None
    if cfg.clip == "tensor":
        return ("tensor", thresholds_for(count))
    return ("power", float(cfg.clip))


def _common(cfg: Config, count: int, found_inf: Optional[float]) -> dict:
    return dict(
        grad_scale=None if cfg.grad_scale is None else torch.tensor([cfg.grad_scale]),
        found_inf=None if found_inf is None else torch.tensor([found_inf]),
        beta1=cfg.beta1, beta2=cfg.beta2,
        lr=torch.tensor([0.05], dtype=torch.float64) if cfg.lr == "tensor" else cfg.lr,
        clip=_clip(cfg, count), weight_decay=cfg.weight_decay, decouple=cfg.decouple, eps=cfg.eps,
        maximize=cfg.maximize, nesterov=cfg.nesterov, caution=cfg.caution, lr_max=cfg.lr_max,
    )


def launch(st: State, cfg: Config, found_inf: Optional[float] = None) -> None:
    triton_state.launch_state_group(
        st.params, st.grads, st.m, st.v, st.ms, st.vs, st.steps, fmt=st.fmt, seeds=st.seeds,
        stochastic_rounding=cfg.stochastic_rounding, **_common(cfg, len(st.params), found_inf),
    )


def decode(st: State) -> tuple:
    if st.fmt == "8bit":
        m = [sf.dequantize(sf.QuantizedMoment(c, s), "exp_avg") for c, s in zip(st.m, st.ms)]
        v = [sf.dequantize(sf.QuantizedMoment(c, s), "exp_avg_sq") for c, s in zip(st.v, st.vs)]
        return m, v
    return [x.float() for x in st.m], [x.float() for x in st.v]


def reference(before: State, cfg: Config) -> State:
    """The contract's rule on a snapshot, through the full-precision Triton kernel."""
    out = before.snapshot()
    m32, v32 = decode(before)
    p32 = [p.float() for p in before.params]
    triton_adopt.launch_group(p32, [g.float() for g in before.grads], m32, v32, out.steps,
                              **_common(cfg, len(p32), None))
    for i, p in enumerate(before.params):
        seed, s = int(before.seeds[i]), int(before.steps[i])
        if p.dtype == torch.float32:
            out.params[i] = p32[i]
        elif cfg.stochastic_rounding:
            _random.stochastic_round_(out.params[i], p32[i], _random.step_key(seed, s))
        else:
            out.params[i] = p32[i].to(p.dtype)
        key_m, key_v = sf.state_key(seed, s, "exp_avg"), sf.state_key(seed, s, "exp_avg_sq")
        if before.fmt == "8bit":
            qm, qv = sf.quantize(m32[i], "exp_avg", key_m), sf.quantize(v32[i], "exp_avg_sq", key_v)
            out.m[i], out.ms[i], out.v[i], out.vs[i] = qm.codes, qm.scales, qv.codes, qv.scales
        else:
            out.m[i], out.v[i] = sf.round_bf16(m32[i], key_m), sf.round_bf16(v32[i], key_v)
    return out


def _bits(t: Tensor) -> Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_same(got: Tensor, want: Tensor, what: str) -> None:
    """Same dtype, shape and bits; NaNs compared as NaNs."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype)
    if got.is_floating_point():
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ"
        got, want = torch.where(nan, 0, got), torch.where(nan, 0, want)
    diff = (_bits(got) != _bits(want)).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.numel()} elements differ, first at {diff[:5].flatten().tolist()}"


def check_step(st: State, cfg: Config) -> None:
    """Launch once and compare every tensor and step with the reference."""
    before = st.snapshot()
    want = reference(before, cfg)
    launch(st, cfg)
    names = ["param"] * len(st.params) + ["exp_avg"] * len(st.m) + ["exp_avg_sq"] * len(st.v)
    names += ["exp_avg_scales"] * len(st.ms or []) + ["exp_avg_sq_scales"] * len(st.vs or []) + ["step"] * len(st.steps)
    count = len(st.params)
    for k, (name, got, ref) in enumerate(zip(names, st.tensors(), want.tensors())):
        assert_same(got, ref, f"{name} {k % count}")
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(st.grads, before.grads)), "grads changed"


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference_over_two_steps(fmt: str, name: str) -> None:
    st = make_state(fmt)
    check_step(st, CONFIGS[name])  # steps 0,1,7,3,0: both branches in one launch
    check_step(st, CONFIGS[name])  # steps 1,2,8,4,1: the first real update after the init step


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("config", [
    Config(),
    Config(stochastic_rounding=True),
    Config(stochastic_rounding=True, caution=True, nesterov=True, weight_decay=0.5, decouple=True, lr_max=0.1),
], ids=["nearest", "rounded", "rounded-caution-nesterov-corrected"])
def test_param_dtypes(fmt: str, dtype: torch.dtype, config: Config) -> None:
    """bfloat16/float16 params: float32 arithmetic on the param's value, written back to
    nearest (even, as torch) or with stochastic rounding (stream 0); float32 params ignore
    stochastic_rounding."""
    st = make_state(fmt, dtype, sizes=[300, 2053, 700], steps=[2, 0, 5], seed=1)
    check_step(st, config)
    check_step(st, config)


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
def test_many_steps(fmt: str) -> None:
    """Six steps from fresh state (all zero, s = 0), each against the reference."""
    sizes = [300, 2053]
    st = make_state(fmt, sizes=sizes, steps=[0, 0], seed=2)
    for i in range(len(sizes)):
        st.m[i].zero_()
        st.v[i].zero_()
        for scales in (st.ms, st.vs):
            if scales is not None:
                scales[i].zero_()
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        st.grads = [_wide(gen, n, 1.0) for n in sizes]
        check_step(st, Config(weight_decay=0.01, decouple=True))
    assert [float(s) for s in st.steps] == [6.0, 6.0]


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
def test_non_finite_gradients(fmt: str) -> None:
    """A NaN or an infinite gradient makes its blocks' moments non-finite (8bit: scale NaN,
    codes 0), as the reference has them; other blocks are untouched by it."""
    st = make_state(fmt, sizes=[600, 300], steps=[3, 0], seed=4)
    st.grads[0][5] = float("nan")
    st.grads[0][400] = float("inf")
    st.grads[1][290] = float("-inf")
    check_step(st, Config(clip=None))
    if fmt == "8bit":
        assert torch.isnan(st.ms[0][:2]).all() and not torch.isnan(st.ms[0][2]).any()
        assert torch.isnan(st.vs[0][:2]).all() and torch.isnan(st.vs[1][1]) and not torch.isnan(st.vs[1][0])
        assert (st.m[0][:512] == 0).all() and (st.v[1][256:] == 0).all()
    st.grads = [torch.ones_like(g) for g in st.grads]
    with warnings.catch_warnings():  # inf - inf in numpy (bf16: the moments are infinite)
        warnings.simplefilter("ignore", RuntimeWarning)
        check_step(st, Config(clip=None))  # non-finite blocks stay non-finite (8bit: NaN scales decode to NaN)


def test_extreme_magnitudes() -> None:
    """Gradients near the float32 extremes: the clamped scale exponents (v's root below
    2**-63, large values up to the top code) encode as the reference encodes them."""
    st = make_state("8bit", sizes=[512, 512], steps=[1, 4], seed=5)
    st.grads[0][:256] *= 1e-30
    st.grads[0][256:] *= 1e-42
    st.grads[1][:256] = st.grads[1][:256].sign() * 1e18
    check_step(st, Config(clip=None, eps=1e-12))
    check_step(st, Config(clip=None, eps=1e-12))


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
def test_found_inf_changes_nothing(fmt: str) -> None:
    st = make_state(fmt, sizes=[300, 2053], steps=[0, 2])
    before = st.snapshot()
    for cfg in (Config(grad_scale=2.0), Config(grad_scale=2.0, caution=True)):
        launch(st, cfg, found_inf=1.0)
        for k, (got, want) in enumerate(zip(st.tensors(), before.tensors())):
            assert torch.equal(_bits(got), _bits(want)), k
    check_step(st, Config(grad_scale=2.0))  # found_inf absent: the step runs
    before = st.snapshot()
    launch(st, Config(grad_scale=2.0), found_inf=0.0)  # zero: it runs too
    assert [float(s) for s in st.steps] == [float(s) + 1 for s in before.steps]
    assert not torch.equal(st.params[1], before.params[1])


def test_empty_tensor_still_counts_a_step() -> None:
    st = make_state("8bit", sizes=[0, 300], steps=[4, 4])
    launch(st, Config())
    assert [float(s) for s in st.steps] == [5.0, 5.0]


def test_table_is_cached() -> None:
    triton_state.clear_plan_cache()
    st = make_state("bf16", sizes=[10, 300], steps=[1, 2])
    builds = triton_state.plan_builds()
    launch(st, Config())
    launch(st, Config(weight_decay=0.1, caution=True))  # other hyperparameters: same table
    assert triton_state.plan_builds() == builds + 1
    st.grads = [g.clone() for g in st.grads]  # new addresses: a new table
    launch(st, Config())
    assert triton_state.plan_builds() == builds + 2


def _bad_call(layout: str, **changes) -> None:
    """A launch on a fresh valid group of state format ``layout`` with some arguments replaced."""
    st = make_state(layout, sizes=[300, 600], steps=[1, 1])
    args = dict(params=st.params, grads=st.grads, exp_avgs=st.m, exp_avg_sqs=st.v, exp_avg_scales=st.ms,
                exp_avg_sq_scales=st.vs, state_steps=st.steps, fmt=layout, seeds=st.seeds, grad_scale=None,
                found_inf=None, beta1=0.9, beta2=0.999, lr=0.1, clip=None, weight_decay=0.0, decouple=False,
                eps=1e-6, maximize=False)
    for name, value in changes.items():
        args[name] = value(st) if callable(value) else value
    triton_state.launch_state_group(**args)


@pytest.mark.parametrize("error, match, layout, changes", [
    (TypeError, r"exp_avgs\[1\] must be torch.uint8", "8bit", dict(exp_avgs=lambda s: [s.m[0], s.m[1].float()])),
    (ValueError, r"exp_avg_sqs\[0\] must have 300", "8bit", dict(exp_avg_sqs=lambda s: [s.v[0][:299], s.v[1]])),
    (ValueError, r"exp_avg_sqs\[1\] must be contiguous", "8bit",
     dict(exp_avg_sqs=lambda s: [s.v[0], torch.zeros(1200, dtype=torch.uint8)[::2]])),
    (ValueError, r"exp_avg_scales\[0\] must have 2 elements", "8bit",
     dict(exp_avg_scales=lambda s: [torch.zeros(3), s.ms[1]])),
    (TypeError, r"exp_avg_sq_scales\[1\] must be torch.float32", "8bit",
     dict(exp_avg_sq_scales=lambda s: [s.vs[0], s.vs[1].double()])),
    (ValueError, r"exp_avg_scales has 1 tensors", "8bit", dict(exp_avg_scales=lambda s: s.ms[:1])),
    (ValueError, r"needs exp_avg_scales", "8bit", dict(exp_avg_sq_scales=None)),
    (ValueError, r"grads has 1 tensors", "8bit", dict(grads=lambda s: s.grads[:1])),
    (ValueError, r"state_steps has 3 tensors", "8bit", dict(state_steps=lambda s: s.steps + s.steps[:1])),
    (TypeError, r"grads\[1\] must be torch.float32", "8bit", dict(grads=lambda s: [s.grads[0], s.grads[1].half()])),
    (ValueError, r"params\[1\] must be contiguous", "8bit",
     dict(params=lambda s: [s.params[0], torch.zeros(1200)[::2]])),
    (TypeError, r"state_steps\[0\] must be torch.float32", "8bit",
     dict(state_steps=lambda s: [torch.tensor(1.0, dtype=torch.float64), s.steps[1]])),
    (ValueError, r"seeds .* required", "8bit", dict(seeds=None)),
    (TypeError, r"seeds must be torch.int64", "8bit", dict(seeds=lambda s: s.seeds.int())),
    (ValueError, r"seeds must have 2 elements", "8bit", dict(seeds=lambda s: s.seeds[:1])),
    (ValueError, r"fmt must be one of", "8bit", dict(fmt="4bit")),
    (ValueError, r"clip must be", "8bit", dict(clip=("cosine", 1.0))),
    (TypeError, r"params must be float32, bfloat16 or float16", "8bit",
     dict(params=lambda s: [p.double() for p in s.params], grads=lambda s: [g.double() for g in s.grads])),
    (ValueError, r"'bf16' has no scales", "bf16", dict(exp_avg_scales=lambda s: [torch.zeros(2), torch.zeros(3)])),
    (TypeError, r"exp_avgs\[0\] must be torch.bfloat16", "bf16", dict(exp_avgs=lambda s: [m.float() for m in s.m])),
])
def test_rejects_bad_input(error: type, match: str, layout: str, changes: dict) -> None:
    with pytest.raises(error, match=match):
        _bad_call(layout, **changes)


SM90_COMPILE = r"""
import json
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from adopt._kernels import triton_state as ts

assert not ts._INTERPRETED


def compile_for_h100(dtype, fmt, aligned=True, tensors=True, rounded=False, step_pass=0, nesterov=False):
    ptr = "*fp32" if tensors else "constexpr"
    signature = {
        "rows_ptr": "*i64", "blocks_ptr": "*i32", "counters_ptr": "*i32", "kept_ptr": "*i64", "lr_ptr": ptr,
        "grad_scale_ptr": ptr, "found_inf_ptr": ptr, "thresholds_ptr": ptr, "seeds_ptr": "*i64",
        **{name: "fp64" for name in ("lr_value", "beta1", "beta2", "weight_decay", "eps", "clip_exponent",
                                      "lr_max")},
    }
    constexprs = {
        "DTYPE": ts._TL_PARAM[dtype], "MDTYPE": ts._TL_STATE[fmt], "FMT": int(fmt == "8bit"),
        "ALIGNED": aligned, "WD_MODE": 1 if tensors else 2, "CLIP_MODE": 2 if tensors else 1,
        "MAXIMIZE": tensors, "NB": ts._TILE_BLOCKS, "BS": ts.BLOCK_SIZE, "ROW": ts._ROW, "ROUNDED": rounded,
        "NESTEROV": nesterov, "CORRECTED": tensors, "PASS": step_pass, **ts._format_constants(),
    }
    constexprs.update({k: None for k, v in signature.items() if v == "constexpr"})
    signature.update({k: "constexpr" for k in constexprs})
    kernel = triton.compile(
        ASTSource(ts._state_kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
        options={"num_warps": ts._NUM_WARPS, "enable_fp_fusion": False},
    )
    ptx = kernel.asm["ptx"]
    return {
        "atomics": ptx.count("atom.global.gpu.acq_rel.add"),
        "fma": ptx.count("fma.rn.f32"),
        "cubin_bytes": len(kernel.asm["cubin"]),
    }


out = {f"{d}-{fmt}": compile_for_h100(d, fmt) for d, fmt in
       ((torch.float32, "8bit"), (torch.bfloat16, "bf16"), (torch.float16, "8bit"))}
out["unaligned"] = compile_for_h100(torch.float32, "8bit", aligned=False, tensors=False)
out["bfloat16-8bit-rounded"] = compile_for_h100(torch.bfloat16, "8bit", rounded=True)
for fmt in ("8bit", "bf16"):  # a cautious step's two passes, Nesterov on
    out[f"{fmt}-caution-count"] = compile_for_h100(torch.bfloat16, fmt, step_pass=1, nesterov=True)
out["8bit-caution-apply"] = compile_for_h100(torch.float16, "8bit", rounded=True, step_pass=2, nesterov=True)
print(json.dumps(out))
"""


def test_compiles_for_h100() -> None:
    """The real compiler (no GPU needed) builds the kernel's variants for sm_90: every format,
    param dtype, rounding, a cautious step's two passes; no FP contraction."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(triton_state.__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", SM90_COMPILE], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for name, info in result.items():
        # One step-completion atomic per program (none in a cautious step's counting pass).
        assert info["cubin_bytes"] > 0 and info["atomics"] == (0 if "count" in name else 1), (name, info)
        assert info["fma"] == 0, (name, info)  # every path rounds each operation separately


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
def test_the_optimizers_cuda_dispatch_launches_this_kernel(fmt: str) -> None:
    """adopt._state_path's CUDA branch (what ADOPT(fused=True) runs for CUDA tensors), here on
    CPU tensors under the interpreter: the same step as the single-tensor path, from the same
    state, to within one code where a float32 rounding differs."""
    from adopt import _state_path
    from adopt._random import param_seed

    gen = torch.Generator().manual_seed(3)
    sizes = [300, 2053]
    params = [torch.randn(n, generator=gen) for n in sizes]
    lists = {}
    for name in ("single", "triton"):
        state = [{"m": torch.zeros(n, dtype=torch.uint8 if fmt == "8bit" else torch.bfloat16),
                  "v": torch.zeros(n, dtype=torch.uint8 if fmt == "8bit" else torch.bfloat16),
                  "ms": torch.zeros(-(-n // 256)), "vs": torch.zeros(-(-n // 256)), "step": torch.zeros(())}
                 for n in sizes]
        lists[name] = ([p.clone() for p in params], state)
    seeds = [torch.tensor(param_seed(i)) for i in range(len(sizes))]
    hyper = dict(beta1=0.9, beta2=0.999, lr=0.01, clip_lambda=None, weight_decay=0.01, decouple=True,
                 eps=1e-6, maximize=False, stochastic_rounding=False, nesterov=True, caution=False, lr_max=None)
    for _ in range(3):
        grads = [torch.randn(n, generator=gen) for n in sizes]
        for name, (ps, st) in lists.items():
            scales = ([s["ms"] for s in st], [s["vs"] for s in st]) if fmt == "8bit" else (None, None)
            args = (ps, grads, [s["m"] for s in st], [s["v"] for s in st], *scales, [s["step"] for s in st], seeds)
            if name == "single":
                _state_path.state_adopt(*args, None, None, fmt=fmt, path="single", capturable=False, **hyper)
            else:
                _state_path._launch_cuda([list(a) if a is not None else None for a in args], torch.device("cpu"),
                                         None, None, fmt=fmt, **hyper)
        for (a, sa), (b, sb) in zip(zip(*lists["single"]), zip(*lists["triton"])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            for key in ("m", "v"):
                x, y = sa[key], sb[key]
                if fmt == "8bit":
                    x, y = x.to(torch.int32), y.to(torch.int32)
                    x, y = torch.where(x >= 128, 128 - x, x), torch.where(y >= 128, 128 - y, y)
                else:
                    x, y = x.float(), y.float()
                    assert torch.equal(x, y) or float(((x - y).abs() / y.abs().clamp(min=1e-30)).max()) <= 2.0**-7
                    continue
                assert int((x - y).abs().max()) <= 1
            assert torch.equal(sa["step"], sb["step"])
