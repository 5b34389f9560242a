"""The Triton ADOPT kernel, run by Triton's interpreter on CPU tensors, against a float64 oracle.

The oracle below is written from the update rule alone (not from any ADOPT path of the
package). Each launch is compared with the oracle applied to the state the launch started
from, so low-precision rounding does not accumulate across steps.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import importlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import pytest
import torch
from torch import Tensor

pytest.importorskip("triton")

from adopt._kernels import triton_adopt  # noqa: E402

if not triton_adopt._INTERPRETED:  # imported earlier without the interpreter: compile for it now
    triton_adopt = importlib.reload(triton_adopt)

SIZES = [1, 7, 1000, 5000, 4096]  # single partial chunks, full chunks plus a tail, full only
STEPS = [0, 1, 7, 0, 3]  # uneven per-tensor step counts in one launch
TOL = {  # values are O(1), so atol is a few ulps of the operands (m + (1-b1)(n-m) cancels)
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=2e-6, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3),
}


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


@dataclass
class Group:
    """Tensors of one launch."""

    params: List[Tensor]
    grads: List[Tensor]
    exp_avgs: List[Tensor]
    exp_avg_sqs: List[Tensor]
    steps: List[Tensor]

    def snapshot(self) -> "Group":
        return Group(*[[t.clone() for t in ts] for ts in (self.params, self.grads, self.exp_avgs,
                                                          self.exp_avg_sqs, self.steps)])


def make_group(dtype: torch.dtype, sizes=SIZES, steps=STEPS, seed: int = 0) -> Group:
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int, scale: float = 1.0, positive: bool = False) -> Tensor:
        x = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        return (x.abs() + 1e-3 if positive else x).to(dtype)

    return Group(
        params=[rand(n) for n in sizes],
        grads=[rand(n, 2.0) for n in sizes],
        exp_avgs=[rand(n, 0.5) for n in sizes],
        exp_avg_sqs=[rand(n, 0.5, positive=True) for n in sizes],
        steps=[torch.tensor(float(s)) for s in steps],
    )


def thresholds_for(steps: List[Tensor]) -> Tensor:
    """Arbitrary per-tensor thresholds for the 'tensor' clip mode."""
    return torch.tensor([0.5 + 0.25 * i for i in range(len(steps))], dtype=torch.float32)


def oracle(
    group: Group, cfg: Config, found_inf: bool = False
) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[float]]:
    """The ADOPT rule in float64 on a snapshot; returns params, exp_avgs, exp_avg_sqs, steps."""
    lr = 0.05 if cfg.lr == "tensor" else float(cfg.lr)
    thresholds = thresholds_for(group.steps).double()
    out_p, out_m, out_v, out_s = [], [], [], []
    for i, (p, g, m, v, s) in enumerate(zip(group.params, group.grads, group.exp_avgs,
                                            group.exp_avg_sqs, group.steps)):
        p, g, m, v, s = p.double(), g.double(), m.double(), v.double(), float(s)
        if found_inf:
            out_p.append(p)
            out_m.append(m)
            out_v.append(v)
            out_s.append(s)
            continue
        if cfg.grad_scale is not None:
            g = g * (1.0 / cfg.grad_scale)
        if cfg.maximize:
            g = -g
        if cfg.weight_decay != 0 and not cfg.decouple:
            g = g + cfg.weight_decay * p
        if s == 0:
            v = g * g
        else:
            if cfg.weight_decay != 0 and cfg.decouple:
                decay_lr = lr if cfg.lr_max is None else lr * lr / cfg.lr_max
                p = p * (1 - decay_lr * cfg.weight_decay)
            n = g / torch.clamp(v.sqrt(), min=cfg.eps)
            if cfg.clip is not None:
                c = float(thresholds[i]) if cfg.clip == "tensor" else s ** float(cfg.clip)
                n = n.clamp(-c, c)
            m = m + (1 - cfg.beta1) * (n - m)
            u = cfg.beta1 * m + (1 - cfg.beta1) * n if cfg.nesterov else m
            if cfg.caution:
                agree = (u * g > 0).double()
                u = u * agree / max(float(agree.mean()), 1e-3)
            p = p - lr * u
            v = cfg.beta2 * v + (1 - cfg.beta2) * g * g
        out_p.append(p)
        out_m.append(m)
        out_v.append(v)
        out_s.append(s + 1)
    return out_p, out_m, out_v, out_s


def launch(group: Group, cfg: Config, found_inf: Optional[float] = None) -> None:
    if cfg.clip is None:
        clip = None
    elif cfg.clip == "tensor":
        clip = ("tensor", thresholds_for(group.steps))
    else:
        clip = ("power", float(cfg.clip))
    triton_adopt.launch_group(
        group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, group.steps,
        grad_scale=None if cfg.grad_scale is None else torch.tensor([cfg.grad_scale]),
        found_inf=None if found_inf is None else torch.tensor([found_inf]),
        beta1=cfg.beta1, beta2=cfg.beta2,
        lr=torch.tensor([0.05], dtype=torch.float64) if cfg.lr == "tensor" else cfg.lr,
        clip=clip, weight_decay=cfg.weight_decay, decouple=cfg.decouple, eps=cfg.eps,
        maximize=cfg.maximize, nesterov=cfg.nesterov, caution=cfg.caution, lr_max=cfg.lr_max,
    )


def check_step(group: Group, cfg: Config, found_inf: Optional[float] = None) -> None:
    """Launch once and compare every tensor and step with the oracle."""
    before = group.snapshot()
    launch(group, cfg, found_inf)
    ref_p, ref_m, ref_v, ref_s = oracle(before, cfg, found_inf=bool(found_inf))
    tol = TOL[group.params[0].dtype]
    for i in range(len(group.params)):
        for name, got, want in (("param", group.params[i], ref_p[i]),
                                ("exp_avg", group.exp_avgs[i], ref_m[i]),
                                ("exp_avg_sq", group.exp_avg_sqs[i], ref_v[i])):
            assert got.dtype == before.params[0].dtype
            torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{name} {i}: {m}")
        assert float(group.steps[i]) == ref_s[i], f"step {i}"
    assert all(torch.equal(a, b) for a, b in zip(group.grads, before.grads)), "grads changed"


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_oracle_over_two_steps(dtype: torch.dtype, name: str) -> None:
    group = make_group(dtype)
    check_step(group, CONFIGS[name])  # steps 0,1,7,0,3: both branches in one launch
    check_step(group, CONFIGS[name])  # steps 1,2,8,1,4: first real update after the init step


def test_found_inf_changes_nothing() -> None:
    group = make_group(torch.float32)
    before = group.snapshot()
    launch(group, Config(grad_scale=2.0), found_inf=1.0)
    for got, want in zip(group.params + group.exp_avgs + group.exp_avg_sqs + group.steps,
                         before.params + before.exp_avgs + before.exp_avg_sqs + before.steps):
        assert torch.equal(got, want)
    check_step(group, Config(grad_scale=2.0), found_inf=0.0)  # a clean step still updates


def test_unaligned_addresses() -> None:
    """Views starting one element into their storage take the unhinted variant."""
    sizes = [1000, 4500]
    group = make_group(torch.float32, sizes=sizes, steps=[2, 0])
    shifted = Group(*[[torch.cat([t.new_zeros(1), t])[1:] for t in ts] for ts in (
        group.params, group.grads, group.exp_avgs, group.exp_avg_sqs)], group.steps)
    assert shifted.params[0].data_ptr() % 16 != 0
    check_step(shifted, Config())


def test_empty_tensor_still_counts_a_step() -> None:
    group = make_group(torch.float32, sizes=[0, 5], steps=[4, 4])
    check_step(group, Config())
    assert [float(s) for s in group.steps] == [5.0, 5.0]


def test_table_is_cached() -> None:
    triton_adopt.clear_plan_cache()
    group = make_group(torch.float32, sizes=[10, 3000], steps=[1, 2])
    builds = triton_adopt.plan_builds()
    launch(group, Config())
    launch(group, Config(weight_decay=0.1))  # other hyperparameters: same table
    assert triton_adopt.plan_builds() == builds + 1
    group.grads = [g.clone() for g in group.grads]  # new addresses: a new table
    launch(group, Config())
    assert triton_adopt.plan_builds() == builds + 2


def test_rejects_bad_input() -> None:
    group = make_group(torch.float32, sizes=[6, 6], steps=[1, 1])
    kwargs = dict(grad_scale=None, found_inf=None, beta1=0.9, beta2=0.999, lr=0.1, clip=None,
                  weight_decay=0.0, decouple=False, eps=1e-6, maximize=False)
    strided = torch.zeros(12)[::2]
    with pytest.raises(ValueError, match="contiguous"):
        triton_adopt.launch_group([strided, group.params[1]], group.grads, group.exp_avgs,
                                  group.exp_avg_sqs, group.steps, **kwargs)
    with pytest.raises(ValueError, match="differ in length"):
        triton_adopt.launch_group(group.params, group.grads[:1], group.exp_avgs,
                                  group.exp_avg_sqs, group.steps, **kwargs)
    with pytest.raises(ValueError, match="clip"):
        triton_adopt.launch_group(group.params, group.grads, group.exp_avgs, group.exp_avg_sqs,
                                  group.steps, **{**kwargs, "clip": ("cosine", 1.0)})
    with pytest.raises(ValueError, match="grad 1"):
        triton_adopt.launch_group(group.params, [group.grads[0], group.grads[1].double()],
                                  group.exp_avgs, group.exp_avg_sqs, group.steps, **kwargs)
    with pytest.raises(TypeError, match="supports"):
        ints = [torch.zeros(3, dtype=torch.int32)]
        triton_adopt.launch_group(ints, ints, ints, ints, [torch.tensor(1.0)], **kwargs)


SM90_COMPILE = r"""
import json
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from adopt._kernels import triton_adopt as ta

assert not ta._INTERPRETED


def compile_for_h100(dtype, aligned, tensors, rounded=False, step_pass=0, nesterov=False):
    ptr = "*fp32" if tensors else "constexpr"
    signature = {
        "rows_ptr": "*i64", "blocks_ptr": "*i32", "counters_ptr": "*i32", "kept_ptr": "*i64", "lr_ptr": ptr,
        "grad_scale_ptr": ptr, "found_inf_ptr": ptr, "thresholds_ptr": ptr,
        "seeds_ptr": "*i64" if rounded else "constexpr",
        **{name: "fp64" for name in ("lr_value", "beta1", "beta2", "weight_decay", "eps",
                                      "clip_exponent", "lr_max")},
    }
    constexprs = {
        "DTYPE": ta._TL_DTYPES[dtype],
        "COMPUTE": tl.float64 if dtype == torch.float64 else tl.float32,
        "ALIGNED": aligned, "WD_MODE": 1 if tensors else 2, "CLIP_MODE": 2 if tensors else 1,
        "MAXIMIZE": tensors, "BLOCK": ta._BLOCK_ELEMS[dtype],
        "TAIL": ta._BLOCK_ELEMS[dtype] // ta._TAIL_SPLIT, "ROW": ta._ROW, "ROUNDED": rounded,
        "NESTEROV": nesterov, "CORRECTED": tensors, "PASS": step_pass,
    }
    constexprs.update({k: None for k, v in signature.items() if v == "constexpr"})
    signature.update({k: "constexpr" for k in constexprs})
    kernel = triton.compile(
        ASTSource(ta._adopt_kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
        options={"num_warps": ta._NUM_WARPS, "enable_fp_fusion": not rounded and step_pass == 0},
    )
    ptx = kernel.asm["ptx"]
    return {
        "wide_loads": ptx.count("ld.global.v4.b32") + ptx.count("ld.global.v2.b64"),
        "atomics": ptx.count("atom.global.gpu.acq_rel.add"),
        "cubin_bytes": len(kernel.asm["cubin"]),
    }


out = {str(d): compile_for_h100(d, True, True) for d in ta._TL_DTYPES}
out["unaligned"] = compile_for_h100(torch.float32, False, False)
for d in (torch.bfloat16, torch.float16):  # stochastic rounding of the parameter write-back
    out[f"{d}-rounded"] = compile_for_h100(d, True, True, rounded=True)
for d in (torch.float32, torch.bfloat16):  # a cautious step's two passes, Nesterov on
    out[f"{d}-caution-moments"] = compile_for_h100(d, True, True, step_pass=1, nesterov=True)
    out[f"{d}-caution-apply"] = compile_for_h100(d, True, True, rounded=d == torch.bfloat16, step_pass=2,
                                                  nesterov=True)
print(json.dumps(out))
"""


def test_compiles_for_h100() -> None:
    """The real compiler (no GPU needed) builds every dtype for sm_90 with 16-byte accesses."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(triton_adopt.__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", SM90_COMPILE], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for name, info in result.items():
        # One step-completion atomic per program (none in a cautious step's first pass).
        assert info["cubin_bytes"] > 0 and info["atomics"] == (0 if "moments" in name else 1), (name, info)
        assert (info["wide_loads"] > 0) == (name != "unaligned"), (name, info)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_matches_the_torch_paths(dtype: torch.dtype) -> None:
    """With seeds the kernel rounds the parameter as adopt/_random.py does: on inputs where
    every path's moments are exact (gradients +-1, v = 1, m = 0 and beta1 = 0.5, so the new
    m is +-0.5; the interpreter converts float32 to bfloat16 by truncation, so an inexact m
    would differ), bit for bit the single-tensor path's result, for tensors of several sizes
    and step counts."""
    import adopt

    gen = torch.Generator().manual_seed(0)
    sizes, steps = [5000, 7, 2048, 300], [1.0, 4.0, 9.0, 2.0]
    p = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    g = [(torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(dtype) for n in sizes]
    m = [torch.zeros(n, dtype=dtype) for n in sizes]
    seeds = [torch.tensor(adopt._random.param_seed(i)) for i in range(len(sizes))]
    results = []
    for use_triton in (False, True):
        tensors = [[t.clone() for t in ts] for ts in (p, g, m)] + [[torch.ones(n, dtype=dtype) for n in sizes],
                                                                   [torch.tensor(s) for s in steps]]
        if use_triton:
            triton_adopt.launch_group(*tensors, grad_scale=None, found_inf=None, beta1=0.5, beta2=0.999, lr=1e-3,
                                      clip=None, weight_decay=0.0, decouple=False, eps=1e-6, maximize=False,
                                      seeds=torch.stack(seeds))
        else:
            adopt.functional.adopt(*tensors, foreach=False, beta1=0.5, beta2=0.999, lr=1e-3, clip_lambda=None,
                                   weight_decay=0.0, decouple=False, eps=1e-6, maximize=False,
                                   stochastic_rounding=True, seeds=seeds)
        results.append(tensors[0])
    for a, b in zip(*results):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert (results[1][0] != p[0]).sum() > 100  # the updates (lr/2, below half an ulp) did land
