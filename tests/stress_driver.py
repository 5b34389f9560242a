"""Random interleavings of optimizer steps and the edits users make between steps.

Each worker owns two optimizers over identical parameters: the default choice (the fused
CPU path, through ADOPT.step()'s one-call C path when it can) and ``foreach=True``. It
applies the same random sequence of edits and steps to both and requires, after every
step, the same result (to float32 rounding: the fused kernel and foreach round differently
by a few ulps) or the same exception. Run by tests/test_stress.py in a subprocess, so a
crash fails the test instead of killing the test run:

    python tests/stress_driver.py --threads 2 --seconds 3 --seed 0
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from adopt import ADOPT

SHAPES = [(33, 7), (5,), (64,), (2, 3, 4)]


class PassThrough(Tensor):
    """A pass-through ``__torch_function__`` subclass, as wrapper libraries create."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return super().__torch_function__(func, types, args, kwargs or {})


class Side:
    """One optimizer and its parameters."""

    def __init__(self, init: list[Tensor], **kwargs: Any) -> None:
        self.params = [torch.nn.Parameter(t.clone()) for t in init]
        half = len(self.params) // 2
        self.opt = ADOPT(
            [{"params": self.params[:half]}, {"params": self.params[half:], "weight_decay": 0.1, "decouple": True}],
            lr=1e-2,
            **kwargs,
        )
        self.saved: Optional[dict[str, Any]] = None


Edit = Callable[[Side, random.Random], None]


def _grads(side: Side, rng: random.Random) -> None:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    kinds = [rng.choice(["plain", "plain", "none", "strided", "expanded", "subclass"]) for _ in side.params]
    for p, kind in zip(side.params, kinds):
        g = torch.randn(p.shape, generator=gen)
        if kind == "none":
            p.grad = None
        elif kind == "strided":  # non-contiguous: every other element, or a permuted buffer
            p.grad = (
                torch.randn(2 * p.numel(), generator=gen)[::2]
                if p.dim() == 1
                else torch.randn(p.shape[::-1], generator=gen).permute(*reversed(range(p.dim())))
            )
        elif kind == "expanded":
            p.grad = g.reshape(-1)[:1].expand(p.shape)
        elif kind == "subclass":
            p.grad = g.as_subclass(PassThrough)
        else:
            p.grad = g


def _data_assign(side: Side, rng: random.Random) -> None:
    p = side.params[rng.randrange(len(side.params))]
    p.data = p.data * 0.5 + 0.25


def _set_(side: Side, rng: random.Random) -> None:
    p = side.params[rng.randrange(len(side.params))]
    p.data.set_(p.data.clone())


def _state_replaced(side: Side, rng: random.Random) -> None:
    p = side.params[rng.randrange(len(side.params))]
    state = side.opt.state.get(p)
    if state:
        key = rng.choice(["exp_avg", "exp_avg_sq"])
        state[key] = state[key].clone().as_subclass(PassThrough) if rng.random() < 0.5 else state[key].clone()


def _state_deleted(side: Side, rng: random.Random) -> None:
    p = side.params[rng.randrange(len(side.params))]
    side.opt.state.pop(p, None)


def _group_added(side: Side, rng: random.Random) -> None:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    p = torch.nn.Parameter(torch.randn(rng.choice([(3,), (4, 4)]), generator=gen))
    side.params.append(p)
    side.opt.add_param_group({"params": [p], "lr": 3e-3})


def _save(side: Side, rng: random.Random) -> None:
    side.saved = {"state_dict": side.opt.state_dict(), "n_groups": len(side.opt.param_groups)}
    side.saved["state_dict"] = _clone_state_dict(side.saved["state_dict"])


def _load(side: Side, rng: random.Random) -> None:
    if side.saved is not None and side.saved["n_groups"] == len(side.opt.param_groups):
        side.opt.load_state_dict(_clone_state_dict(side.saved["state_dict"]))


def _clone_state_dict(sd: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": {k: {n: v.clone() if isinstance(v, Tensor) else v for n, v in s.items()} for k, s in sd["state"].items()},
        "param_groups": [dict(g) for g in sd["param_groups"]],
    }


# Edits that make the next step fail on every path; each returns the undo.
def _bad_state_shape(side: Side, rng: random.Random) -> Callable[[], None]:
    p = side.params[rng.randrange(len(side.params))]
    state = side.opt.state.get(p)
    if not state:
        return lambda: None
    original = state["exp_avg"]
    state["exp_avg"] = original.clone().resize_(max(1, original.numel() - 1))
    return lambda: state.__setitem__("exp_avg", original)


def _bad_state_dtype(side: Side, rng: random.Random) -> Callable[[], None]:
    p = side.params[-1]
    state = side.opt.state.get(p)
    if not state:
        return lambda: None
    original = state["exp_avg_sq"]
    state["exp_avg_sq"] = original.double()
    return lambda: state.__setitem__("exp_avg_sq", original)


def _bad_view(side: Side, rng: random.Random) -> Callable[[], None]:
    p = side.params[0]
    original = p.data
    p.data = original.view(-1)
    return lambda: setattr(p, "data", original)


EDITS: list[Edit] = [_grads, _grads, _grads, _data_assign, _set_, _state_replaced, _state_deleted, _group_added,
                     _save, _load]
FAILING = [_bad_state_shape, _bad_state_dtype, _bad_view]


def _step(side: Side) -> Optional[str]:
    try:
        side.opt.step()
    except Exception as exc:  # compared between the sides
        return f"{type(exc).__name__}: {exc}"
    return None


def _tensors(side: Side) -> list[Tensor]:
    out = []
    for p in side.params:
        out.append(p.detach())
        out.extend(t for t in side.opt.state.get(p, {}).values())
    return out


def _compare(a: Side, b: Side, where: str) -> None:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        raise AssertionError(f"{where}: {len(ta)} tensors vs {len(tb)}")
    for x, y in zip(ta, tb):
        torch.testing.assert_close(x.as_subclass(Tensor), y.as_subclass(Tensor), rtol=1e-5, atol=1e-6, msg=where)
    with torch.no_grad():  # start the next step from identical values
        for x, y in zip(ta, tb):
            y.copy_(x)


def worker(seed: int, seconds: float, counts: dict[str, int]) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    fused, foreach = Side(init), Side(init, foreach=True)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        where = f"seed {seed}, operation {n}"
        if rng.random() < 0.15:
            edit_seed = rng.randrange(2**31)
            failing = rng.choice(FAILING)
            undo = [failing(side, random.Random(edit_seed)) for side in (fused, foreach)]
            errors = [_step(fused), _step(foreach)]
            if errors[0] != errors[1]:
                raise AssertionError(f"{where}, {failing.__name__}: fused {errors[0]!r} vs foreach {errors[1]!r}")
            counts["errors"] += errors[0] is not None
            for u in undo:
                u()
        else:
            edit = rng.choice(EDITS)
            edit_seed = rng.randrange(2**31)
            for side in (fused, foreach):
                edit(side, random.Random(edit_seed))
        errors = [_step(fused), _step(foreach)]
        if errors[0] != errors[1]:
            raise AssertionError(f"{where}: fused {errors[0]!r} vs foreach {errors[1]!r}")
        counts["steps"] += 1
        _compare(fused, foreach, where)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="workers stepping their own optimizers at once")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each worker runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first worker (the others follow it)")
    args = parser.parse_args()
    sys.setswitchinterval(1e-5)  # switch threads often, also inside the C call's Python callbacks
    counts = {"steps": 0, "errors": 0}
    failures: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            worker(seed, args.seconds, counts)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(args.seed + k,)) for k in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    print(f"{counts['steps']} steps compared, {counts['errors']} identical errors, {args.threads} thread(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
