"""Memory safety of the fused CPU path, and atomic steps on every path.

Each test reproduces a way libraries and users touch an optimizer (threads, garbage
collection, tensor subclasses, edits between steps) that once crashed the fused CPU path or
made it diverge from the foreach path. Crashes are caught by running the scenario in a
subprocess with a time bound: a segfault is a non-zero exit status, not a dead test run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import weakref
from typing import Any, Callable

import pytest
import torch
from torch import Tensor

from adopt import ADOPT, _fused
from path_params import path_params
from helpers import PATHS

needs_kernel = pytest.mark.skipif(not _fused.fused_cpu_available(), reason="the C kernel was not built")


def run_script(body: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a fresh interpreter; fails the test on a crash, a hang or an error."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


class PassThrough(Tensor):
    """A ``__torch_function__`` subclass as wrapper libraries create: Python runs on every
    attribute read, so the GIL can move to another thread inside the optimizer's C call."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return super().__torch_function__(func, types, args, kwargs or {})


# ---- 1, 2: threads and garbage collection ------------------------------------------------

THREADS_SCRIPT = """
import sys, threading, time, torch
from adopt import ADOPT

class PassThrough(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})

sys.setswitchinterval(1e-6)
torch.set_num_threads(2)
def subclass_optimizer():
    params = [torch.nn.Parameter(torch.randn(37)) for _ in range(50)]
    opt = ADOPT(params, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].as_subclass(PassThrough)
    return opt

def grouped_optimizer():
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(24)]
    opt = ADOPT([{"params": params[i::12]} for i in range(12)], fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    return opt

deadline = time.monotonic() + {seconds}
errors = []
def loop(make):
    try:
        while time.monotonic() < deadline:
            opt = make()
            for _ in range(20):
                opt.step()
    except BaseException as exc:
        errors.append(exc)

threads = [threading.Thread(target=loop, args=(f,)) for f in (subclass_optimizer, grouped_optimizer)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
print("ok")
"""


@needs_kernel
def test_two_threads_with_subclass_state_do_not_crash() -> None:
    """Thread A steps fused ADOPT over 50 params whose exp_avg is a __torch_function__
    subclass while thread B steps another with 12 groups (this segfaulted within seconds
    while the C module kept a global cache of validated tensor lists)."""
    run_script(THREADS_SCRIPT.replace("{seconds}", "4.0"))


GC_SCRIPT = """
import gc, torch
from adopt import ADOPT

torch.set_num_threads(1)
def make(groups, size):
    params = [torch.nn.Parameter(torch.randn(size)) for _ in range(groups)]
    opt = ADOPT([{"params": [p]} for p in params], fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt

inner = make(12, 8)  # stepped by finalizers, in the middle of the outer optimizer's C call

class SteppingFinalizer:
    def __init__(self):
        self.cycle = self  # only the cyclic collector frees it
    def __del__(self):
        inner.step()

class Littering(torch.nn.Parameter):
    # Leaves cyclic garbage behind on every torch function call, here the .grad read that
    # the C call makes: the next allocation collects it, inside the C call.
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs or {})
        SteppingFinalizer()
        return result

gc.set_threshold(1, 1, 1)
for round in range(150):
    params = [Littering(torch.randn(33)) for _ in range(3)]
    outer = ADOPT([{"params": [p]} for p in params], fused=True)
    for _ in range(5):
        for p in params:  # fresh gradients: the old cache refreshed (allocated) here
            p.grad = torch.randn(33)
        SteppingFinalizer()
        outer.step()
print("ok")
"""


@needs_kernel
def test_finalizer_stepping_another_optimizer_during_a_step() -> None:
    """A collection started by an allocation inside the C call runs a finalizer that steps
    another fused optimizer with more tensor lists than the old cache had slots."""
    run_script(GC_SCRIPT)


@needs_kernel
def test_no_weak_references_outlive_a_step() -> None:
    """Nothing the C call keeps refers to a tensor after it returns (the old cache held a weak
    reference to every tensor, ~38 MB per 100k tensors, until evicted)."""
    params = [torch.nn.Parameter(torch.randn(20)) for _ in range(3)]
    opt = ADOPT(params, fused=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    tensors = [t for p in params for t in (p, p.grad, *opt.state[p].values())]
    assert all(weakref.getweakrefcount(t) == 0 for t in tensors)


# ---- 3, 4: edits between steps, atomic failures -------------------------------------------


def two_groups(**kwargs: Any) -> tuple[list[torch.nn.Parameter], ADOPT]:
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(33, 7, generator=gen))
    b = torch.nn.Parameter(torch.randn(5, generator=gen))
    opt = ADOPT([{"params": [a]}, {"params": [b], "weight_decay": 0.1}], **kwargs)
    for _ in range(3):
        a.grad, b.grad = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
        opt.step()
    return [a, b], opt


def snapshot(params: list[torch.nn.Parameter], opt: ADOPT) -> list[Tensor]:
    return [t.clone() for p in params for t in (p.detach(), *opt.state[p].values())]


Edit = Callable[[list[torch.nn.Parameter], ADOPT], None]

EDITS: dict[str, tuple[Edit, str]] = {
    # A state tensor shrunk in place keeps its object and data pointer.
    "exp_avg resized": (lambda ps, o: o.state[ps[0]]["exp_avg"].resize_(20, 7), "its exp_avg is .* shape \\(20, 7\\)"),
    "exp_avg_sq resized": (lambda ps, o: o.state[ps[1]]["exp_avg_sq"].resize_(2), "its exp_avg_sq is .* shape \\(2,\\)"),
    # The same memory and size, another shape.
    "param viewed": (lambda ps, o: setattr(ps[0], "data", ps[0].data.view(7, 33)), "shape \\(7, 33\\)"),
    # The second group's state of another dtype: the first group must not have moved.
    "exp_avg dtype": (
        lambda ps, o: o.state[ps[1]].__setitem__("exp_avg", o.state[ps[1]]["exp_avg"].double()),
        "param_groups\\[1\\].*its exp_avg is a torch.float64",
    ),
    "step not a scalar": (
        lambda ps, o: o.state[ps[1]].__setitem__("step", torch.zeros(2)),
        "step of param_groups\\[1\\].*one-element",
    ),
    # A storage freed under a tensor that still has elements (every kernel would crash).
    "grad storage freed": (lambda ps, o: ps[1].grad.untyped_storage().resize_(0), "storage holds 0 byte"),
    "exp_avg storage freed": (
        lambda ps, o: o.state[ps[1]]["exp_avg"].untyped_storage().resize_(0),
        "exp_avg of param_groups\\[1\\].*storage holds 0 byte",
    ),
}


@pytest.mark.parametrize("path", path_params())
@pytest.mark.parametrize("edit", list(EDITS))
def test_failed_step_changes_nothing(path: str, edit: str) -> None:
    """Every path raises the same error for the same edit, before any group is updated."""
    params, opt = two_groups(**PATHS[path])
    change, message = EDITS[edit]
    change(params, opt)
    before = snapshot(params, opt) if "freed" not in edit else None
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    if before is not None:
        assert all(torch.equal(x, y) for x, y in zip(before, snapshot(params, opt)))
    else:  # the freed tensor cannot be read; the first group's tensors must be untouched
        params2, opt2 = two_groups(**PATHS[path])
        assert torch.equal(params[0].detach(), params2[0].detach())
        assert all(torch.equal(x, y) for x, y in zip(opt.state[params[0]].values(), opt2.state[params2[0]].values()))


@needs_kernel
def test_functional_fused_refuses_freed_storage() -> None:
    """The C kernel itself refuses a tensor whose storage no longer holds its elements."""
    from adopt import adopt

    p, g = torch.randn(8), torch.randn(8)
    m, v, s = torch.zeros(8), torch.ones(8), torch.ones((), dtype=torch.float32)
    g.untyped_storage().resize_(0)
    with pytest.raises(ValueError, match="grads\\[0\\] has 8 element\\(s\\) but its storage does not hold them"):
        adopt([p], [g], [m], [v], [s], fused=True, beta1=0.9, beta2=0.999, lr=1e-3, clip_lambda=None,
              weight_decay=0.0, decouple=False, eps=1e-6, maximize=False)
    assert torch.equal(m, torch.zeros(8)) and float(s) == 1.0


@needs_kernel
def test_functional_fused_refuses_a_param_sharing_memory_with_its_state() -> None:
    from adopt import adopt

    p, g, v = torch.randn(8), torch.randn(8), torch.ones(8)
    before = p.clone()
    with pytest.raises(ValueError, match="params\\[0\\] and exp_avgs\\[0\\] share memory"):
        adopt([p], [g], [p[:]], [v], [torch.ones(())], fused=True, beta1=0.9, beta2=0.999, lr=1e-3,
              clip_lambda=None, weight_decay=0.0, decouple=False, eps=1e-6, maximize=False)
    assert torch.equal(p, before)


# ---- 5: duplicated and overlapping parameters ----------------------------------------------


def duplicated_run(threads: int, **kwargs: Any) -> list[Tensor]:
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(300_000))
    other = torch.nn.Parameter(torch.randn(1000))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = ADOPT([shared, other, shared], **kwargs)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(6):
            gen = torch.Generator().manual_seed(step)
            shared.grad = torch.randn(shared.shape, generator=gen)
            other.grad = torch.randn(other.shape, generator=gen)
            opt.step()
    finally:
        torch.set_num_threads(previous)
    return [shared.detach().clone(), *opt.state[shared].values()]


@needs_kernel
def test_duplicated_parameter_is_deterministic() -> None:
    """The same tensor twice in a group: its two updates run one after the other (as on the
    single-tensor path), never on two threads writing the same memory at once."""
    runs = [duplicated_run(threads=2, fused=True) for _ in range(4)]
    assert all(torch.equal(x, y) for run in runs[1:] for x, y in zip(runs[0], run))
    serial = duplicated_run(threads=1, fused=True)
    assert all(torch.equal(x, y) for x, y in zip(runs[0], serial))
    single = duplicated_run(threads=1, foreach=False)
    for x, y in zip(runs[0], single):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_overlapping_views_of_one_buffer_match_single_tensor() -> None:
    """Params that are overlapping views of one buffer are updated in list order."""
    results = []
    for kwargs in (dict(fused=True), dict(foreach=False)):
        buffer = torch.linspace(-1, 1, 4000)
        views = [buffer[:3000], buffer[1000:]]
        grads = [torch.full((3000,), 0.5), torch.full((3000,), -0.25)]
        state = [(torch.zeros(3000), torch.ones(3000), torch.ones(())) for _ in views]
        from adopt import adopt

        for _ in range(3):
            adopt(views, grads, [s[0] for s in state], [s[1] for s in state], [s[2] for s in state],
                  beta1=0.9, beta2=0.999, lr=1e-2, clip_lambda=None, weight_decay=0.0, decouple=False, eps=1e-6,
                  maximize=False, **kwargs)
        results.append(buffer)
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


# ---- the C module's view of tensors --------------------------------------------------------


@needs_kernel
def test_cdata_access_route_passes_the_fused_tests() -> None:
    """The route used on torch versions that keep the at::Tensor elsewhere in the Python
    object (through TensorBase._cdata) gives the same results (forced by an environment variable)."""
    body = """
    import torch
    import adopt._kernels._adopt_cpu as kernel
    assert kernel.tensor_access() == "cdata", kernel.tensor_access()
    from adopt import ADOPT
    results = []
    for kwargs in (dict(fused=True), dict(foreach=True)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in ((3, 4), (7,), (100,))]
        opt = ADOPT(params, **kwargs)
        for step in range(4):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    print("ok")
    """
    import os

    env = {**os.environ, "ADOPT_CPU_TENSOR_ACCESS": "cdata"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr


@needs_kernel
def test_check_lists_confirms_matching_lists_on_the_meta_device() -> None:
    """check_lists reads metadata only, so it works for tensors without data (any device)."""
    kernel = _fused._cpu_kernel()
    assert kernel is not None
    p = [torch.empty(3, 4), torch.empty(5)]
    lists = [p, [torch.empty_like(t) for t in p], [torch.empty_like(t) for t in p], [torch.empty_like(t) for t in p],
             [torch.zeros(()) for _ in p]]
    assert kernel.check_lists(*lists) == -1
    lists[2][1] = torch.empty(6)
    assert kernel.check_lists(*lists) == 1
    lists[2][1] = torch.empty(5).as_subclass(PassThrough)
    assert kernel.check_lists(*lists) == -1
    lists[3][0] = torch.empty(4, 3).t()  # strided, same shape: fine for the general path
    assert kernel.check_lists(*lists) == -1


# --------------------------------------------------------------------------------------------
# Autograd sees every path's in-place update
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", path_params())
def test_step_bumps_parameter_versions(path: str) -> None:
    """A parameter saved for backward and then stepped makes backward raise on every path,
    as after any in-place torch op: the C kernel bumps the version counters it writes past."""
    p = torch.nn.Parameter(torch.randn(8))
    opt = ADOPT([p], **PATHS[path])
    p.grad = torch.randn(8)
    opt.step()  # the first step only initialises v (and takes the general path)
    for _ in range(2):  # later ones update p (through the one-call path where it exists)
        p.grad = torch.randn(8)
        before = p._version
        opt.step()
        assert p._version > before
    w = torch.randn(8, requires_grad=True)
    loss = (p * w).sum()  # saves p
    p.grad = torch.randn(8)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_kernel
def test_functional_fused_bumps_parameter_versions() -> None:
    from adopt.functional import adopt

    p, g = torch.randn(8), torch.randn(8)
    m, v, step = torch.zeros(8), torch.ones(8), torch.tensor(1.0)
    before, original = p._version, p.clone()
    adopt([p], [g], [m], [v], [step], fused=True, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0,
          decouple=False, maximize=False, clip_lambda=None)
    assert p._version > before and not torch.equal(p, original)


@needs_kernel
def test_one_call_step_leaves_grad_mode_and_runs_hooks() -> None:
    """The one-call step skips torch's grad-mode switch (it needs none) but not the hooks."""
    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.randn(8)
    opt = ADOPT([p], fused=True)
    opt.step()
    seen: list[tuple[str, bool]] = []
    opt.register_step_pre_hook(lambda *_: seen.append(("pre", torch.is_grad_enabled())))
    opt.register_step_post_hook(lambda *_: seen.append(("post", torch.is_grad_enabled())))
    before = p.detach().clone()
    assert opt.step() is None
    assert not torch.equal(p.detach(), before)
    assert seen == [("pre", True), ("post", True)]
    assert opt.step(lambda: 2.5) == 2.5  # with a closure: the general step, which may take the C call too


# --------------------------------------------------------------------------------------------
# Lazily negated views
# --------------------------------------------------------------------------------------------

# x.conj().imag of a complex x is a real tensor whose memory holds -x.imag (is_neg() True).
_NEG_VIEW_RUN = """
import json, sys, torch
from adopt import ADOPT

def neg_view(t):
    z = torch.complex(torch.zeros_like(t), -t)  # imag = -t, so conj().imag reads +t
    view = z.conj().imag
    assert view.is_neg() and torch.equal(view, t)
    return view

def run(kwargs, where):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((3, 4), (7,))]
    opt = ADOPT(params, **kwargs)
    for step in range(5):
        for i, p in enumerate(params):
            g = torch.randn_like(p)
            p.grad = neg_view(g) if where == "grad" and i == 0 else g
        if step == 2 and where == "exp_avg":
            opt.state[params[0]]["exp_avg"] = neg_view(opt.state[params[0]]["exp_avg"].clone())
        if step == 2 and where == "param":
            params[0].data = neg_view(params[0].data.clone())
        opt.step()
    return [p.detach().tolist() for p in params] + [opt.state[p]["exp_avg"].tolist() for p in params]

import adopt._kernels._adopt_cpu as kernel
where = sys.argv[1]
out = {"detection": kernel.neg_view_detection(), "access": kernel.tensor_access(),
       "fused": run(dict(fused=True), where), "single": run(dict(foreach=False), where)}
print(json.dumps(out))
"""


@needs_kernel
@pytest.mark.parametrize("access", ["inline", "cdata"])
@pytest.mark.parametrize("where", ["grad", "exp_avg", "param"])
def test_negated_views_are_read_as_their_values(access: str, where: str) -> None:
    """A grad, state tensor or param that is a negated view gets the same update on the
    fused path as on the single-tensor one (torch's foreach ops refuse negated views in place),
    both where the flag is read from the TensorImpl ('bit') and where
    Tensor.is_neg() is asked ('is_neg', the _cdata route)."""
    import json
    import os

    env = dict(os.environ)
    env.pop("ADOPT_CPU_TENSOR_ACCESS", None)
    if access == "cdata":
        env["ADOPT_CPU_TENSOR_ACCESS"] = "cdata"
    proc = subprocess.run([sys.executable, "-c", _NEG_VIEW_RUN, where], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["access"] == access
    assert out["detection"] == ("bit" if access == "inline" else "is_neg")
    for a, b in zip(out["fused"], out["single"]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
