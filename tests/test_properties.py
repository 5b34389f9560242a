"""Property-based: random hyperparameters, shapes, gradients and step patterns against the oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adopt import ADOPT, PowerClip
from helpers import PATHS, real64
from oracle import OracleState, oracle_step

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=64)
# With caution the update depends on the sign of u * g, a discrete choice that rounding flips
# where u is within an ulp of 0 (adversarial values find such cases: beta1 = 3e-89 makes
# 1 - beta1 round to 1). Cautious problems therefore draw values of moderate size.
moderate = st.one_of(st.just(0.0), st.integers(-512, 512).map(lambda k: k / 8.0))


@st.composite
def problems(draw):
    caution = draw(st.booleans())
    values = moderate if caution else finite
    n_tensors = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 6)) for _ in range(n_tensors)]
    steps = draw(st.integers(1, 6))
    init = [torch.tensor(draw(st.lists(values, min_size=k, max_size=k)), dtype=torch.float64) for k in sizes]
    grads = []
    for _ in range(steps):
        row = []
        for k in sizes:
            present = draw(st.booleans()) or draw(st.booleans())
            row.append(torch.tensor(draw(st.lists(values, min_size=k, max_size=k)), dtype=torch.float64)
                       if present else None)
        grads.append(row)
    exponent = draw(st.sampled_from([None, 0.25, 0.5, 0.0]))
    hp = dict(
        lr=draw(st.floats(0.0, 1.0)),
        beta1=draw(st.sampled_from([0.0, 0.5, 0.9]) if caution else st.floats(0.0, 0.999)),
        beta2=draw(st.floats(0.0, 0.99999)),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3, 1.0])),
        weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.5])),
        decouple=draw(st.booleans()),
        maximize=draw(st.booleans()),
        nesterov=draw(st.booleans()),
        caution=caution,
    )
    hp["corrected_weight_decay"] = hp["decouple"] and hp["lr"] > 0 and draw(st.booleans())
    return init, grads, exponent, hp


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_matches_oracle(path, problem):
    init, grads, exponent, hp = problem
    clip = None if exponent is None else PowerClip(exponent)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = ADOPT(params, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"], clip_lambda=clip,
                weight_decay=hp["weight_decay"], decouple=hp["decouple"], maximize=hp["maximize"],
                nesterov=hp["nesterov"], caution=hp["caution"], corrected_weight_decay=hp["corrected_weight_decay"],
                **PATHS[path])
    states = [OracleState(p) for p in init]
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
        for s, g in zip(states, row):
            if g is not None:
                oracle_step(s, g, clip=None if clip is None else (lambda k: k ** exponent), lr=hp["lr"],
                            beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                            decouple=hp["decouple"], maximize=hp["maximize"], nesterov=hp["nesterov"],
                            caution=hp["caution"], lr_max=hp["lr"] if hp["corrected_weight_decay"] else None)
    for p, s in zip(params, states):
        torch.testing.assert_close(real64(p), s.p, rtol=1e-9, atol=1e-9)
        if s.s:
            torch.testing.assert_close(real64(opt.state[p]["exp_avg_sq"]), s.v, rtol=1e-9, atol=1e-9)
