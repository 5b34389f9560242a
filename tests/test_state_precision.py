"""ADOPT(state_precision="bf16" / "8bit"): the option, the state layout, the rule against the
float64 oracle, agreement between paths, checkpoints and conversion, errors."""

from __future__ import annotations

import io
import math
from typing import Any, Optional

import pytest
import torch

from adopt import ADOPT
from adopt import _state_formats as formats
from adopt import _state_layout as layout
from oracle import OracleState, oracle_step, quarter_power

LOW = ("bf16", "8bit")
TORCH_PATHS: dict[str, dict[str, Any]] = {
    "single": dict(foreach=False),
    "foreach": dict(foreach=True),
    "single-capturable": dict(foreach=False, capturable=True),
    "foreach-capturable": dict(foreach=True, capturable=True),
}
SIZES = [(5,), (3, 4), (300,), (37, 29)]  # 1073: blocks of 256 and a short last one


def _problem(steps: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(dtype) for s in SIZES]
    rows = []
    for t in range(steps):
        mask = [True, t >= 2, t % 3 != 1, True]  # #1 joins late, #2 skips steps
        scale = 4.0 if t >= steps // 2 else 1.0
        rows.append([(torch.randn(s, generator=gen) * scale * (10.0 ** -i)).to(dtype) if on else None
                     for i, (s, on) in enumerate(zip(SIZES, mask))])
    return init, rows


def _run(init, rows, **kwargs: Any) -> tuple[list[torch.nn.Parameter], ADOPT]:
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = ADOPT(params, **kwargs)
    for row in rows:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params, opt


def _stored(opt: ADOPT, p: torch.Tensor) -> list[torch.Tensor]:
    """Every state tensor but the step, in a fixed order."""
    return [v for k, v in sorted(opt.state[p].items()) if k != "step"]


def _state_bytes(opt: ADOPT) -> int:
    return sum(t.nbytes for st in opt.state.values() for k, t in st.items() if k not in ("step", "seed"))


# -- the option ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["fp8", "BF16", None, 8])
def test_unknown_precision_is_a_value_error_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match=r"state_precision must be one of 'full', 'bf16', '8bit', got state_precision="):
        ADOPT([torch.nn.Parameter(torch.zeros(3))], state_precision=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state_precision"):
        ADOPT([{"params": [torch.nn.Parameter(torch.zeros(3))], "state_precision": value}])


@pytest.mark.parametrize("value", [-1, 1.5, True, "4096"])
def test_bad_min_8bit_size_is_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match=r"min_8bit_size must be an integer >= 0"):
        ADOPT([torch.nn.Parameter(torch.zeros(3))], state_precision="8bit", min_8bit_size=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("precision", LOW)
def test_differentiable_is_refused(precision: str) -> None:
    with pytest.raises(RuntimeError, match=f"state_precision='{precision}' does not support differentiable=True"):
        ADOPT([torch.nn.Parameter(torch.zeros(3))], state_precision=precision, differentiable=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
@pytest.mark.parametrize("precision", LOW)
def test_unsupported_parameter_dtype_names_the_parameter_and_changes_nothing(precision: str, dtype: torch.dtype) -> None:
    ok = torch.nn.Parameter(torch.randn(8))
    bad = torch.nn.Parameter(torch.randn(8, dtype=dtype))
    opt = ADOPT([{"params": [ok]}, {"params": [bad], "state_precision": precision}], min_8bit_size=0)
    ok.grad, bad.grad = torch.randn(8), torch.randn(8, dtype=dtype)
    before = ok.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] is torch\.(float64|complex64)"):
        opt.step()
    assert torch.equal(ok.detach(), before) and not opt.state


def test_small_tensors_keep_full_state_and_a_group_can_opt_out() -> None:
    big, small, norm = (torch.nn.Parameter(torch.randn(n)) for n in (5000, 4095, 6000))
    opt = ADOPT([{"params": [big, small]}, {"params": [norm], "state_precision": "full"}], state_precision="8bit")
    for p in (big, small, norm):
        p.grad = torch.randn_like(p)
    opt.step()
    assert set(opt.state[big]) == {"step", "seed", "exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes",
                                   "exp_avg_sq_scales"}
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    assert set(opt.state[norm]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("precision, limit", [("bf16", 4.0), ("8bit", 2.04)])
def test_state_bytes_per_parameter(precision: str, limit: float) -> None:
    params = [torch.nn.Parameter(torch.randn(n)) for n in (1 << 16, 50_000)]
    opt = ADOPT(params, state_precision=precision)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    per_param = _state_bytes(opt) / sum(p.numel() for p in params)
    assert per_param <= limit
    assert per_param == sum(formats.state_bytes(precision, p.numel()) for p in params) / sum(p.numel() for p in params)
    assert opt.state[params[0]]["exp_avg_sq" if precision == "bf16" else "exp_avg_sq_codes"].is_contiguous()


# -- the rule -----------------------------------------------------------------------------


def _decoded(opt: ADOPT, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    st = opt.state[p]
    return (layout.decoded(st, p, "exp_avg").double(), layout.decoded(st, p, "exp_avg_sq").double())


def _check_rounded(stored: torch.Tensor, exact: torch.Tensor, fmt: str, scales: Optional[torch.Tensor], root: bool) -> None:
    """``stored`` is one of the two codes around ``exact`` (fp32 arithmetic aside)."""
    if root:
        stored, exact = stored.sqrt(), exact.clamp(min=0).sqrt()
    slack = 1e-5 * exact.abs() + 1e-30
    if fmt == "bf16":
        assert ((stored - exact).abs() <= exact.abs() * 2.0**-7 + slack).all()
        return
    assert scales is not None
    per = scales.double()[:, None].expand(-1, formats.BLOCK_SIZE).reshape(-1)[: exact.numel()].view(exact.shape)
    if root:  # unsigned E4M4 of sqrt(v): relative step 2**-4; below the lowest code, raised to it
        lowest = per * 2.0**-15
        assert (stored <= torch.maximum(exact * (1 + 2.0**-4), lowest) + slack).all()
        assert (stored >= exact * (1 - 2.0**-4) - slack).all()
    else:  # signed E3M4: relative step 2**-4, subnormal step 2**-10 of the scale
        assert ((stored - exact).abs() <= torch.maximum(exact.abs() * 2.0**-4, per * 2.0**-10) + slack).all()


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("precision", LOW)
@pytest.mark.parametrize("options", [{}, dict(nesterov=True, weight_decay=0.1, decouple=True),
                                     dict(caution=True, maximize=True, weight_decay=0.01)])
def test_each_step_is_the_oracle_rule_on_the_decoded_state(precision: str, path: str, options: dict) -> None:
    """Step by step: the float64 oracle applied to the decoded state gives the new parameter
    (to float32 rounding), and the new stored moments are one of the two codes around the
    oracle's (stochastic rounding), for tensors at different step counts."""
    _check_against_oracle(precision, path, options, torch.float32)


@pytest.mark.parametrize("path", ["single", "foreach-capturable"])
@pytest.mark.parametrize("precision", LOW)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_parameters_follow_the_oracle_with_stochastic_rounding(precision: str, path: str,
                                                                      dtype: torch.dtype) -> None:
    _check_against_oracle(precision, path, dict(stochastic_rounding=True, weight_decay=0.1, decouple=True), dtype)


def _check_against_oracle(precision: str, path: str, options: dict, dtype: torch.dtype) -> None:
    init, rows = _problem(8, dtype=dtype)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = ADOPT(params, lr=0.01, betas=(0.9, 0.99), state_precision=precision, min_8bit_size=0,
                **TORCH_PATHS[path], **options)
    hp = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-6, clip=quarter_power, weight_decay=options.get("weight_decay", 0.0),
              decouple=options.get("decouple", False), maximize=options.get("maximize", False),
              caution=options.get("caution", False), nesterov=options.get("nesterov", False))
    for row in rows:
        expected = []
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
            if g is None:
                continue
            oracle = OracleState(p.detach())
            if p in opt.state:
                oracle.m, oracle.v = _decoded(opt, p)
                oracle.s = int(opt.state[p]["step"])
            oracle_step(oracle, g, **hp)
            expected.append((p, oracle))
        opt.step()
        for p, oracle in expected:
            if dtype == torch.float32:
                torch.testing.assert_close(p.detach().double(), oracle.p, rtol=2e-6, atol=1e-6)
            else:  # stochastic rounding: one of the two neighbours of the exact value
                ulp = oracle.p.abs().clamp(min=2.0**-14) * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10)
                assert ((p.detach().double() - oracle.p).abs() <= ulp * (1 + 1e-3) + 1e-6).all()
            st = opt.state[p]
            m, v = _decoded(opt, p)
            assert layout.layout_of(st, p) == layout.stored_format(precision, p)
            fmt = precision
            _check_rounded(m, oracle.m, fmt, st.get("exp_avg_scales"), root=False)
            _check_rounded(v, oracle.v, fmt, st.get("exp_avg_sq_scales"), root=fmt == "8bit")


@pytest.mark.parametrize("precision", LOW)
def test_torch_paths_store_identical_codes(precision: str) -> None:
    """Single-tensor, foreach and their capturable forms: the same bits in every state tensor
    and parameter (the same float32 rule and the same random draws)."""
    init, rows = _problem(7, seed=3)
    runs = {path: _run(init, rows, lr=0.01, state_precision=precision, min_8bit_size=0, **kw)
            for path, kw in TORCH_PATHS.items()}
    ref_params, ref_opt = runs["single"]
    for path, (params, opt) in runs.items():
        for p, q in zip(ref_params, params):
            assert torch.equal(p.detach(), q.detach()), path
            for a, b in zip(_stored(ref_opt, p), _stored(opt, q)):
                assert torch.equal(a.cpu(), b.cpu()), path


@pytest.mark.parametrize("beta2", [0.999, 0.9999])
def test_8bit_second_moment_tracks_a_change_of_gradient_scale(beta2: float) -> None:
    """The tracking experiment through the optimizer: gradient scale ×4 halfway; the stored v
    follows the exact float64 v of the same gradients (|mean log(sqrt(v_q/v))| < 0.05)."""
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.zeros(8192))
    opt = ADOPT([p], lr=0.0, betas=(0.9, beta2), state_precision="8bit")
    exact = torch.zeros(8192, dtype=torch.float64)
    steps = 6000 if beta2 == 0.9999 else 2000
    scale = torch.exp(torch.randn(8192, generator=gen))
    for t in range(steps):
        g = torch.randn(8192, generator=gen) * scale * (4.0 if t >= steps // 2 else 1.0)
        p.grad = g
        opt.step()
        exact = g.double() ** 2 if t == 0 else beta2 * exact + (1 - beta2) * g.double() ** 2
    stored = layout.decoded(opt.state[p], p, "exp_avg_sq").double()
    assert abs(float(torch.log(stored / exact).mean()) / 2) < 0.05


@pytest.mark.parametrize("precision", LOW)
def test_toy_problem_reaches_the_optimum(precision: str) -> None:
    """The paper's toy f(x) = x² (as a batch of independent scalars), clip off, 8-bit/bf16
    state: the iterate goes to 0."""
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(torch.rand(4096, generator=gen) * 2 - 1)
    opt = ADOPT([x], lr=0.01, clip_lambda=None, state_precision=precision)
    for _ in range(600):
        x.grad = 2 * x.detach() + 0.1 * torch.randn(4096, generator=gen)
        opt.step()
    assert float(x.detach().abs().mean()) < 0.05


# -- checkpoints --------------------------------------------------------------------------


def _save_load(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("path", ["single", "foreach-capturable"])
@pytest.mark.parametrize("precision", LOW)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_identical(precision: str, path: str, param_dtype: torch.dtype) -> None:
    init, rows = _problem(8, seed=2, dtype=param_dtype)
    kwargs = dict(lr=0.01, state_precision=precision, min_8bit_size=0, stochastic_rounding=True, **TORCH_PATHS[path])
    reference, ref_opt = _run(init, rows, **kwargs)
    first, opt = _run(init, rows[:4], **kwargs)
    ckpt = _save_load({"params": [p.detach() for p in first], "opt": opt.state_dict()})
    params = [torch.nn.Parameter(p.clone()) for p in ckpt["params"]]
    resumed = ADOPT(params, **kwargs)
    resumed.load_state_dict(ckpt["opt"])
    for row in rows[4:]:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        resumed.step()
    for a, b in zip(reference, params):
        assert torch.equal(a.detach(), b.detach())
        for x, y in zip(_stored(ref_opt, a), _stored(resumed, b)):
            assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu())


@pytest.mark.parametrize("source, target", [("full", "8bit"), ("full", "bf16"), ("8bit", "full"), ("bf16", "full"),
                                            ("8bit", "bf16"), ("bf16", "8bit")])
def test_checkpoints_convert_between_precisions(source: str, target: str) -> None:
    """A checkpoint of one precision loads into an optimizer of another: the moments are
    converted at load (decoded, then encoded with nearest rounding) and training goes on."""
    init, rows = _problem(5, seed=4)
    params, opt = _run(init, rows, lr=0.01, state_precision=source, min_8bit_size=0)
    saved = _save_load(opt.state_dict())
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = ADOPT(fresh, lr=0.01, state_precision=target, min_8bit_size=0)
    other.load_state_dict(saved)
    for p, q in zip(params, fresh):
        if p not in opt.state:
            continue
        assert layout.layout_of(other.state[q], q) == target
        for key in formats.MOMENTS:
            before = layout.decoded(opt.state[p], p, key)
            if target == "8bit":
                expected = formats.dequantize(formats.quantize(before.contiguous(), key), key).view(p.shape)
            elif target == "bf16":
                expected = before.to(torch.bfloat16).float()
            else:
                expected = before
            assert torch.equal(layout.decoded(other.state[q], q, key), expected)
    for p, g in zip(fresh, rows[0]):
        p.grad = None if g is None else g.clone()
    other.step()
    assert all(torch.isfinite(p).all() for p in fresh)


def test_changing_a_groups_precision_converts_its_state_at_the_next_step() -> None:
    init, rows = _problem(4, seed=5)
    params, opt = _run(init, rows[:2], lr=0.01, min_8bit_size=0)
    opt.param_groups[0]["state_precision"] = "8bit"
    for p, g in zip(params, rows[2]):
        p.grad = None if g is None else g.clone()
    opt.step()
    assert {layout.layout_of(st, p) for p, st in opt.state.items()} == {"8bit"}


def test_a_failed_step_undoes_conversions() -> None:
    a = torch.nn.Parameter(torch.randn(600))
    bad = torch.nn.Parameter(torch.randn(600))
    opt = ADOPT([{"params": [a]}, {"params": [bad]}], lr=0.01, min_8bit_size=0)
    a.grad, bad.grad = torch.randn(600), torch.randn(600)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[a].items()}
    opt.param_groups[0]["state_precision"] = "8bit"
    opt.state[bad]["exp_avg"] = torch.zeros(601)  # state of another shape: the step fails in group 1
    a.grad, bad.grad = torch.randn(600), torch.randn(600)
    with pytest.raises(RuntimeError, match="exp_avg"):
        opt.step()
    assert set(opt.state[a]) == set(before)
    assert all(torch.equal(opt.state[a][k], v) for k, v in before.items())


def _eight_bit_checkpoint() -> tuple[list[torch.nn.Parameter], dict]:
    params = [torch.nn.Parameter(torch.randn(700)), torch.nn.Parameter(torch.randn(300))]
    opt = ADOPT(params, state_precision="8bit", min_8bit_size=0)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, _save_load(opt.state_dict())


@pytest.mark.parametrize("corruption, message", [
    (lambda st: st.__setitem__("exp_avg_scales", st["exp_avg_scales"] * 3), "is corrupt: exp_avg_scales"),
    (lambda st: st.__setitem__("exp_avg_sq_scales", -st["exp_avg_sq_scales"]), "is corrupt: exp_avg_sq_scales"),
    (lambda st: st.__setitem__("exp_avg_codes", st["exp_avg_codes"][:-1]), "exp_avg_codes is a torch.uint8 tensor"),
    (lambda st: st.__setitem__("exp_avg_codes", st["exp_avg_codes"].float()), "exp_avg_codes is a torch.float32"),
    (lambda st: st.__setitem__("exp_avg_sq_scales", st["exp_avg_sq_scales"][:1]), "exp_avg_sq_scales is a"),
    (lambda st: st.pop("exp_avg_sq_codes"), "without exp_avg_sq_codes"),
])
def test_corrupt_or_mismatched_8bit_state_is_refused_naming_the_parameter(corruption, message) -> None:
    params, saved = _eight_bit_checkpoint()
    target = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ADOPT(target, state_precision="8bit", min_8bit_size=0)
    corruption(saved["state"][1])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]") as info:
        opt.load_state_dict(saved)
    assert message in str(info.value)
    assert not opt.state  # the optimizer keeps what it had


@pytest.mark.parametrize("precision", LOW)
def test_fused_request_without_the_low_precision_kernel_warns_and_matches_foreach(
    precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the fused kernel for low-precision state is missing, fused=True says so and runs
    the foreach rule (same bits)."""
    from adopt import _fused
    from adopt._state_path import fused_state_available

    monkeypatch.setattr(_fused, "_fallback_warned", False)
    if fused_state_available([torch.zeros(1)]):
        pytest.skip("the fused CPU kernel takes low-precision state")
    init, rows = _problem(4)
    with pytest.warns(RuntimeWarning, match="low-precision state"):
        fused, _ = _run(init, rows, lr=0.01, state_precision=precision, min_8bit_size=0, fused=True)
    foreach, _ = _run(init, rows, lr=0.01, state_precision=precision, min_8bit_size=0, foreach=True)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(fused, foreach))


def test_defaults_are_unchanged_bit_for_bit() -> None:
    init, rows = _problem(6)
    a, _ = _run(init, rows, lr=0.01)
    b, _ = _run(init, rows, lr=0.01, state_precision="full", min_8bit_size=0)
    assert all(torch.equal(x.detach(), y.detach()) for x, y in zip(a, b))
    assert not math.isnan(float(a[0].detach().sum()))


@pytest.mark.filterwarnings("ignore::adopt._fused.FusedFallbackWarning")  # where the C kernel is not built
@pytest.mark.parametrize("precision", LOW)
def test_found_inf_leaves_low_precision_state_untouched(precision: str) -> None:
    """fused=True takes AMP's grad_scale/found_inf: an inf skip changes no code, scale,
    parameter or step; a finite step unscales the gradients first."""
    init, rows = _problem(3, seed=6)
    params, opt = _run(init, rows[:2], lr=0.01, state_precision=precision, min_8bit_size=0, fused=True)
    def snapshot(p: torch.Tensor) -> list[torch.Tensor]:
        return [t.clone() for t in _stored(opt, p)] + [opt.state[p]["step"].clone(), p.detach().clone()]

    before = {i: snapshot(p) for i, p in enumerate(params) if p in opt.state}
    for p, g in zip(params, rows[2]):
        p.grad = None if g is None else g * 1024
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    opt.step()
    assert len(before) == 3  # the fourth joins at this step (its zero state is created, as in torch)
    for i, saved in before.items():
        assert all(torch.equal(a, b) for a, b in zip(saved, snapshot(params[i]), strict=True))
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    reference, _ = _run(init, rows, lr=0.01, state_precision=precision, min_8bit_size=0, fused=True)
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", LOW)
def test_float16_parameters_with_stochastic_rounding(precision: str) -> None:
    init, rows = _problem(6, seed=7, dtype=torch.float16)
    runs = [_run(init, rows, lr=0.01, state_precision=precision, min_8bit_size=0, stochastic_rounding=True, **kw)
            for kw in TORCH_PATHS.values()]
    for params, _ in runs[1:]:
        assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(runs[0][0], params))
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in runs[0][0])


def _code_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many codes apart two 8-bit codes are along the signed number line (bf16: ulps)."""
    if a.dtype == torch.bfloat16:
        a, b = a.view(torch.int16).to(torch.int32), b.view(torch.int16).to(torch.int32)
        a, b = torch.where(a < 0, -(a & 0x7FFF), a), torch.where(b < 0, -(b & 0x7FFF), b)
        return (a - b).abs()
    a, b = a.to(torch.int32), b.to(torch.int32)
    return (torch.where(a >= 128, 128 - a, a) - torch.where(b >= 128, 128 - b, b)).abs()


@pytest.mark.parametrize("precision", LOW)
@pytest.mark.parametrize("options", [{}, dict(nesterov=True, caution=True, weight_decay=0.1, decouple=True),
                                     dict(stochastic_rounding=True, maximize=True, weight_decay=0.01)])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_step_agrees_with_the_single_tensor_step(precision: str, options: dict,
                                                           param_dtype: torch.dtype) -> None:
    """From the same state, one step of the fused C kernel and one of the single-tensor path
    write the same codes, except where a float32 rounding differs (then one code apart), at
    every step of a run whose tensors are at different step counts."""
    from adopt._state_path import fused_state_available

    if not fused_state_available([torch.zeros(1)]):
        pytest.skip("the fused C kernel for low-precision state is not built here")
    init, rows = _problem(7, seed=8, dtype=param_dtype)
    kwargs = dict(lr=0.01, state_precision=precision, min_8bit_size=0, **options)
    single = [torch.nn.Parameter(p.clone()) for p in init]
    fused = [torch.nn.Parameter(p.clone()) for p in init]
    opt_single, opt_fused = ADOPT(single, foreach=False, **kwargs), ADOPT(fused, fused=True, **kwargs)
    differing = total = 0
    for row in rows:
        opt_fused.load_state_dict(_save_load(opt_single.state_dict()))
        for p, q, g in zip(single, fused, row):
            with torch.no_grad():
                q.copy_(p)
            p.grad = q.grad = None if g is None else g.clone()
        opt_single.step()
        opt_fused.step()
        for p, q in zip(single, fused):
            if p not in opt_single.state:
                continue
            for key in ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_sq_codes"):
                if key not in opt_single.state[p]:
                    continue
                a, b = opt_single.state[p][key], opt_fused.state[q][key]
                distance = _code_distance(a, b)
                assert int(distance.max()) <= 1, key
                differing += int((distance > 0).sum())
                total += a.numel()
            if param_dtype == torch.float32:
                torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)
    assert differing <= total // 100, f"{differing} of {total} codes differ"


def test_pickled_optimizer_keeps_low_precision_state_and_converts_when_switched_to_full() -> None:
    import pickle

    init, rows = _problem(4, seed=9)
    params, opt = _run(init, rows[:2], lr=0.01, state_precision="8bit", min_8bit_size=0)
    model_and_opt = pickle.loads(pickle.dumps((params, opt)))
    params2, opt2 = model_and_opt
    opt2.param_groups[0]["state_precision"] = "full"
    for p, g in zip(params2, rows[2]):
        p.grad = None if g is None else g.clone()
    opt2.step()
    assert {layout.layout_of(st, p) for p, st in opt2.state.items()} == {"full"}


@pytest.mark.parametrize("path", ["single", "fused"])
@pytest.mark.parametrize("damage, message", [
    (lambda st: st.__setitem__("exp_avg_scales", st["exp_avg_scales"][:-1]), "exp_avg scales must be"),
    (lambda st: st.__setitem__("exp_avg_sq_codes", st["exp_avg_sq_codes"].t()), "exp_avg_sq must be a contiguous"),
    (lambda st: st.__setitem__("exp_avg_codes", st["exp_avg_codes"].to(torch.int16)), "exp_avg must be a contiguous"),
    (lambda st: st.__setitem__("seed", st["seed"].float()), "seed of"),
])
def test_damaged_8bit_state_fails_the_step_naming_the_parameter(path: str, damage, message: str) -> None:
    """State changed behind the optimizer's back: the step raises before any tensor of any
    group changes."""
    first, second = torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(30, 40))
    opt = ADOPT([{"params": [first]}, {"params": [second]}], state_precision="8bit", min_8bit_size=0,
                **({"fused": True} if path == "fused" else {"foreach": False}))
    for _ in range(2):
        first.grad, second.grad = torch.randn(40, 30), torch.randn(30, 40)
        opt.step()
    damage(opt.state[second])
    before = [first.detach().clone()] + [t.clone() for t in _stored(opt, first)]
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\]") as info:
        opt.step()
    assert message in str(info.value)
    after = [first.detach()] + _stored(opt, first)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_fused_off_the_cpu_without_its_kernel_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent fallback for device tensors (here meta, with the CUDA kernel reported missing)."""
    from adopt import _state_path

    monkeypatch.setattr(_state_path, "fused_state_available", lambda params: False)
    p = torch.zeros(8, device="meta")
    codes = torch.zeros(8, dtype=torch.uint8, device="meta")
    scales = torch.zeros(1, device="meta")
    with pytest.raises(RuntimeError, match="fused ADOPT on meta needs the Triton kernel"):
        _state_path.state_adopt([p], [torch.zeros(8, device="meta")], [codes], [codes.clone()], [scales],
                                [scales.clone()], [torch.zeros(())], [torch.zeros((), dtype=torch.int64)], None, None,
                                fmt="8bit", path="fused", beta1=0.9, beta2=0.999, lr=1e-3, clip_lambda=None,
                                weight_decay=0.0, decouple=False, eps=1e-6, maximize=False, capturable=False,
                                stochastic_rounding=False)
