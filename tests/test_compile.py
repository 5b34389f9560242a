"""torch.compile and ADOPT: one graph per step, no recompilation, fullgraph with capturable.

``torch.optim``'s step decorator (``_use_grad_for_differentiable``) deliberately calls
``torch._dynamo.graph_break()`` around every optimizer's step body (pytorch#104053), so
``fullgraph=True`` on ``opt.step`` fails for ``torch.optim.Adam`` too. What these tests pin down
is that ADOPT's own step body traces as exactly one graph, that the compiled step is not
recompiled as the step count (or a Tensor lr) changes, and that the body and the functional
API compile with ``fullgraph=True`` when ``capturable=True``.

Tiny model and the "eager" backend keep compile time low; one test uses inductor.
"""

from __future__ import annotations

import functools
import inspect
import re
import shutil
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from adopt import ADOPT, DEFAULT_CLIP, adopt
from path_params import FUSED_SKIP, path_params, usable_paths

with warnings.catch_warnings():
    # Compiling imports torch.utils.mkldnn, whose torch.jit.script_method is deprecated in
    # PyTorch 2.13: torch's own warning, raised once at that import.
    warnings.filterwarnings("ignore", message="`torch.jit.script_method` is deprecated", category=DeprecationWarning)
    import torch.utils.mkldnn  # noqa: F401

STEPS = 5
HP = dict(lr=1e-2, weight_decay=1e-2, decouple=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Every test starts with empty dynamo caches, so counts and recompile checks are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _setup(**kw: Any) -> tuple[nn.Module, ADOPT]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, ADOPT(model.parameters(), **kw)


def _batches() -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, 4, generator=gen) for _ in range(STEPS)]


def _train(model: nn.Module, opt: ADOPT, step: Callable[[], Any], batches: list[Tensor]) -> None:
    for x in batches:
        model(x).square().mean().backward()
        step()
        opt.zero_grad()


def _eager_params(**kw: Any) -> list[Tensor]:
    model, opt = _setup(**kw)
    _train(model, opt, opt.step, _batches())
    return [p.detach() for p in model.parameters()]


def _assert_params_equal(model: nn.Module, expected: list[Tensor]) -> None:
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.detach(), e)


@pytest.mark.parametrize("path", path_params())
def test_step_traces_as_one_graph(path: str) -> None:
    model, opt = _setup(**HP, **usable_paths()[path])
    model(_batches()[0]).square().mean().backward()
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("path", path_params())
def test_compiled_step_matches_eager_without_recompiling(path: str) -> None:
    kw = {**HP, **usable_paths()[path]}
    counter = CompileCounter()
    model, opt = _setup(**kw)
    step = torch.compile(opt.step, backend=counter)
    batches = _batches()
    _train(model, opt, step, batches[:1])
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train(model, opt, step, batches[1:])
    assert counter.frame_count == 1, "the step was split into several graphs"
    _assert_params_equal(model, _eager_params(**kw))


VARIANTS = dict(nesterov=True, caution=True, corrected_weight_decay=True)


@pytest.mark.parametrize("path", path_params())
def test_variants_compile_as_one_graph_and_match_eager(path: str) -> None:
    """nesterov, caution (its per-tensor count included) and corrected weight decay."""
    kw = {**HP, **VARIANTS, **usable_paths()[path]}
    counter = CompileCounter()
    model, opt = _setup(**kw)
    step = torch.compile(opt.step, backend=counter)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train(model, opt, step, _batches()[:1])
        _train(model, opt, step, _batches()[1:])
    assert counter.frame_count == 1
    _assert_params_equal(model, _eager_params(**kw))


def test_tensor_lr_schedule_does_not_recompile() -> None:
    """An LR schedule that writes into a Tensor lr keeps the compiled step (a float lr is a guard)."""
    schedule = [1e-2, 8e-3, 5e-3, 3e-3, 1e-3]

    def run(compiled: bool) -> nn.Module:
        model, opt = _setup(lr=torch.tensor(schedule[0]), capturable=True, foreach=True)
        step = torch.compile(opt.step, backend=counter) if compiled else opt.step
        for lr, x in zip(schedule, _batches(), strict=True):
            opt.param_groups[0]["lr"].fill_(lr)
            model(x).square().mean().backward()
            step()
            opt.zero_grad()
        return model

    counter = CompileCounter()
    expected = [p.detach() for p in run(compiled=False).parameters()]
    with torch._dynamo.config.patch(error_on_recompile=True):
        model = run(compiled=True)
    assert counter.frame_count == 1
    _assert_params_equal(model, expected)


LOW_PRECISION = {p: {"state_precision": p, "min_8bit_size": 0} for p in ("bf16", "8bit")}


@pytest.mark.parametrize(
    "variants", [{}, VARIANTS, LOW_PRECISION["bf16"], LOW_PRECISION["8bit"]], ids=["plain", "variants", "bf16", "8bit"]
)
@pytest.mark.parametrize("path", ["single-capturable", "foreach-capturable"])
def test_step_body_compiles_with_fullgraph(path: str, variants: dict[str, Any]) -> None:
    """The step's general body without torch's no_grad wrapper (and its deliberate breaks):
    one full graph, also with nesterov, caution and corrected weight decay, and with bf16 or
    8-bit state."""
    kw = {**HP, **variants, **usable_paths()[path]}
    model, opt = _setup(**kw)
    general = inspect.unwrap(ADOPT._general_step)
    body = torch.compile(functools.partial(general, opt, None, tried_fused=False), fullgraph=True, backend="eager")

    def step() -> None:
        with torch.no_grad():
            body()

    _train(model, opt, step, _batches())
    _assert_params_equal(model, _eager_params(**kw))


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_functional_api_compiles_with_fullgraph(foreach: bool) -> None:
    """``adopt(...)`` on state tensors, capturable: one full graph, no recompiles, same result."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(3, 4), (5,)]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(STEPS)]

    def run(update: Callable[..., None]) -> list[Tensor]:
        params = [torch.ones(s) for s in shapes]
        exp_avgs = [torch.zeros(s) for s in shapes]
        exp_avg_sqs = [torch.zeros(s) for s in shapes]
        steps = [torch.zeros(()) for _ in shapes]
        for row in grads:
            update(params, row, exp_avgs, exp_avg_sqs, steps)
        return params + exp_avgs + exp_avg_sqs + steps

    def update(params: list[Tensor], row: list[Tensor], m: list[Tensor], v: list[Tensor], s: list[Tensor]) -> None:
        adopt(params, row, m, v, s, foreach=foreach, capturable=True, beta1=0.9, beta2=0.999, lr=1e-2,
              clip_lambda=DEFAULT_CLIP, weight_decay=0.0,
              decouple=False, eps=1e-6, maximize=False)

    counter = CompileCounter()
    expected = run(update)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = run(torch.compile(update, fullgraph=True, backend=counter))
    assert counter.frame_count == 1
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_compiled_step_matches_eager() -> None:
    """The default configuration compiled by inductor (the real code generator) matches eager."""
    model, opt = _setup(**HP)
    _train(model, opt, torch.compile(opt.step), _batches())
    for p, e in zip(model.parameters(), _eager_params(**HP), strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)


def _mixed_dtype_run(kw: dict[str, Any], dtype: torch.dtype, step_of: Callable[[ADOPT], Callable[[], Any]]) -> list[Tensor]:
    """STEPS steps of one param group holding a float32 and a ``dtype`` parameter; their values after."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3).to(dtype))]
    opt = ADOPT(params, **HP, **kw)
    step = step_of(opt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", path_params())
def test_compiled_step_with_mixed_dtypes_matches_eager(path: str, dtype: torch.dtype) -> None:
    """A group of two dtypes: while compiling, torch's grouping helper returns one group for
    all of them, so the fused path must split by dtype itself (it once failed with a
    wrong-device error). Every path gives eager's result, in one graph."""
    kw = usable_paths()[path]
    counter = CompileCounter()
    expected = _mixed_dtype_run(kw, dtype, lambda opt: opt.step)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _mixed_dtype_run(kw, dtype, lambda opt: torch.compile(opt.step, backend=counter))
    assert counter.frame_count == 1
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and torch.equal(g, e)


# When a traced call raises, dynamo retries the frames below it and warns that it cannot
# trace the C kernel it meets there; the error that reaches the caller is the step's own.
@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace the builtin:UserWarning")
@pytest.mark.skipif(FUSED_SKIP is not None, reason=str(FUSED_SKIP))
@pytest.mark.parametrize("key", ["grad", "exp_avg", "exp_avg_sq"])
def test_compiled_fused_names_a_tensor_on_another_device(key: str) -> None:
    """A grad or moment on another device than its parameter (meta: the one other device a
    CPU-only machine has) under the compiled fused functional API: an error naming it, and
    nothing changed. (The op once received the meta tensor and was dispatched to its meta
    kernel, which updates nothing: a silent no-op.)"""
    lists = {k: [torch.zeros(3), torch.zeros(3)] for k in ("params", "grad", "exp_avg", "exp_avg_sq")}
    lists["step"] = [torch.ones(()), torch.ones(())]
    lists[key][1] = lists[key][1].to("meta")
    lists["grad"][0].fill_(1.0)
    lists["exp_avg_sq"][0].fill_(1.0)

    def update() -> None:
        adopt(*lists.values(), fused=True, beta1=0.9, beta2=0.999, lr=1e-2, clip_lambda=DEFAULT_CLIP,
              weight_decay=0.0, decouple=False, eps=1e-6, maximize=False)

    message = f"fused ADOPT: the {key} of params[1] is on meta, its parameter on cpu"
    with pytest.raises(ValueError, match=re.escape(message)):
        torch.compile(update, backend="eager")()
    assert torch.equal(lists["params"][0], torch.zeros(3))


@pytest.mark.skipif(FUSED_SKIP is not None, reason=str(FUSED_SKIP))
def test_fused_cpu_op_names_a_param_of_another_dtype() -> None:
    """The compiled step's op takes one dtype group; given two dtypes it says so, naming the
    parameter (not a device error: every tensor is on the CPU)."""
    params = [torch.zeros(3), torch.zeros(3, dtype=torch.float64)]
    lists = [params, *([torch.zeros_like(p) for p in params] for _ in range(3)), [torch.ones(()), torch.ones(())]]
    with pytest.raises(ValueError, match=re.escape("params[1] is torch.float64 but params[0] is torch.float32")):
        torch.ops.adopt.fused_adopt_cpu_(*lists, None, None, 1e-2, None, 0.9, 0.999, 0.0, 1e-6, False, False, 0.25, None, [])


@pytest.mark.parametrize("precision", ["bf16", "8bit"])
@pytest.mark.parametrize("path", ["single", "foreach", "single-capturable", "foreach-capturable"])
def test_low_precision_state_compiles_as_one_graph_and_matches_eager(path: str, precision: str) -> None:
    """state_precision "bf16"/"8bit": decoding, the rule and encoding with stochastic
    rounding trace into one graph without recompiling, with the eager bits."""
    kw = {**HP, **usable_paths()[path], **LOW_PRECISION[precision]}
    counter = CompileCounter()
    model, opt = _setup(**kw)
    step = torch.compile(opt.step, backend=counter)
    batches = _batches()
    _train(model, opt, step, batches[:1])
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train(model, opt, step, batches[1:])
    assert counter.frame_count == 1
    _assert_params_equal(model, _eager_params(**kw))
