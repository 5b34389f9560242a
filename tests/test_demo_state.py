"""``adopt demo --experiments state``: the low-memory optimizer state experiment.

The control (8-bit state with round-to-nearest) is simulated on float32 state; the first
tests show the simulation is the 8-bit step itself: with the optimizer's own stochastic
rounding keys it reproduces ``state_precision="8bit"`` bit for bit. The CLI run uses tiny
sizes (a few seconds).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from adopt import ADOPT, cli
from adopt import _state_formats as formats

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from adopt.demo.state_precision import (  # noqa: E402
    MIN_8BIT_SIZE,
    VARIANTS,
    NearestState8bitADOPT,
    shared_block_elements,
)

SHAPES = [(3, 64, 40), (3, 1, 40), (300,), (7,)]


def _pair(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(s, generator=g).requires_grad_(True) for s in SHAPES]
    return a, [p.detach().clone().requires_grad_(True) for p in a]


def _set_grads(pa: list[torch.Tensor], pb: list[torch.Tensor], g: torch.Generator) -> None:
    for a, b in zip(pa, pb):
        grad = torch.randn(a.shape, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()


@pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}, {"fused": True}], ids=str)
def test_the_simulation_with_the_optimizers_keys_is_the_8bit_step(path: dict) -> None:
    """NearestState8bitADOPT with key = the 8-bit optimizer's own stochastic rounding keys
    gives the same parameters and moments, bit for bit, on the same path: the control
    differs from "8bit" only in the rounding."""
    if path.get("fused"):
        from adopt._fused import _cpu_kernel

        if _cpu_kernel() is None:
            pytest.skip("the fused CPU kernel is not built")
    pa, pb = _pair()
    real = ADOPT(pa, lr=1e-2, **path, state_precision="8bit", min_8bit_size=0)
    index = {id(p): i for i, p in enumerate(pb)}

    def key(p: torch.Tensor, step: int, moment: str) -> int:
        return formats.state_key(int(real.state[pa[index[id(p)]]]["seed"]), step, moment)

    sim = NearestState8bitADOPT(pb, lr=1e-2, **path, min_8bit_size=0, key=key)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        _set_grads(pa, pb, g)
        real.step()
        sim.step()
        for a, b in zip(pa, pb):
            assert torch.equal(a, b)
            state, simulated = real.state[a], sim.state[b]
            for moment in formats.MOMENTS:
                q = formats.QuantizedMoment(state[f"{moment}_codes"].view(-1), state[f"{moment}_scales"])
                assert torch.equal(formats.dequantize(q, moment), simulated[moment].view(-1))


def test_the_nearest_control_keeps_the_state_on_the_8bit_grid() -> None:
    pa, _ = _pair()
    control = NearestState8bitADOPT(pa, lr=1e-2, min_8bit_size=301)  # (7,), (300,), (3, 1, 40) stay full
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p in pa:
            p.grad = torch.randn(p.shape, generator=g)
        control.step()
    for p in pa:
        for moment in formats.MOMENTS:
            value = control.state[p][moment]
            again = formats.dequantize(formats.quantize(value, moment), moment).view_as(value)
            on_grid = torch.equal(again, value)
            assert on_grid == (p.numel() >= 301), (p.shape, moment)
    with pytest.raises(ValueError):
        NearestState8bitADOPT(pa, state_precision="8bit")


def test_every_tensor_of_the_demo_models_has_8bit_state() -> None:
    assert MIN_8BIT_SIZE == 0 and VARIANTS["8bit"]["min_8bit_size"] == 0
    assert shared_block_elements([(64, 128), (1, 128), (128, 10), (1, 10)], 3) == 3 * 128 + 3 * 10
    assert shared_block_elements([(1, 128)], 1) == 0


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_a_tiny_state_run_prints_the_table_and_writes_png_and_json(tmp_path: Path) -> None:
    code, stdout, stderr = _run_cli([
        "demo", "--experiments", "state", "--lm-steps", "4", "--epochs", "1", "--steps", "40",
        "--seeds", "2", "--out", str(tmp_path),
    ])
    assert code == 0, stderr
    assert (tmp_path / "demo.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    results = json.loads((tmp_path / "demo.json").read_text())
    state = results["state"]
    assert state["setup"]["min_8bit_size"] == 0
    for task in ("digits", "charlm"):
        summary = state["tasks"][task]["summary"]
        assert list(summary) == ["full", "bf16", "8bit", "8bit, nearest"]
        assert summary["full"]["state_bytes_per_param"] == 8.0
        assert summary["bf16"]["state_bytes_per_param"] == 4.0
        assert 2.03 <= summary["8bit"]["state_bytes_per_param"] <= 2.1
        for cell in summary.values():
            assert all(0 < cell[s]["mean"] < 10 and isinstance(cell[s]["matches_full"], bool) for s in ("train", "val"))
    toy = state["toy"]
    assert toy["setup"]["steps"] == 40 and "clip_lambda=None" in toy["setup"]["optimizer"]
    assert set(toy["variants"]) == set(VARIANTS) and toy["variants"]["8bit"]["state_bytes_per_param"] < 2.5
    assert all(0 <= toy["variants"][n]["0.999"]["v_stalled_fraction"] <= 1 for n in VARIANTS)
    assert "Optimizer state precision with ADOPT" in stdout and "min_8bit_size=0" in stdout
    assert "8bit, nearest" in stdout and "state B/param" in stdout
    assert "\n".join(results["reading"]) in stdout


def test_help_names_the_state_experiment() -> None:
    code, stdout, _ = _run_cli(["demo", "--help"])
    assert code == 0 and "state" in stdout and "min_8bit_size=0" in stdout and "4 minutes" in stdout
