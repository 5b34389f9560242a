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
from path_params import path_params, usable_paths

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


@pytest.mark.parametrize("path", ["single-capturable", "foreach-capturable"])
def test_step_body_compiles_with_fullgraph(path: str) -> None:
    """The step's general body without torch's no_grad wrapper (and its deliberate breaks):
    one full graph."""
    kw = {**HP, **usable_paths()[path]}
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
