"""Low-memory optimizer state (``ADOPT(state_precision=...)``) against full precision.

Three tasks, each trained with float32 parameters and ADOPT at its defaults (but lr) with
the moments stored four ways:

* ``full``: ``state_precision="full"``, the moments in float32 (the reference);
* ``bf16``: ``state_precision="bf16"``, both moments in bfloat16, stochastically rounded;
* ``8bit``: ``state_precision="8bit"``, both moments as 8-bit block floating point codes
  (``adopt._state_formats``), stochastically rounded;
* ``8bit, nearest``: the control, the same 8-bit format with round-to-nearest
  (:class:`NearestState8bitADOPT`, below), to show what the stochastic rounding is for.

**min_8bit_size.** The optimizer keeps the state of a tensor under ``min_8bit_size``
elements (default 4096) in full precision. The demo's models are small (the digits MLP's
biases have 384 elements with 3 seeds), so every run here uses ``min_8bit_size=0``
(:data:`MIN_8BIT_SIZE`): every tensor's state is in 8 bits, the hardest setting, and the
measured state bytes per parameter show it.

**Seeds share blocks.** As in :mod:`adopt.demo.digits`, the seeds are trained together: a
weight has a leading ``[seeds]`` dimension. A tensor whose per-seed size is not a multiple
of the 256-element block (biases, layer-norm gains) has blocks that span two or more seeds,
and those seeds share that block's scale. :func:`shared_block_elements` counts the
elements concerned (about 1 % of each model); the seeds are otherwise independent.

**The nearest-rounding control.** :class:`NearestState8bitADOPT` is ``ADOPT`` with float32
state that, after every step, replaces each moment of every tensor that ``"8bit"`` would
quantize by its 8-bit encoding with round-to-nearest, decoded (``_state_formats.quantize``
with ``key=None``, then ``dequantize``). Decoding is exact and the next step starts from the
decoded values, so this is the ``"8bit"`` step of the issue 9 contract with nearest instead
of stochastic rounding: with the optimizer's own keys instead of None it reproduces
``state_precision="8bit"``'s parameters bit for bit (tested in ``tests/test_demo_state.py``).

**The toy problem** (:mod:`adopt.demo.toy`, the paper's counterexample): unclipped ADOPT
(``clip_lambda=None``, the algorithm of the paper's theorem) with each state format at
every beta2: it should still end near the optimum -1 (mean theta < -0.5) and within 0.05
of full precision. Each parameter is ``[seeds]`` elements, one block. The toy also records,
per beta2, the share of seeds whose v never changed over the second half of the run: the
stall that round-to-nearest causes and stochastic rounding avoids.

A variant "matches full" when its mean final loss is within max(2 %, 2 seed standard
deviations) of full precision's (the larger of the two variants' stds), as in
:mod:`adopt.demo.precision`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from adopt import ADOPT
from adopt import _state_formats as formats

from . import charlm, digits, precision, toy
from .precision import RELATIVE_TOLERANCE, SIGMAS

MIN_8BIT_SIZE = 0  # every tensor's state in 8 bits (the optimizer's default is 4096)
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {"state_precision": "full"},
    "bf16": {"state_precision": "bf16"},
    "8bit": {"state_precision": "8bit", "min_8bit_size": MIN_8BIT_SIZE},
    "8bit, nearest": {"nearest_8bit": True, "min_8bit_size": MIN_8BIT_SIZE},
}
REFERENCE = "full"
DIGITS_LR = 1e-3  # the digits experiment's own
LM_LR = 1e-3
NEAR_OPTIMUM = -0.5  # toy: a final mean theta below this is near the optimum -1 (as adopt.demo.report)
TOY_GAP = 0.05  # toy: a final mean theta within this of full precision's "matches full"
_TOY_CHECKPOINTS = 200


class NearestState8bitADOPT(ADOPT):
    """ADOPT whose moments are rounded to the 8-bit state format with round-to-nearest after
    every step (a control for the demo; module docstring).

    The state is stored as float32 (``exp_avg``, ``exp_avg_sq``), always holding values the
    8-bit format represents exactly, so it costs full-precision memory: it simulates the
    rounding, not the storage. Tensors under ``min_8bit_size`` elements keep full precision,
    as under ``state_precision="8bit"``. ``key(p, step, moment)`` returns the rounding key
    (default: None, nearest); ``step`` is the tensor's count before the step.
    """

    def __init__(
        self,
        params: Any,
        *,
        min_8bit_size: int = formats.MIN_8BIT_SIZE,
        key: Optional[Callable[[Tensor, int, str], Any]] = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("state_precision", "full") != "full":
            raise ValueError("NearestState8bitADOPT simulates 8-bit state on top of full precision")
        kwargs.pop("state_precision", None)
        super().__init__(params, **kwargs)
        self.min_8bit_size = min_8bit_size
        self.rounding_key = key if key is not None else (lambda p, step, moment: None)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "exp_avg" not in state:
                    continue
                if p.dtype != torch.float32:
                    raise TypeError("NearestState8bitADOPT takes float32 parameters")
                if formats.storage_format("8bit", p.numel(), self.min_8bit_size) != "8bit":
                    continue
                before = int(state["step"]) - 1
                for moment in formats.MOMENTS:
                    value = state[moment]
                    code = formats.quantize(value.float(), moment, self.rounding_key(p, before, moment))
                    value.copy_(formats.dequantize(code, moment).view_as(value))
        return loss


def make_optimizer(params: Any, **kwargs: Any) -> Optimizer:
    """``ADOPT(params, **kwargs)``, or the nearest-rounding control for ``nearest_8bit=True``."""
    if kwargs.pop("nearest_8bit", False):
        return NearestState8bitADOPT(params, **kwargs)
    if kwargs.get("state_precision", "full") == "full":
        kwargs.pop("state_precision", None)  # the default: works with any ADOPT
    return ADOPT(params, **kwargs)


class _Recorder:
    """An optimizer factory that remembers what it made (to measure its state afterwards)."""

    def __init__(self) -> None:
        self.optimizers: list[Optimizer] = []

    def __call__(self, params: Any, **kwargs: Any) -> Optimizer:
        optimizer = make_optimizer(params, **kwargs)
        self.optimizers.append(optimizer)
        return optimizer


def state_bytes_per_parameter(optimizer: Optimizer) -> float:
    """Bytes of the optimizer's state tensors (all but step counts and seeds) per parameter
    element, measured from ``optimizer.state``."""
    from adopt.bench import state_bytes_per_parameter as measure

    return measure(optimizer)


def shared_block_elements(shapes: Iterable[tuple[int, ...]], seeds: int) -> int:
    """Elements of the ``[seeds, *shape]`` tensors whose 8-bit blocks span two seeds (per-seed
    size not a multiple of the block size; one seed: none)."""
    if seeds < 2:
        return 0
    return sum(seeds * math.prod(s) for s in shapes if math.prod(s) % formats.BLOCK_SIZE)


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """:func:`adopt.demo.precision.compare` against full precision, with each variant's
    measured state bytes per parameter."""
    summary = precision.compare(runs, REFERENCE)
    for name, run in runs.items():
        summary[name]["state_bytes_per_param"] = run.get("state_bytes_per_param")
    return summary


def decoded_exp_avg_sq(optimizer: Optimizer, p: Tensor) -> Tensor:
    """The second moment ``v`` the optimizer holds for ``p``, as float32, in any layout."""
    state = optimizer.state[p]
    if "exp_avg_sq_codes" in state:
        q = formats.QuantizedMoment(state["exp_avg_sq_codes"].view(-1), state["exp_avg_sq_scales"])
        return formats.dequantize(q, "exp_avg_sq").view_as(p)
    return state["exp_avg_sq"].float()


def run_toy_state(steps: int, seeds: int, device: torch.device, progress: Optional[Callable[[int], Any]] = None) -> dict[str, Any]:
    """Unclipped ADOPT on the toy problem with every state format at every beta2 (the
    gradient stream, step size and projection of :func:`adopt.demo.toy.run_toy`)."""
    generator = torch.Generator(device=device).manual_seed(0)
    params = {name: [torch.zeros(seeds, device=device, requires_grad=True) for _ in toy.BETA2S] for name in VARIANTS}
    optimizers = {
        name: make_optimizer(
            [{"params": [p], "betas": (toy.BETA1, b2)} for p, b2 in zip(ps, toy.BETA2S)],
            lr=toy.step_size(0), clip_lambda=None, **VARIANTS[name],
        )
        for name, ps in params.items()
    }
    flat = [p for name in VARIANTS for p in params[name]]
    grads = [torch.zeros_like(p) for p in flat]
    for p, g in zip(flat, grads):
        p.grad = g
    record_every = max(1, steps // _TOY_CHECKPOINTS)
    half_v: dict[int, Tensor] = {}
    # v of the second half of the run: does it still move (stalls under round-to-nearest)?
    moved = {id(p): torch.zeros(seeds, dtype=torch.bool, device=device) for p in flat}
    recorded = [0]
    snapshots = [torch.stack([p.detach() for p in flat])]
    for t in range(steps):
        if t % toy._RANDOM_CHUNK == 0:
            uniforms = torch.rand(min(toy._RANDOM_CHUNK, steps - t), seeds, generator=generator, device=device)
        rare = uniforms[t % toy._RANDOM_CHUNK] < 1.0 / toy.K
        grad = torch.where(rare, float(toy.K * toy.K), float(-toy.K))
        torch._foreach_copy_(grads, [grad] * len(grads))
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = toy.step_size(t)
            optimizer.step()
        with torch.no_grad():
            torch._foreach_clamp_min_(flat, -1.0)
            torch._foreach_clamp_max_(flat, 1.0)
        if (t + 1) % record_every == 0 or t + 1 == steps:
            recorded.append(t + 1)
            snapshots.append(torch.stack([p.detach() for p in flat]))
        if t + 1 >= steps // 2:
            for name, ps in params.items():
                for p in ps:
                    v = decoded_exp_avg_sq(optimizers[name], p)
                    if id(p) in half_v:
                        moved[id(p)] |= v != half_v[id(p)]
                    half_v[id(p)] = v.clone()
        if progress is not None:
            progress(1)
    theta = torch.stack(snapshots).cpu().double()  # [checkpoints, variant * beta2, seeds]
    results: dict[str, Any] = {}
    for i, name in enumerate(VARIANTS):
        results[name] = {}
        for j, b2 in enumerate(toy.BETA2S):
            c = theta[:, i * len(toy.BETA2S) + j]
            final = c[-1]
            results[name][str(b2)] = {
                "mean": c.mean(dim=1).tolist(),
                "final": final.tolist(),
                "final_mean": float(final.mean()),
                "final_std": float(final.std()) if seeds > 1 else 0.0,
                "near_optimum": float(final.mean()) < NEAR_OPTIMUM,
                # seeds whose v never changed in the second half of the run
                "v_stalled_fraction": float((~moved[id(params[name][j])]).double().mean()),
            }
        results[name]["state_bytes_per_param"] = state_bytes_per_parameter(optimizers[name])
    for name in VARIANTS:
        for b2 in toy.BETA2S:
            cell, ref = results[name][str(b2)], results[REFERENCE][str(b2)]
            cell["minus_full"] = cell["final_mean"] - ref["final_mean"]
            cell["matches_full"] = abs(cell["minus_full"]) <= TOY_GAP
    return {
        "setup": {
            "objective": "f(theta) = theta on [-1, 1], optimum -1 (adopt.demo.toy)",
            "optimizer": "ADOPT(clip_lambda=None), lr 0.01 / sqrt(1 + 0.01 t)",
            "beta1": toy.BETA1, "beta2s": list(toy.BETA2S), "steps": steps, "seeds": seeds,
            "min_8bit_size": MIN_8BIT_SIZE, "near_optimum_below": NEAR_OPTIMUM, "matches_full_within": TOY_GAP,
            "blocks": f"each parameter is [{seeds}] elements: one 8-bit block holding every seed",
            "criterion": f"near the optimum: final mean theta < {NEAR_OPTIMUM}; matches full: final mean"
            f" theta within {TOY_GAP} of full precision's",
        },
        "steps": recorded,
        "variants": results,
    }


def _train(
    train: Callable[[Mapping[str, Any], Callable[..., Optimizer]], dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    runs = {}
    for name, kwargs in VARIANTS.items():
        recorder = _Recorder()
        runs[name] = train(kwargs, recorder)
        runs[name]["state_bytes_per_param"] = state_bytes_per_parameter(recorder.optimizers[-1])
    return runs


def run_state_precision(
    lm_steps: int,
    epochs: int,
    seeds: int,
    toy_steps: int,
    toy_seeds: int,
    device: torch.device,
    progress: Callable[[int, str], Any],
) -> dict[str, Any]:
    """Every task with every state format; a JSON-ready dict of setup, curves and summaries."""
    corpus = charlm.load_corpus()
    cfg = charlm.CharLMConfig()
    bar = progress(len(VARIANTS) * (epochs + lm_steps) + toy_steps, "state precision")
    from .precision import train_digits

    tasks: dict[str, Any] = {}
    runs = _train(lambda kw, make: train_digits(
        {"lr": DIGITS_LR, **kw}, torch.float32, epochs, seeds, device, bar.update, optimizer_class=make))
    d_in, classes = 64, 10
    digit_shapes = [(d_in, digits.HIDDEN), (1, digits.HIDDEN), (digits.HIDDEN, classes), (1, classes)]
    tasks["digits"] = {
        "setup": {"model": f"MLP 64-{digits.HIDDEN}-10, ReLU (adopt.demo.digits)", "lr": DIGITS_LR,
                  "epochs": epochs, "batch_size": digits.BATCH_SIZE, "val": "the 25 % test split",
                  "unit": "epoch", "parameters": seeds * sum(math.prod(s) for s in digit_shapes),
                  "shared_block_elements": shared_block_elements(digit_shapes, seeds)},
        "runs": runs,
        "summary": compare(runs),
    }
    runs = _train(lambda kw, make: charlm.train_charlm(
        {"lr": LM_LR, **kw}, torch.float32, lm_steps, seeds, corpus, cfg, device,
        progress=bar.update, optimizer_class=make))
    lm_shapes = list(charlm._shapes(cfg).values())
    tasks["charlm"] = {
        "setup": {**charlm.describe(corpus, cfg), "lr": LM_LR, "steps": lm_steps, "unit": "step",
                  "parameters": seeds * sum(math.prod(s) for s in lm_shapes),
                  "shared_block_elements": shared_block_elements(lm_shapes, seeds)},
        "runs": runs,
        "summary": compare(runs),
    }
    toy_result = run_toy_state(toy_steps, toy_seeds, device, bar.update)
    bar.close()
    return {
        "setup": {
            "seeds": seeds,
            "parameters": "float32",
            "variants": {n: dict(kw) for n, kw in VARIANTS.items()},
            "nearest_control": "ADOPT with float32 state rounded to the 8-bit format with round-to-nearest"
            " after every step (adopt.demo.state_precision.NearestState8bitADOPT): the 8-bit step"
            " with nearest instead of stochastic rounding",
            "min_8bit_size": MIN_8BIT_SIZE,
            "min_8bit_size_note": "0: every tensor's state in 8 bits (the optimizer's default, 4096, would keep"
            " the small ones, biases and norms, in full precision)",
            "optimizer": "ADOPT at its defaults but lr and the state options (default path for the device)",
            "criterion": f"|mean - full mean| <= max({RELATIVE_TOLERANCE:.0%} of full mean,"
            f" {SIGMAS:g} x the larger seed std)",
            "losses": "cross-entropy in nats",
        },
        "tasks": tasks,
        "toy": toy_result,
    }
