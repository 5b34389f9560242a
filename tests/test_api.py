"""The optimizer as a torch.optim citizen: errors, state, serialisation, hooks, AMP, autograd."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import adopt as adopt_pkg
from adopt import ADOPT, DEFAULT_CLIP, PowerClip, adopt
from adopt._foreach import foreach_adopt
from helpers import PATHS, make_problem, real64, run_adopt, run_oracle
from oracle import OracleState, oracle_step, quarter_power


def _param(n: int = 3) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(n))


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), r"Invalid learning rate: -1.0 \(lr must be a finite number >= 0\)"),
        (dict(lr=float("inf")), r"Invalid learning rate: inf \(lr must be a finite number >= 0\)"),
        (dict(lr="fast"), "Invalid learning rate: fast"),
        (dict(eps=-1e-8), r"Invalid epsilon value: -1e-08 \(eps must be"),
        (dict(betas=(1.0, 0.9)), r"index 0: 1.0 \(betas\[0\] must be in \[0, 1\)\)"),
        (dict(betas=(0.9, -0.1)), r"index 1: -0.1 \(betas\[1\] must be"),
        (dict(betas=(0.9,)), r"betas=\(0.9,\)"),
        (dict(betas=(torch.tensor(0.9), torch.tensor(0.99))), "ADOPT takes betas as floats"),
        (dict(weight_decay=-0.1), r"Invalid weight_decay value: -0.1 \(weight_decay must be"),
        (dict(weight_decay=float("inf")), "Invalid weight_decay value: inf"),
        (dict(lr=torch.tensor([0.1, 0.2])), r"1-element, got shape \(2,\)"),
        (dict(lr=torch.tensor(0.1), foreach=True), "capturable=False and foreach=True"),
        (dict(clip_lambda=0.5), "clip_lambda must be callable or None, got 0.5"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ADOPT([_param()], **kwargs)


def test_add_param_group_validates():
    opt = ADOPT([_param()])
    with pytest.raises(ValueError, match="Invalid learning rate: -0.5"):
        opt.add_param_group({"params": [_param()], "lr": -0.5})


@pytest.mark.parametrize("kwargs", [dict(fused=True, foreach=True), dict(fused=True, differentiable=True)])
def test_fused_with_foreach_or_differentiable_is_an_error(kwargs):
    with pytest.raises(RuntimeError, match="fused"):
        ADOPT([_param()], **kwargs)


def _fused_on_meta(cls):
    p = torch.nn.Parameter(torch.randn(3, device="meta"))
    opt = cls([p], fused=True)
    p.grad = torch.randn(3, device="meta")
    opt.step()


def _fused_on_int64(cls):
    p = torch.zeros(3, dtype=torch.int64)
    opt = cls([p], fused=True)
    p.grad = torch.zeros(3, dtype=torch.int64)
    opt.step()


def _sparse_gradient(cls):
    p = _param()
    opt = cls([p])
    p.grad = torch.randn(3).to_sparse()
    opt.step()


def _tensor_lr_set_on_a_foreach_group(cls):
    p = _param()
    opt = cls([p], foreach=True)
    opt.param_groups[0]["lr"] = torch.tensor(0.1)
    p.grad = torch.randn(3)
    opt.step()


def _differentiable_step_that_requires_grad(cls):
    p = _param()
    opt = cls([p], differentiable=True)
    opt.state[p] = {"step": torch.tensor(1.0, requires_grad=True), "exp_avg": torch.zeros(3),
                    "exp_avg_sq": torch.ones(3)}
    p.grad = torch.randn(3)
    opt.step()


def _construct(params=None, **kwargs):
    return lambda cls: cls([_param()] if params is None else params, **kwargs)


# Every condition under which torch.optim.Adam (torch/optim/adam.py and optimizer.py) raises an
# error of its own and ADOPT raises too. Where only one of them raises, nothing is compared:
# ADOPT also rejects an infinite lr, eps or weight_decay, betas as two Tensors and fused
# dtypes its kernels lack (float8, where Adam's kernel fails itself), and accepts int betas,
# capturable on the CPU and complex parameters with fused=True.
TORCH_ERROR_CONDITIONS = {
    "negative lr": _construct(lr=-0.1),
    "nan lr": _construct(lr=float("nan")),
    "negative Tensor lr": _construct(lr=torch.tensor(-0.1)),
    "Tensor lr of 2 elements": _construct(lr=torch.tensor([0.1, 0.2])),
    "Tensor lr of 2 elements with foreach": _construct(lr=torch.tensor([0.1, 0.2]), foreach=True),
    "Tensor lr with foreach": _construct(lr=torch.tensor(0.1), foreach=True),
    "negative eps": _construct(eps=-1e-8),
    "beta1 = 1": _construct(betas=(1.0, 0.9)),
    "negative beta1": _construct(betas=(-0.1, 0.9)),
    "beta2 = 1": _construct(betas=(0.9, 1.0)),
    "both betas = 1": _construct(betas=(1.0, 1.0)),
    "negative weight_decay": _construct(weight_decay=-1),
    "negative lr and weight_decay": _construct(lr=-1.0, weight_decay=-0.5),
    "negative eps and beta1 = 2": _construct(eps=-1.0, betas=(2.0, 0.9)),
    "float beta1, Tensor beta2": _construct(betas=(0.9, torch.tensor(0.99))),
    "Tensor beta1, float beta2": _construct(betas=(torch.tensor(0.9), 0.99)),
    "Tensor betas with foreach": _construct(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True),
    "fused and foreach": _construct(fused=True, foreach=True),
    "fused and differentiable": _construct(fused=True, differentiable=True),
    "fused, foreach and differentiable": _construct(fused=True, foreach=True, differentiable=True),
    "no params, fused and foreach": _construct(params=[], fused=True, foreach=True),
    "fused on meta": _fused_on_meta,
    "fused on int64": _fused_on_int64,
    "sparse gradient": _sparse_gradient,
    "Tensor lr set on a foreach group": _tensor_lr_set_on_a_foreach_group,
    "differentiable with a step that requires grad": _differentiable_step_that_requires_grad,
}


def _error(action, cls):
    with pytest.raises(Exception) as info:
        action(cls)
    return info.type, str(info.value)


@pytest.mark.parametrize("condition", TORCH_ERROR_CONDITIONS)
def test_errors_begin_with_torch_adams_words(condition):
    """PyTorch's optimizer tests match these texts: ADOPT raises Adam's exception type with a
    message that begins with Adam's, read from a live torch.optim.Adam. Two are worded for
    ADOPT: the sparse-gradient error names ADOPT where Adam names itself, and the fused check
    lists the devices ADOPT's kernels run on where Adam lists its own."""
    action = TORCH_ERROR_CONDITIONS[condition]
    torch_type, torch_text = _error(action, torch.optim.Adam)
    ours_type, ours_text = _error(action, ADOPT)
    assert ours_type is torch_type
    if condition == "sparse gradient":
        torch_text = torch_text.replace("Adam does not", "ADOPT does not", 1)
    if condition.startswith("fused on"):
        head, _, torch_tail = torch_text.partition("] ")
        torch_head = head.split(": [")[0] + ": ["
        assert ours_text.startswith(torch_head), (ours_text, torch_text)
        assert ours_text.startswith(f"{torch_head}'cpu', 'cuda'] {torch_tail}"), (ours_text, torch_text)
    else:
        assert ours_text.startswith(torch_text), (ours_text, torch_text)


def test_sparse_gradient_names_the_parameter_and_changes_nothing():
    dense, sparse_p = _param(4), torch.nn.Parameter(torch.randn(5, 2))
    opt = ADOPT([{"params": [dense]}, {"params": [_param(), sparse_p]}])
    before = [dense.detach().clone(), sparse_p.detach().clone()]
    dense.grad = torch.randn(4)
    sparse_p.grad = torch.randn(5, 2).to_sparse()
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[1\] \(shape \(5, 2\)\)"):
        opt.step()
    assert torch.equal(dense, before[0]) and torch.equal(sparse_p, before[1])
    assert len(opt.state) == 0


def _functional_args(lr=1e-3, **kw):
    p = torch.randn(3)
    base = dict(beta1=0.9, beta2=0.99, lr=lr, clip_lambda=None, weight_decay=0.0, decouple=False, eps=1e-6,
                maximize=False)
    base.update(kw)
    return [p], [torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)], base


def test_functional_rejects_non_tensor_steps():
    params, grads, m, v, kw = _functional_args()
    with pytest.raises(RuntimeError, match="singleton tensors"):
        adopt(params, grads, m, v, [1.0], **kw)


def test_functional_tensor_lr_with_foreach_needs_capturable():
    params, grads, m, v, kw = _functional_args(lr=torch.tensor(0.1))
    with pytest.raises(RuntimeError, match="capturable=False and foreach=True"):
        adopt(params, grads, m, v, [torch.tensor(1.0)], foreach=True, **kw)
    assert torch.equal(m[0], torch.zeros(3))


@pytest.mark.parametrize("flag", ["foreach", "fused"])
def test_torchscript_with_foreach_or_fused_is_an_error(monkeypatch, flag):
    params, grads, m, v, kw = _functional_args()
    monkeypatch.setattr(torch.jit, "is_scripting", lambda: True)
    with pytest.raises(RuntimeError, match=f"torch.jit.script not supported with {flag}"):
        adopt(params, grads, m, v, [torch.tensor(0.0)], **{flag: True}, **kw)


def test_foreach_tensor_lr_rejected_at_step_when_group_changed():
    p = _param()
    opt = ADOPT([p], foreach=True)
    opt.param_groups[0]["lr"] = torch.tensor(0.1)
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="capturable=False and foreach=True"):
        opt.step()
    assert len(opt.state) == 0


# ---------------------------------------------------------------- state and serialisation

def _train(opt: ADOPT, params, grads):
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone().to(p.dtype)
        opt.step()


@pytest.mark.parametrize("path", PATHS)
def test_state_dict_round_trip_resumes_bit_exactly(path):
    init, grads = make_problem(8, dtype=torch.float32, seed=5)
    reference, _ = run_adopt(init, grads, lr=0.05, **PATHS[path])

    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = ADOPT(params, lr=0.05, **PATHS[path])
    _train(opt, params, grads[:4])
    saved = io.BytesIO()
    torch.save({"model": [p.detach() for p in params], "opt": opt.state_dict()}, saved)
    saved.seek(0)
    ckpt = torch.load(saved, weights_only=True)

    resumed = [torch.nn.Parameter(p.clone()) for p in ckpt["model"]]
    opt2 = ADOPT(resumed, lr=0.05, **PATHS[path])
    opt2.load_state_dict(ckpt["opt"])
    _train(opt2, resumed, grads[4:])
    for a, b in zip(reference, resumed):
        assert torch.equal(a, b.detach())


def test_state_dict_keys_match_the_authors_layout():
    p = _param()
    opt = ADOPT([p])
    p.grad = torch.randn(3)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(sd["param_groups"][0]) == {
        "lr", "betas", "eps", "weight_decay", "decouple", "maximize", "foreach", "capturable",
        "differentiable", "fused", "stochastic_rounding", "nesterov", "caution", "corrected_weight_decay", "lr_max",
        "state_precision", "min_8bit_size", "params",
    }


@pytest.mark.parametrize("float_steps", [False, True])
def test_loads_a_checkpoint_in_the_authors_format_and_continues_exactly(float_steps):
    """A state_dict laid out as torch-adopt/dicee save it, produced here by the oracle."""
    hp = dict(lr=0.02, beta1=0.9, beta2=0.999, eps=1e-6, clip=quarter_power, weight_decay=0.01, decouple=True,
              maximize=False)
    init, grads = make_problem(9, seed=11)
    states = run_oracle(init, grads[:5], **hp)
    checkpoint = {
        "state": {
            i: {"step": float(st.s) if float_steps else torch.tensor(float(st.s)), "exp_avg": st.m.clone(),
                "exp_avg_sq": st.v.clone()}
            for i, st in enumerate(states)
        },
        "param_groups": [{
            "lr": 0.02, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "decouple": True,
            "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
            "params": [0, 1, 2, 3],
        }],
    }
    params = [torch.nn.Parameter(st.p.clone()) for st in states]
    opt = ADOPT(params)  # hyperparameters come from the checkpoint
    opt.load_state_dict(checkpoint)
    assert all(torch.is_tensor(opt.state[p]["step"]) for p in params)
    _train(opt, params, grads[5:])
    for row in grads[5:]:
        for st, g in zip(states, row):
            if g is not None:
                oracle_step(st, g, **hp)
    for p, st in zip(params, states):
        torch.testing.assert_close(real64(p), st.p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("clone", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("clip", [DEFAULT_CLIP, PowerClip(0.5), None])
def test_whole_optimizer_survives_copies(clone, clip):
    init, grads = make_problem(6, dtype=torch.float32, seed=2)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = ADOPT(params, lr=0.05, clip_lambda=clip)
    _train(opt, params, grads[:3])
    if clone == "deepcopy":
        twin = copy.deepcopy(opt)
    elif clone == "pickle":
        twin = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert twin.clip_lambda == clip
    twin_params = twin.param_groups[0]["params"]
    _train(opt, params, grads[3:])
    _train(twin, twin_params, grads[3:])
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


def test_setstate_upgrades_old_pickles():
    p = _param()
    opt = ADOPT([p], capturable=False)
    old = {
        "defaults": {"lr": 1e-3, "betas": (0.9, 0.9999), "eps": 1e-6, "weight_decay": 0.0},
        "state": {p: {"step": 4.0, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.ones(3)}},
        "param_groups": [{"params": [p], "lr": 1e-3, "betas": (0.9, 0.9999), "eps": 1e-6, "weight_decay": 0.0}],
    }
    opt.__setstate__(old)
    group = opt.param_groups[0]
    assert group["decouple"] is False and group["foreach"] is None and group["fused"] is None
    assert opt.clip_lambda == DEFAULT_CLIP
    step = opt.state[p]["step"]
    assert torch.is_tensor(step) and step.item() == 4.0 and step.device.type == "cpu"
    p.grad = torch.randn(3)
    opt.step()
    assert opt.state[p]["step"].item() == 5.0


def test_load_state_dict_keeps_the_clip_schedule():
    p = _param()
    opt = ADOPT([p], clip_lambda=PowerClip(0.5))
    opt.load_state_dict(ADOPT([_param()]).state_dict())
    assert opt.clip_lambda == PowerClip(0.5)


def test_default_clip_is_picklable_and_printable():
    assert repr(DEFAULT_CLIP) == "PowerClip(exponent=0.25)"
    assert pickle.loads(pickle.dumps(DEFAULT_CLIP)) == DEFAULT_CLIP
    assert DEFAULT_CLIP(16) == 2.0
    assert torch.equal(DEFAULT_CLIP(torch.tensor([1.0, 16.0])), torch.tensor([1.0, 2.0], dtype=torch.float64))


# ---------------------------------------------------------------- PyTorch integration

def test_param_groups_use_their_own_hyperparameters():
    init, grads = make_problem(6, seed=7)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = ADOPT([{"params": params[:2], "lr": 0.1, "betas": (0.5, 0.9)},
                 {"params": params[2:], "weight_decay": 0.2, "decouple": True, "clip_lambda": None}], lr=0.01)
    _train(opt, params, grads)
    base = dict(eps=1e-6, clip=quarter_power, maximize=False)
    first = run_oracle(init[:2], [r[:2] for r in grads], lr=0.1, beta1=0.5, beta2=0.9, weight_decay=0.0,
                       decouple=False, **base)
    second = run_oracle(init[2:], [r[2:] for r in grads], lr=0.01, beta1=0.9, beta2=0.9999, weight_decay=0.2,
                        decouple=True, **base)
    for p, st in zip(params, first + second):
        torch.testing.assert_close(real64(p), st.p, rtol=1e-12, atol=1e-14)


def test_lr_scheduler_drives_the_learning_rate():
    init, grads = make_problem(6, seed=8)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = ADOPT(params, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    states = [OracleState(p) for p in init]
    for t, row in enumerate(grads):
        lr = opt.param_groups[0]["lr"]
        assert lr == 0.1 * 0.5 ** (t // 2)
        _train(opt, params, [row])
        for st, g in zip(states, row):
            if g is not None:
                oracle_step(st, g, lr=lr, beta1=0.9, beta2=0.9999, eps=1e-6, clip=quarter_power, weight_decay=0.0,
                            decouple=False, maximize=False)
        sched.step()
    for p, st in zip(params, states):
        torch.testing.assert_close(real64(p), st.p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    p = _param()
    opt = ADOPT([p])
    p.grad = torch.randn(3)
    opt.step()
    opt.zero_grad(set_to_none=set_to_none)
    if set_to_none:
        assert p.grad is None
    else:
        assert torch.equal(p.grad, torch.zeros(3))
    opt.step()
    assert opt.state[p]["step"].item() == (1.0 if set_to_none else 2.0)


def test_step_returns_closure_loss_and_hooks_run():
    p = _param()
    opt = ADOPT([p])
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load") or sd)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.equal(loss, (p.detach() ** 2).sum())  # first step leaves p unchanged
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd", "load"]


@pytest.mark.parametrize("path", PATHS)
def test_grad_scaler_unscales_and_skips_infs(path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    reference = copy.deepcopy(model)
    opt = ADOPT(model.parameters(), lr=0.1, **PATHS[path])
    ref_opt = ADOPT(reference.parameters(), lr=0.1, **PATHS[path])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 4)
    for step in range(4):
        opt.zero_grad()
        ref_opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        reference(x).square().mean().backward()
        if step == 2:
            model.weight.grad[0, 0] = float("inf")
            before = copy.deepcopy(opt.state_dict())
            params_before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
            after = opt.state_dict()
            for k in before["state"]:
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    assert torch.equal(before["state"][k][key], after["state"][k][key])
        else:
            ref_opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- capturable and differentiable

@pytest.mark.parametrize("path", ["single-capturable", "foreach-capturable"])
def test_capturable_step_never_reads_a_tensor_on_the_host(monkeypatch, path):
    init, grads = make_problem(5, dtype=torch.float32)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = ADOPT(params, lr=torch.tensor(0.01), weight_decay=0.1, decouple=True, **PATHS[path])

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside a capturable step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    _train(opt, params, grads)
    monkeypatch.undo()
    expected, _ = run_adopt(init, grads, lr=0.01, weight_decay=0.1, decouple=True, foreach=False)
    for a, b in zip(expected, params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)


def test_capturable_calls_custom_schedule_with_device_tensor():
    seen = []

    def schedule(step):
        seen.append(step)
        return step ** 0.5

    for path in ("single-capturable", "foreach-capturable", "single", "foreach"):
        seen.clear()
        p = _param()
        opt = ADOPT([p], clip_lambda=schedule, **PATHS[path])
        for _ in range(3):
            p.grad = torch.randn(3)
            opt.step()
        kinds = {type(s) for s in seen}
        assert kinds == ({torch.Tensor} if "capturable" in path else {int}), path


def test_gradcheck_through_several_steps_of_the_optimizer():
    def run(p0, g1, g2, g3, lr):
        p = p0.clone()
        opt = ADOPT([p], lr=lr, betas=(0.8, 0.7), clip_lambda=PowerClip(0.25), differentiable=True,
                    weight_decay=0.1, decouple=True)
        for g in (g1, g2, g3):
            p.grad = g
            opt.step()
        state = opt.state[p]
        return p, state["exp_avg"], state["exp_avg_sq"]

    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(4)]
    inputs.append(torch.tensor(0.1, dtype=torch.float64))
    for t in inputs:
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(run, tuple(inputs))


def test_gradcheck_functional_with_l2_and_maximize():
    def run(p0, g1, g2, lr):
        p, m, v, s = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0), torch.tensor(0.0)
        for g in (g1, g2, g1):
            adopt([p], [g], [m], [v], [s], differentiable=True, beta1=0.9, beta2=0.5, lr=lr, clip_lambda=None,
                  weight_decay=0.05, decouple=False, eps=1e-6, maximize=True)
        return p, m, v

    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    inputs.append(torch.tensor([[0.2]], dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(run, tuple(inputs))


def test_version_comes_from_package_metadata():
    from importlib.metadata import version

    assert adopt_pkg.__version__ == version("adopt-optim")


# ---------------------------------------------------------------- path choice

def test_automatic_path_choice(monkeypatch):
    from adopt import _fused, functional

    cpu = [torch.nn.Parameter(torch.randn(3))]
    assert functional.default_path(cpu, differentiable=True, lr=1e-3, capturable=False) == "single"
    monkeypatch.setattr(functional, "fused_cpu_available", lambda: True)
    assert functional.default_path(cpu, differentiable=False, lr=1e-3, capturable=False) == "fused"
    assert functional.default_path([torch.zeros(3, dtype=torch.int64)], False, 1e-3, False) == "single"
    monkeypatch.setattr(functional, "fused_cpu_available", lambda: False)
    monkeypatch.setattr(_fused, "_fallback_warned", False)
    with pytest.warns(_fused.FusedFallbackWarning, match="runs the foreach path on CPU"):
        assert functional.default_path(cpu, differentiable=False, lr=1e-3, capturable=False) == "foreach"
    # foreach cannot take a Tensor lr without capturable; other tensor types stay single-tensor
    assert functional.default_path(cpu, differentiable=False, lr=torch.tensor(0.1), capturable=False) == "single"
    assert functional.default_path([torch.zeros(3, dtype=torch.int64)], False, 1e-3, False) == "single"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert functional.default_path(cpu, differentiable=False, lr=1e-3, capturable=False) == "foreach"
    assert functional.default_path(cpu, differentiable=False, lr=torch.tensor(0.1), capturable=False) == "single"


def test_default_optimizer_without_the_kernel_runs_foreach_after_one_warning(monkeypatch):
    """No compiler at install: ADOPT(params) says so once and runs foreach, which gives the
    single-tensor results bit for bit."""
    from adopt import _fused, functional

    monkeypatch.setattr(functional, "fused_cpu_available", lambda: False)
    monkeypatch.setattr(_fused, "_CPU_KERNEL", None)  # the one-call CPU step declines too
    monkeypatch.setattr(_fused, "_fallback_warned", False)
    calls = []
    monkeypatch.setattr(functional, "foreach_adopt", lambda *a, **k: (calls.append(1), foreach_adopt(*a, **k)))
    torch.manual_seed(0)
    init = [torch.randn(4, 3), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(4)]
    results = []
    for kw in ({}, {"foreach": False}):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = ADOPT(params, **kw)
        for step, row in enumerate(grads):
            for p, g in zip(params, row):
                p.grad = g.clone()
            if not kw and step == 0:
                with pytest.warns(_fused.FusedFallbackWarning, match="adopt info"):
                    opt.step()
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    opt.step()
        results.append([p.detach() for p in params])
    assert len(calls) == len(grads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_default_optimizer_on_cpu_runs_the_fused_kernel_when_built(monkeypatch):
    from adopt import _fused, functional

    calls = []
    monkeypatch.setattr(functional, "fused_adopt", lambda *a, **k: calls.append(a) or _fused.fused_adopt(*a, **k))
    p = _param()
    opt = ADOPT([p])
    p.grad = torch.randn(3)
    opt.step()
    assert len(calls) == int(_fused.fused_cpu_available())


def test_fused_path_calls_schedules_with_the_same_kinds():
    seen = []

    def schedule(step):
        seen.append(step)
        return step ** 0.5

    for capturable in (False, True):
        seen.clear()
        p = _param()
        opt = ADOPT([p], clip_lambda=schedule, fused=True, capturable=capturable)
        for _ in range(3):
            p.grad = torch.randn(3)
            opt.step()
        assert seen and {type(s) for s in seen} == ({torch.Tensor} if capturable else {int})


# torch's own warnings: one when compiling first imports torch.utils.mkldnn, one when dynamo
# wraps the non-leaf `loss` as an input of the frame it resumes after backward().
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
def test_compiled_training_step_with_backward_matches_eager():
    """forward, backward and step in one compiled function (backward splits the graph there)."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        return model, ADOPT(model.parameters(), lr=1e-2, weight_decay=1e-2, decouple=True)

    x = torch.randn(16, 4)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, opt = make()

        def train_step():
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            return loss.detach()

        step = torch.compile(train_step, backend="eager") if compiled else train_step
        losses = [step() for _ in range(4)]
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_params), (comp_losses, comp_params) = results
    torch.testing.assert_close(comp_losses, eager_losses)
    for a, b in zip(comp_params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", [p for p in PATHS if "capturable" not in p])
def test_schedule_is_never_called_at_step_zero_on_the_host(path):
    """Tensors at their first step are not clipped, so a schedule undefined at 0 is fine."""
    init, grads = make_problem(5, seed=4)
    clip = lambda s: 1 / s  # noqa: E731 - a ZeroDivisionError if ever called with int 0
    params, opt = run_adopt(init, grads, lr=0.05, clip_lambda=clip, **PATHS[path])
    states = run_oracle(init, grads, lr=0.05, beta1=0.9, beta2=0.9999, eps=1e-6, clip=clip, weight_decay=0.0,
                        decouple=False, maximize=False)
    for p, st in zip(params, states):
        torch.testing.assert_close(real64(p), st.p, rtol=1e-9, atol=1e-12)
