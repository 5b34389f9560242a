"""ADOPT with FSDP2 (``fully_shard``): parameters and optimizer state sharded over processes.

Each process holds a shard of every parameter as a DTensor; ADOPT creates its state as
DTensors of the same layout, so each process updates only its shard. The optimizer state is
saved with ``torch.distributed.checkpoint`` (one checkpoint for all ranks) into
``--checkpoint-dir/step-N`` when that option is given, and a later run resumes from the
newest one there.

Run on the CPU with two processes (gloo):

    torchrun --nproc-per-node 2 examples/fsdp2.py

On GPUs the same script uses NCCL and one GPU per process.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from adopt import ADOPT


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps (default: 50)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="save a checkpoint here at the end, and resume from the newest one found (default: none)")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.exit(2, "examples/fsdp2.py runs one process per rank, started by torchrun:\n"
                       "    torchrun --nproc-per-node 2 examples/fsdp2.py\n")

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same initial weights and data on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = ADOPT(model.parameters(), lr=3e-3, weight_decay=1e-2, decouple=True)

    start = 0
    saved = sorted(args.checkpoint_dir.glob("step-*"), key=lambda d: int(d.name[5:])) if args.checkpoint_dir else []
    if saved:
        state: dict[str, Any] = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
        dcp.load(state, checkpoint_id=saved[-1])
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        start = int(saved[-1].name[5:])
        if rank == 0:
            print(f"resumed from {saved[-1]}")

    inputs = torch.randn(1024, 16, device=device)
    targets = torch.tanh(inputs @ torch.randn(16, 1, device=device))
    losses = []
    for _ in range(args.steps):
        # Every rank draws the same global batch and trains on its own slice of it.
        batch = torch.randint(len(inputs), (64 * world,), device=device).chunk(world)[rank]
        loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    if args.checkpoint_dir is not None:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=args.checkpoint_dir / f"step-{start + args.steps}")
    if rank == 0:
        print(f"{world} processes, steps {start}..{start + args.steps}")
        print(f"loss {losses[0]:.4f} -> {sum(losses[-5:]) / 5:.4f}")
    # Every rank reaches the end before any tears gloo down: without this, a rank that
    # destroys the group while its peer is still busy can abort at exit ("terminate called
    # without an active exception"), as it does with torch.optim.Adam too.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
