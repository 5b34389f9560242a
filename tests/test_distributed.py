"""ADOPT on PyTorch's own distributed engines: 2 CPU processes, gloo, loopback only.

The module fixture runs every engine with every usable path in one spawned group (a fresh
group resumes after a rank crashes, so a crash costs only its own case) and compares each
against a single-process run on the full batch:

* ``ddp``: ``DistributedDataParallel`` + ``ADOPT``
* ``fsdp2``: ``fully_shard`` (DTensor parameters and optimizer state) + ``ADOPT``
* ``zero``: DDP + ``ZeroRedundancyOptimizer(optimizer_class=ADOPT)``
* ``ddp-overlap``: DDP ``_register_fused_optim(FunctionalADOPT)`` (the step runs in backward)
* ``fsdp2-dcp``: FSDP2 state saved with ``torch.distributed.checkpoint`` mid-run and loaded
  into a fresh model and optimizer; the resumed run must equal the uninterrupted one exactly.
* ``fsdp2-bf16-sr``: FSDP2 with bfloat16 parameters stored as such (no MixedPrecisionPolicy)
  and ``stochastic_rounding=True``. Each rank rounds its shard with the parameter's seed and
  the shard's *local* element index, so the reference is a single process that trains every
  shard as a tensor of its own, seeded with its parameter's seed; it must match bit for bit.
  Every rank takes the full batch: the reduce-scatter of two equal bfloat16 gradients is exact.
* ``fsdp2-bf16-sr-dcp``: the same, resumed from a distributed checkpoint: exact.
* ``ddp-8bit`` / ``zero-8bit``: DDP and ZeRO with ``state_precision="8bit"`` (every tensor
  quantised), against the single-process run with 8-bit state. DDP's averaged gradients
  differ from the full batch's in the last bits, and ZeRO's per-rank optimizers number
  (and so seed) their parameters differently, so these agree to the quantisation noise
  (:data:`LOW_PRECISION_TOLERANCE`), not bit for bit.
* ``fsdp2-8bit``: FSDP2 with 8-bit state, every rank encoding its shard (DTensor codes and
  scales), the full batch on every rank: exactly the shards stepped as standalone tensors.
* ``fsdp2-8bit-dcp``: the same resumed from a distributed checkpoint: exact.

Each rank computes the reference itself, the max absolute difference is max-reduced over the
ranks, and rank 0 writes the results; the tests then check them per engine and path. Groups
run under a deadline and a collective timeout, so a hang fails instead of blocking.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.multiprocessing.spawn import ProcessException

from adopt import ADOPT
from path_params import path_params, usable_paths

with warnings.catch_warnings():
    # torch.distributed.optim scripts torch's own functional optimizers on import, and
    # torch.jit.script/interface are deprecated in PyTorch 2.13: torch's warning, not ours.
    warnings.filterwarnings(
        "ignore", message="`torch.jit.(script|interface)` is deprecated", category=DeprecationWarning
    )
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from adopt.distributed import FunctionalADOPT

WORLD = 2
STEPS = 6
SAVE_AT = 3  # fsdp2-dcp: checkpoint after this many steps
BATCH = 8  # full batch; each rank takes BATCH // WORLD rows
HP = dict(lr=1e-2, weight_decay=1e-2, decouple=True)  # default clip schedule
GROUP_DEADLINE_S = 150.0  # the whole spawned group, start-up included
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
# float32 all-reduce/reduce-scatter averages round differently from a full-batch mean.
TOLERANCE = 1e-5
EIGHT_BIT = dict(state_precision="8bit", min_8bit_size=0)
# 8-bit state: other random words (ZeRO) or a flipped code move a parameter by about
# lr * |m| / 16 per step; 6 steps of lr 1e-2.
LOW_PRECISION_TOLERANCE = 2e-3


def _model(seed: int = 0) -> nn.Sequential:
    """Two layers with an odd output width, so FSDP2 shards some parameters unevenly."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 3, generator=gen)) for _ in range(STEPS)]


def _local(batch: tuple[Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return batch[0][rows], batch[1][rows]


def _train(model: nn.Module, opt: Optional[Any], batches: list[tuple[Tensor, Tensor]], rank: Optional[int]) -> None:
    """Steps on the full batch (rank None) or this rank's half; ``opt=None`` steps in backward."""
    for batch in batches:
        x, y = batch if rank is None else _local(batch, rank)
        F.mse_loss(model(x), y).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        else:
            model.zero_grad()


def _reference(kw: dict[str, Any]) -> list[Tensor]:
    model = _model()
    _train(model, ADOPT(model.parameters(), **HP, **kw), _batches(), rank=None)
    return [p.detach() for p in model.parameters()]


def _run_ddp(rank: int, kw: dict[str, Any], _: Path) -> list[Tensor]:
    model = DDP(_model())
    _train(model, ADOPT(model.parameters(), **HP, **kw), _batches(), rank)
    return [p.detach() for p in model.module.parameters()]


def _sharded_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    model = _model(seed).to(dtype)
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model


def _run_fsdp2(rank: int, kw: dict[str, Any], _: Path) -> list[Tensor]:
    model = _sharded_model()
    opt = ADOPT(model.parameters(), **HP, **kw)
    _train(model, opt, _batches(), rank)
    state = opt.state[next(iter(model.parameters()))]
    assert type(state["exp_avg"]).__name__ == "DTensor", "FSDP2 optimizer state should be DTensor"
    return [p.detach().full_tensor() for p in model.parameters()]  # type: ignore[attr-defined]


def _run_zero(rank: int, kw: dict[str, Any], _: Path) -> list[Tensor]:
    model = DDP(_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ADOPT, **HP, **kw)
    _train(model, opt, _batches(), rank)
    return [p.detach() for p in model.module.parameters()]


def _run_ddp_overlap(rank: int, kw: dict[str, Any], _: Path) -> list[Tensor]:
    model = DDP(_model())
    model._register_fused_optim(FunctionalADOPT, **HP, **kw)
    _train(model, None, _batches(), rank)
    return [p.detach() for p in model.module.parameters()]


def _local_tensors(model: nn.Module, opt: ADOPT) -> list[Tensor]:
    """This rank's shards of the parameters and of every optimizer state tensor."""
    out = []
    for p in model.parameters():
        out.append(p.to_local().detach().clone())  # type: ignore[attr-defined]
        for value in opt.state[p].values():
            out.append((value.to_local() if hasattr(value, "to_local") else value).clone())
    return out


def _run_fsdp2_dcp(rank: int, kw: dict[str, Any], ckpt_dir: Path) -> list[Tensor]:
    """The resumed run's local tensors minus the uninterrupted run's: all zeros when exact."""
    return _resume_from_dcp(rank, kw, ckpt_dir, torch.float32, _batches(), rank)


def _bf16_batches() -> list[tuple[Tensor, Tensor]]:
    return [(x.bfloat16(), y.bfloat16()) for x, y in _batches()]


def _run_fsdp2_bf16_sr(rank: int, kw: dict[str, Any], _: Path) -> list[Tensor]:
    model = _sharded_model(dtype=torch.bfloat16)
    opt = ADOPT(model.parameters(), **HP, **kw, stochastic_rounding=True)
    _train(model, opt, _bf16_batches(), rank=None)
    assert opt.state[next(iter(model.parameters()))]["seed"].dtype == torch.int64
    return [p.detach().full_tensor() for p in model.parameters()]  # type: ignore[attr-defined]


def _shard_reference(kw: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> list[Tensor]:
    """One process, every parameter cut into its FSDP2 shards (``torch.chunk`` along dim 0),
    each rank's shards stepped by an ADOPT of their own (so shard ``r`` of parameter ``i`` has
    the seed of parameter ``i``, as on rank ``r``), each shard a tensor of its own."""
    model = _model().to(dtype)
    names = [name for name, _ in model.named_parameters()]
    shards = [[c.clone().requires_grad_() for c in torch.chunk(p.detach(), WORLD)] for p in model.parameters()]
    opts = [ADOPT([parts[r] for parts in shards], **HP, **kw) for r in range(WORLD)]
    batches = _bf16_batches() if dtype == torch.bfloat16 else _batches()
    for x, y in batches:
        whole = {name: torch.cat(parts) for name, parts in zip(names, shards)}
        F.mse_loss(torch.func.functional_call(model, whole, (x,)), y).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return [torch.cat(parts).detach() for parts in shards]


def _run_fsdp2_8bit(rank: int, kw: dict[str, Any], _: Path) -> list[Tensor]:
    model = _sharded_model()
    opt = ADOPT(model.parameters(), **HP, **kw, **EIGHT_BIT)
    _train(model, opt, _batches(), rank=None)
    state = opt.state[next(iter(model.parameters()))]
    assert type(state["exp_avg_codes"]).__name__ == "DTensor" and type(state["exp_avg_scales"]).__name__ == "DTensor"
    return [p.detach().full_tensor() for p in model.parameters()]  # type: ignore[attr-defined]


def _run_fsdp2_8bit_dcp(rank: int, kw: dict[str, Any], ckpt_dir: Path) -> list[Tensor]:
    return _resume_from_dcp(rank, {**kw, **EIGHT_BIT}, ckpt_dir, torch.float32, _batches(), rank)


def _run_fsdp2_bf16_sr_dcp(rank: int, kw: dict[str, Any], ckpt_dir: Path) -> list[Tensor]:
    return _resume_from_dcp(rank, {**kw, "stochastic_rounding": True}, ckpt_dir, torch.bfloat16, _bf16_batches(), None)


def _resume_from_dcp(
    rank: int, kw: dict[str, Any], ckpt_dir: Path, dtype: torch.dtype,
    batches: list[tuple[Tensor, Tensor]], data_rank: Optional[int],
) -> list[Tensor]:
    """Train, save with DCP at SAVE_AT, finish; load into a fresh model and finish again.
    ``data_rank``: whose half of each batch this rank takes (None: the full batch)."""
    model = _sharded_model(dtype=dtype)
    opt = ADOPT(model.parameters(), **HP, **kw)
    _train(model, opt, batches[:SAVE_AT], data_rank)
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=ckpt_dir,
    )
    _train(model, opt, batches[SAVE_AT:], data_rank)
    uninterrupted = _local_tensors(model, opt)

    fresh = _sharded_model(seed=123, dtype=dtype)
    fresh_opt = ADOPT(fresh.parameters(), **HP, **kw)
    state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    _train(fresh, fresh_opt, batches[SAVE_AT:], data_rank)
    resumed = _local_tensors(fresh, fresh_opt)
    assert len(resumed) == len(uninterrupted)
    return [r.float() - u.float() for r, u in zip(resumed, uninterrupted)]


def _run_ddp_8bit(rank: int, kw: dict[str, Any], out: Path) -> list[Tensor]:
    return _run_ddp(rank, {**kw, **EIGHT_BIT}, out)


def _run_zero_8bit(rank: int, kw: dict[str, Any], out: Path) -> list[Tensor]:
    return _run_zero(rank, {**kw, **EIGHT_BIT}, out)


RUNNERS: dict[str, Callable[[int, dict[str, Any], Path], list[Tensor]]] = {
    "ddp": _run_ddp,
    "fsdp2": _run_fsdp2,
    "zero": _run_zero,
    "ddp-overlap": _run_ddp_overlap,
    "fsdp2-dcp": _run_fsdp2_dcp,
    "fsdp2-bf16-sr": _run_fsdp2_bf16_sr,
    "fsdp2-bf16-sr-dcp": _run_fsdp2_bf16_sr_dcp,
    "ddp-8bit": _run_ddp_8bit,
    "zero-8bit": _run_zero_8bit,
    "fsdp2-8bit": _run_fsdp2_8bit,
    "fsdp2-8bit-dcp": _run_fsdp2_8bit_dcp,
}
LOW_PRECISION = ("ddp-8bit", "zero-8bit")
# Engines whose result must be exact: differences of a resumed run, or of a reference that
# rounds as the engine does.
RESUMED = ("fsdp2-dcp", "fsdp2-bf16-sr-dcp", "fsdp2-8bit-dcp")
EXACT = (*RESUMED, "fsdp2-bf16-sr", "fsdp2-8bit")


def _max_diff(engine: str, got: list[Tensor], kw: dict[str, Any]) -> float:
    if engine in RESUMED:
        diffs = got
    else:
        if engine == "fsdp2-bf16-sr":
            reference = _shard_reference({**kw, "stochastic_rounding": True})
        elif engine == "fsdp2-8bit":
            reference = _shard_reference({**kw, **EIGHT_BIT}, torch.float32)
        else:
            reference = _reference({**kw, **EIGHT_BIT} if engine in LOW_PRECISION else kw)
        diffs = [g.float() - r.float() for g, r in zip(got, reference, strict=True)]
    local = torch.tensor(max(float(d.abs().max()) if d.numel() else 0.0 for d in diffs))
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return float(local)


def _worker(rank: int, port: int, results_file: str, cases: list[tuple[str, str, dict[str, Any]]]) -> None:
    """One rank: run ``(engine, path, kwargs)`` cases in order; rank 0 rewrites ``results_file`` after each."""
    loopback = next((name for _, name in socket.if_nameindex() if name in ("lo", "lo0")), None)
    if loopback is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    results: dict[str, dict[str, Any]] = {}
    try:
        for engine, path, kw in cases:
            started = time.perf_counter()
            try:
                got = RUNNERS[engine](rank, kw, Path(results_file).parent / f"ckpt-{engine}-{path}")
                entry: dict[str, Any] = {"max_diff": _max_diff(engine, got, kw)}
            except Exception:  # recorded per case; the next case starts after a barrier
                entry = {"error": traceback.format_exc()}
            entry["seconds"] = round(time.perf_counter() - started, 3)
            results[f"{engine} / {path}"] = entry
            if rank == 0:
                Path(results_file).write_text(json.dumps(results, indent=1))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(fn: Callable[..., None], args: tuple[Any, ...], deadline_s: float) -> Optional[str]:
    """Run ``fn(rank, *args)`` on WORLD processes; None when all succeed, else what went wrong.

    Processes still alive at the deadline are killed.
    """
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                return f"the spawned group did not finish within {deadline_s:.0f} s"
    except ProcessException as exc:  # a rank raised outside a case, or crashed (signal)
        return str(exc)
    return None


def _run_cases(cases: list[tuple[str, str, dict[str, Any]]], out_dir: Path) -> dict[str, dict[str, Any]]:
    """Run the cases in spawned groups: one group, plus a fresh one after each crash.

    A rank that dies (e.g. a signal in a native kernel) loses only the case it was in; the
    cases after it run in a new group. A hang ends everything at the deadline instead.
    """
    results: dict[str, dict[str, Any]] = {}
    for attempt in range(len(cases)):
        pending = [c for c in cases if f"{c[0]} / {c[1]}" not in results]
        if not pending:
            break
        results_file = out_dir / f"results-{attempt}.json"
        failure = _spawn(_worker, (_free_port(), str(results_file), pending), GROUP_DEADLINE_S)
        if results_file.exists():
            results.update(json.loads(results_file.read_text()))
        if failure is None:
            break
        engine, path, _ = next(c for c in pending if f"{c[0]} / {c[1]}" not in results)
        results[f"{engine} / {path}"] = {"error": f"the spawned group died during this case: {failure}"}
        if failure.startswith("the spawned group did not finish"):
            for e, p, _ in pending:
                results.setdefault(f"{e} / {p}", {"error": f"not run: {engine} / {path} hung before it"})
            break
    return results


def _table(results: dict[str, dict[str, Any]], paths: list[str]) -> str:
    rows = [f"{'engine':<18}" + "".join(f"{p:>20}" for p in paths)]
    for engine in RUNNERS:
        entries = [results[f"{engine} / {p}"] for p in paths]
        cells = (f"{e['max_diff']:>20.3e}" if "max_diff" in e else f"{'ERROR':>20}" for e in entries)
        rows.append(f"{engine:<18}" + "".join(cells))
    return "\n".join(rows)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every engine with every usable path, keyed ``"engine / path"``; the table is printed."""
    paths = usable_paths()
    started = time.perf_counter()
    found = _run_cases(
        [(engine, path, kw) for engine in RUNNERS for path, kw in paths.items()],
        tmp_path_factory.mktemp("distributed"),
    )
    print(f"\nmax |param - single-process param| per engine and path ({time.perf_counter() - started:.1f} s):")
    print(_table(found, list(paths)))
    return found


@pytest.mark.parametrize("path", path_params())
@pytest.mark.parametrize("engine", list(RUNNERS))
def test_engine_matches_single_process(results: dict[str, dict[str, Any]], engine: str, path: str) -> None:
    entry = results[f"{engine} / {path}"]
    assert "error" not in entry, f"{engine} / {path} raised:\n{entry['error']}"
    if engine in RESUMED:
        assert entry["max_diff"] == 0.0, "resuming from the distributed checkpoint is not exact"
    elif engine in EXACT:
        assert entry["max_diff"] == 0.0, "the shards are not rounded as standalone tensors with their seed"
    elif engine in LOW_PRECISION:
        assert entry["max_diff"] <= LOW_PRECISION_TOLERANCE
    else:
        assert entry["max_diff"] <= TOLERANCE


# FunctionalADOPT in one process: what DDP's overlap hook (step_param) and ZeRO's overlap
# (step(gradients), with param_groups synced in) call, against the ADOPT class.


def _grads(step: int, params: list[Tensor]) -> list[Optional[Tensor]]:
    """Deterministic gradients; the second parameter has none at step 1 (skipped, as ADOPT does)."""
    gen = torch.Generator().manual_seed(100 + step)
    return [None if (i == 1 and step == 1) else torch.randn(p.shape, generator=gen) for i, p in enumerate(params)]


@pytest.mark.parametrize("path", path_params())
@pytest.mark.parametrize("api", ["step", "step_param"])
@pytest.mark.parametrize("variants", [{}, dict(nesterov=True, caution=True, corrected_weight_decay=True)],
                         ids=["plain", "variants"])
def test_functional_adopt_matches_adopt(path: str, api: str, variants: dict[str, bool]) -> None:
    kw = {**HP, **variants, **usable_paths()[path]}
    reference = [p.detach().clone().requires_grad_() for p in _model().parameters()]
    params = [p.detach().clone() for p in reference]
    opt = ADOPT(reference, **kw)
    functional = FunctionalADOPT(params if api == "step" else [], **kw, _allow_empty_param_list=api == "step_param")
    for step in range(5):
        if step == 3:  # an LR change as ZeroRedundancyOptimizer syncs it into param_group
            opt.param_groups[0]["lr"] = functional.param_group["lr"] = 3e-3
        grads = _grads(step, params)
        for p, g in zip(reference, grads):
            p.grad = g
        opt.step()
        if api == "step":
            functional.step(grads)
        else:
            for p, g in zip(params, grads):
                functional.step_param(p, g)
    for p, ref in zip(params, reference):
        assert torch.equal(p, ref.detach())
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(functional.state[p][key], opt.state[ref][key])


def test_functional_adopt_is_registered_for_torch_distributed() -> None:
    from torch.distributed.optim import as_functional_optim
    from torch.distributed.optim.utils import functional_optim_map

    made = as_functional_optim(FunctionalADOPT, 1e-2, decouple=True)  # how DDP builds it
    assert isinstance(made, FunctionalADOPT)
    assert made.param_group["lr"] == 1e-2 and made.param_group["decouple"] is True
    # ADOPT itself stays unmapped: DistributedOptimizer would otherwise TorchScript-compile it.
    assert ADOPT not in functional_optim_map


def test_functional_adopt_rejects_bad_arguments() -> None:
    params = [torch.zeros(2), torch.zeros(3)]
    with pytest.raises(ValueError, match="empty parameter list"):
        FunctionalADOPT([])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        FunctionalADOPT(params, lr=-1.0)
    with pytest.raises(ValueError, match="clip_lambda must be callable"):
        FunctionalADOPT(params, clip_lambda=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 1 gradients for 2 parameters"):
        FunctionalADOPT(params).step([torch.ones(2)])
