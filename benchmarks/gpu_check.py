"""Check and time the Triton ADOPT kernel on a CUDA GPU.

    python benchmarks/gpu_check.py --out gpu_check.json [--sweep]

1. Correctness: ``launch_group`` against a float64 torch reference on the GPU, for float64,
   float32, float16 and bfloat16, with uneven per-tensor steps and every option.
2. CUDA graphs: one step captured and replayed several times, compared bit for bit with
   the same steps run eagerly (through ``adopt.ADOPT(fused=True)`` when it supports that,
   and through ``launch_group`` directly, including a table first built inside the capture,
   a device ``lr`` changed between replays, and a replay with ``found_inf`` set).
3. Speed: ``launch_group`` at 100M+ parameters against ``torch.optim.AdamW(fused=True)``
   and against the bandwidth of ``dst.copy_(src)`` moving the same bytes (read + write).

Prints a table and writes everything to ``--out`` as JSON. Exits nonzero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adopt._kernels import triton_adopt  # noqa: E402

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {  # values are O(1): atol is a few ulps of the operands
    torch.float64: (1e-12, 1e-13),
    torch.float32: (2e-6, 1e-6),
    torch.float16: (2e-3, 2e-4),
    torch.bfloat16: (1.6e-2, 2e-3),
}


@dataclass
class Hyper:
    """Hyperparameters of one step; ``clip``: None, a power exponent, or 'tensor'."""

    lr: float = 0.05
    lr_on_device: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.0
    decouple: bool = False
    maximize: bool = False
    clip: object = 0.25
    grad_scale: Optional[float] = None


@dataclass
class State:
    """The tensors one launch updates."""

    params: List[Tensor]
    grads: List[Tensor]
    exp_avgs: List[Tensor]
    exp_avg_sqs: List[Tensor]
    steps: List[Tensor]

    def clone(self) -> "State":
        return State(*[[t.clone() for t in ts] for ts in self.lists()])

    def lists(self) -> Tuple[List[Tensor], ...]:
        return (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps)


@dataclass
class Report:
    """Everything the run found, written as JSON."""

    device: Dict[str, Any] = field(default_factory=dict)
    correctness: List[Dict[str, Any]] = field(default_factory=list)
    graphs: List[Dict[str, Any]] = field(default_factory=list)
    timings: List[Dict[str, Any]] = field(default_factory=list)
    sweep: List[Dict[str, Any]] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)


def make_state(sizes: List[int], steps: List[int], dtype: torch.dtype, seed: int) -> State:
    """Random (never zero) tensors on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(n: int, scale: float, positive: bool = False) -> Tensor:
        x = torch.randn(n, generator=gen, device="cuda", dtype=torch.float64) * scale
        return (x.abs() + 1e-3 if positive else x).to(dtype)

    return State(
        params=[rand(n, 1.0) for n in sizes],
        grads=[rand(n, 2.0) for n in sizes],
        exp_avgs=[rand(n, 0.5) for n in sizes],
        exp_avg_sqs=[rand(n, 0.5, positive=True) for n in sizes],
        steps=[torch.tensor(float(s), device="cuda") for s in steps],
    )


def thresholds(count: int) -> Tensor:
    return torch.tensor([0.5 + 0.25 * i for i in range(count)], device="cuda")


def launch(state: State, h: Hyper, lr: Optional[Tensor] = None,
           found_inf: Optional[Tensor] = None) -> None:
    """One ``launch_group`` call with the options of ``h``."""
    clip: triton_adopt.Clip = None
    if h.clip == "tensor":
        clip = ("tensor", thresholds(len(state.params)))
    elif h.clip is not None:
        clip = ("power", float(h.clip))  # type: ignore[arg-type]
    if lr is None and h.lr_on_device:
        lr = torch.tensor([h.lr], device="cuda", dtype=torch.float64)  # the reference's value
    triton_adopt.launch_group(
        *state.lists(),
        grad_scale=None if h.grad_scale is None else torch.tensor([h.grad_scale], device="cuda"),
        found_inf=found_inf, beta1=h.beta1, beta2=h.beta2, lr=h.lr if lr is None else lr,
        clip=clip, weight_decay=h.weight_decay, decouple=h.decouple, eps=h.eps,
        maximize=h.maximize,
    )


def reference(state: State, h: Hyper) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """The ADOPT rule in float64 from a snapshot taken before the launch."""
    ths = thresholds(len(state.params)).double()
    out: Tuple[List[Tensor], List[Tensor], List[Tensor]] = ([], [], [])
    for i, (p, g, m, v, s_t) in enumerate(zip(*state.lists())):
        p, g, m, v, s = p.double(), g.double(), m.double(), v.double(), float(s_t)
        if h.grad_scale is not None:
            g = g * (1.0 / h.grad_scale)
        if h.maximize:
            g = -g
        if h.weight_decay != 0 and not h.decouple:
            g = g + h.weight_decay * p
        if s == 0:
            v = g * g
        else:
            if h.weight_decay != 0 and h.decouple:
                p = p * (1 - h.lr * h.weight_decay)
            n = g / torch.clamp(v.sqrt(), min=h.eps)
            if h.clip is not None:
                if h.clip == "tensor":
                    c = float(ths[i])
                else:
                    c = s ** float(h.clip)  # type: ignore[arg-type]
                n = n.clamp(-c, c)
            m = m + (1 - h.beta1) * (n - m)
            p = p - h.lr * m
            v = h.beta2 * v + (1 - h.beta2) * g * g
        out[0].append(p)
        out[1].append(m)
        out[2].append(v)
    return out


def check_correctness(report: Report) -> None:
    """Every dtype and option against the float64 reference, two steps each."""
    sizes = [1, 7, 1000, 2048, 5000, 1 << 20, 3 * (1 << 18) + 11]
    steps = [0, 1, 7, 0, 3, 2, 0]
    configs = {
        "default": Hyper(),
        "maximize_l2": Hyper(maximize=True, weight_decay=0.1),
        "decoupled_device_lr": Hyper(weight_decay=0.5, decouple=True, lr_on_device=True),
        "no_clip_scaled": Hyper(clip=None, grad_scale=1024.0),
        "tensor_clip": Hyper(clip="tensor", beta2=0.99, eps=1e-3),
    }
    for d, dtype in enumerate(DTYPES):
        for c, (name, h) in enumerate(configs.items()):
            state = make_state(sizes, steps, dtype, seed=100 * d + c)
            worst = 0.0
            ok = True
            for _ in range(2):
                before = state.clone()
                launch(state, h)
                torch.cuda.synchronize()
                rtol, atol = TOL[dtype]
                for got_list, want_list in zip(
                    (state.params, state.exp_avgs, state.exp_avg_sqs), reference(before, h)
                ):
                    for got, want in zip(got_list, want_list):
                        err = (got.double() - want).abs()
                        bound = atol + rtol * want.abs()
                        worst = max(worst, float((err / bound).max()))
                        ok &= bool((err <= bound).all()) and not bool(got.isnan().any())
                ok &= all(float(a) == float(b) + 1 for a, b in zip(state.steps, before.steps))
                ok &= all(torch.equal(a, b) for a, b in zip(state.grads, before.grads))
            entry = {"dtype": str(dtype), "config": name, "ok": ok, "worst_err_over_tol": worst}
            report.correctness.append(entry)
            if not ok:
                report.failures.append(f"correctness {dtype} {name}: {worst:.3g}x tolerance")


def graph_with_launch_group(report: Report, build_inside_capture: bool) -> None:
    """Capture ``launch_group`` with a device lr and found_inf; replay against eager launches."""
    sizes = [3, 4096, 100_000, 777_777]
    h = Hyper(weight_decay=0.01, decouple=True)
    graphed = make_state(sizes, [0, 0, 0, 0], torch.float32, seed=7)
    eager = graphed.clone()
    lr_dev = torch.tensor([h.lr], device="cuda")
    found = torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernel, takes the s = 0 step
        launch(graphed, h, lr=lr_dev, found_inf=found)
        launch(eager, h, lr=lr_dev, found_inf=found)
    torch.cuda.current_stream().wait_stream(side)
    if build_inside_capture:
        triton_adopt.clear_plan_cache()
    builds = triton_adopt.plan_builds()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(graphed, h, lr=lr_dev, found_inf=found)
    built_in_capture = triton_adopt.plan_builds() - builds
    gen = torch.Generator(device="cuda").manual_seed(11)
    ok = True
    for replay in range(6):
        for g_graph, g_eager in zip(graphed.grads, eager.grads):
            fresh = torch.randn(g_graph.shape, generator=gen, device="cuda")
            g_graph.copy_(fresh)
            g_eager.copy_(fresh)
        lr_dev.fill_(0.05 / (1 + replay))  # read on the device at every replay
        found.fill_(1.0 if replay == 3 else 0.0)
        graph.replay()
        launch(eager, h, lr=lr_dev, found_inf=found)
        torch.cuda.synchronize()
        ok &= all(torch.equal(a, b) for a, b in zip(
            graphed.params + graphed.exp_avgs + graphed.exp_avg_sqs + graphed.steps,
            eager.params + eager.exp_avgs + eager.exp_avg_sqs + eager.steps))
    ok &= float(graphed.steps[0]) == 6.0  # warm-up + 6 replays, one of them skipped by found_inf
    name = "launch_group, table built in capture" if build_inside_capture else "launch_group"
    report.graphs.append({"test": name, "ok": ok, "tables_built_in_capture": built_in_capture})
    if not ok:
        report.failures.append(f"graph replay ({name}) differs from eager steps")


def graph_with_optimizer(report: Report) -> None:
    """Capture ``ADOPT(fused=True).step()`` if the package supports it; compare with eager."""
    try:
        from adopt import ADOPT

        def make() -> Tuple[List[Tensor], "ADOPT"]:
            gen = torch.Generator(device="cuda").manual_seed(3)
            ps = [torch.randn(n, generator=gen, device="cuda", requires_grad=True)
                  for n in (5, 70_000, 1 << 20)]
            return ps, ADOPT(ps, lr=torch.tensor(1e-2, device="cuda"), fused=True,
                             capturable=True, weight_decay=0.01, decouple=True)

        graph_params, graph_opt = make()
        eager_params, eager_opt = make()
    except (ImportError, RuntimeError, ValueError, TypeError) as exc:
        report.graphs.append({"test": "ADOPT(fused=True)", "ok": None, "skipped": repr(exc)})
        return
    gen = torch.Generator(device="cuda").manual_seed(5)

    def set_grads() -> None:
        for a, b in zip(graph_params, eager_params):
            g = torch.randn(a.shape, generator=gen, device="cuda")
            if a.grad is None or b.grad is None:
                a.grad, b.grad = g.clone(), g.clone()
            else:
                a.grad.copy_(g)
                b.grad.copy_(g)

    try:
        set_grads()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: builds state and tables, takes the s = 0 step
            graph_opt.step()
            eager_opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_opt.step()
        ok = True
        for _ in range(5):
            set_grads()
            graph.replay()
            eager_opt.step()
            torch.cuda.synchronize()
            ok &= all(torch.equal(a.detach(), b.detach())
                      for a, b in zip(graph_params, eager_params))
            for a, b in zip(graph_params, eager_params):
                sa, sb = graph_opt.state[a], eager_opt.state[b]
                ok &= all(torch.equal(sa[k], sb[k]) for k in sa)
    except Exception as exc:  # a failing step is a finding to report, not a crash
        report.graphs.append({"test": "ADOPT(fused=True)", "ok": False, "error": repr(exc)})
        report.failures.append(f"ADOPT(fused=True) under graph capture raised {exc!r}")
        return
    report.graphs.append({"test": "ADOPT(fused=True)", "ok": ok})
    if not ok:
        report.failures.append("graph replay of ADOPT(fused=True).step() differs from eager")


def median_ms(fn: Callable[[], object], warmup: int = 5, reps: int = 30) -> float:
    """Median over ``reps`` of CUDA-event timings of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def layout(total: int, count: int) -> List[int]:
    """``count`` uneven sizes (within ±25%) summing to ``total``."""
    weights = [1.0 + 0.5 * ((i * 0.618034) % 1.0 - 0.5) for i in range(count)]
    sizes = [max(1, int(total * w / sum(weights))) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def copy_bandwidth(total_bytes: int) -> Tuple[float, float]:
    """(ms, GB/s) of ``dst.copy_(src)`` whose read + write bytes are ``total_bytes``."""
    src = torch.randn(total_bytes // 8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return ms, moved / ms / 1e6


def time_layout(report: Report, total: int, count: int, dtype: torch.dtype) -> Dict[str, Any]:
    """ADOPT, AdamW(fused=True) and the copy roofline for one layout of ``total`` params."""
    sizes = layout(total, count)
    state = make_state(sizes, [1] * count, dtype, seed=count)
    moved = 7 * total * state.params[0].element_size()  # read p, g, m, v; write p, m, v
    h = Hyper()
    adopt_ms = median_ms(lambda: launch(state, h))
    del state
    adamw_ms: Optional[float] = None
    params = [torch.randn(n, device="cuda", dtype=dtype, requires_grad=True) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    try:
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        adamw_ms = median_ms(opt.step)
    except RuntimeError as exc:  # fused AdamW not available for this dtype/build
        report.failures.append(f"AdamW(fused=True) {dtype}: {exc}")
    del params
    torch.cuda.empty_cache()
    copy_ms, copy_gbs = copy_bandwidth(moved)
    adopt_gbs = moved / adopt_ms / 1e6
    row = {
        "dtype": str(dtype).split(".")[-1], "params": total, "tensors": count,
        "adopt_ms": adopt_ms, "adopt_GBps": adopt_gbs, "copy_ms": copy_ms, "copy_GBps": copy_gbs,
        "adopt_over_copy_bw": adopt_gbs / copy_gbs, "adamw_fused_ms": adamw_ms,
        "adopt_speedup_vs_adamw": None if adamw_ms is None else adamw_ms / adopt_ms,
    }
    report.timings.append(row)
    return row


def sweep(report: Report, total: int, count: int) -> None:
    """fp32 block size and warps per program at one layout (for tuning the module constants)."""
    saved = (dict(triton_adopt._BLOCK_ELEMS), triton_adopt._NUM_WARPS)
    sizes = layout(total, count)
    state = make_state(sizes, [1] * count, torch.float32, seed=1)
    try:
        for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)]:
            triton_adopt._BLOCK_ELEMS[torch.float32] = block
            triton_adopt._NUM_WARPS = warps
            ms = median_ms(lambda: launch(state, Hyper()))
            report.sweep.append({"block": block, "num_warps": warps, "ms": ms,
                                 "GBps": 28 * total / ms / 1e6})
    finally:
        triton_adopt._BLOCK_ELEMS.clear()
        triton_adopt._BLOCK_ELEMS.update(saved[0])
        triton_adopt._NUM_WARPS = saved[1]


def print_report(report: Report) -> None:
    print(f"\n{report.device['name']}  torch {report.device['torch']}  "
          f"triton {report.device['triton']}")
    bad = [c for c in report.correctness if not c["ok"]]
    print(f"correctness: {len(report.correctness) - len(bad)}/{len(report.correctness)} passed; "
          f"worst error/tolerance {max(c['worst_err_over_tol'] for c in report.correctness):.3g}")
    for g in report.graphs:
        status = g.get("skipped") or g.get("error") or ("ok" if g["ok"] else "FAILED")
        print(f"graph: {g['test']}: {status}")
    header = (f"{'dtype':>8} {'params':>11} {'tensors':>7} {'adopt ms':>9} {'GB/s':>7} "
              f"{'copy GB/s':>9} {'of copy':>7} {'AdamW ms':>9} {'AdamW/adopt':>11}")
    print(header)
    for t in report.timings:
        adamw = "-" if t["adamw_fused_ms"] is None else f"{t['adamw_fused_ms']:.3f}"
        ratio = "-" if t["adopt_speedup_vs_adamw"] is None else f"{t['adopt_speedup_vs_adamw']:.2f}"
        print(f"{t['dtype']:>8} {t['params']:>11,} {t['tensors']:>7} {t['adopt_ms']:>9.3f} "
              f"{t['adopt_GBps']:>7.0f} {t['copy_GBps']:>9.0f} {t['adopt_over_copy_bw']:>7.1%} "
              f"{adamw:>9} {ratio:>11}")
    for s in report.sweep:
        print(f"sweep fp32 block={s['block']:>5} warps={s['num_warps']:>2}: "
              f"{s['ms']:.3f} ms {s['GBps']:.0f} GB/s")
    for f in report.failures:
        print("FAILURE:", f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--params", type=int, default=100_000_000, help="parameters to time")
    parser.add_argument("--sweep", action="store_true", help="also sweep fp32 block/warps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device", file=sys.stderr)
        return 2
    if not triton_adopt.triton_available():
        print("gpu_check needs triton", file=sys.stderr)
        return 2
    import triton

    props = torch.cuda.get_device_properties(0)
    report = Report(device={"name": props.name, "sms": props.multi_processor_count,
                            "memory_GiB": props.total_memory / 2**30,
                            "torch": torch.__version__, "triton": triton.__version__})
    check_correctness(report)
    for build_inside in (False, True):
        try:
            graph_with_launch_group(report, build_inside_capture=build_inside)
        except Exception as exc:  # e.g. a torch that cannot pin host memory during capture
            name = f"launch_group (table built in capture: {build_inside})"
            report.graphs.append({"test": name, "ok": False, "error": repr(exc)})
            report.failures.append(f"{name} raised {exc!r}")
    graph_with_optimizer(report)
    for dtype, count in [(torch.float32, 100), (torch.float32, 10), (torch.bfloat16, 100)]:
        time_layout(report, args.params, count, dtype)
    time_layout(report, 1_000_000, 200, torch.float32)
    if args.sweep:
        sweep(report, args.params, 100)
    args.out.write_text(json.dumps(report.__dict__, indent=2, default=str))
    print_report(report)
    fp32_big = [t for t in report.timings if t["dtype"] == "float32" and t["params"] >= 1e8]
    if fp32_big and min(t["adopt_over_copy_bw"] for t in fp32_big) < 0.85:  # type: ignore[operator]
        print("note: below 85% of copy bandwidth at 100M+ fp32 params")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
