"""ADOPT with a learning-rate warm-up followed by cosine decay (standard torch schedulers).

``LinearLR`` ramps the lr up over the first ``--warmup`` steps, then ``CosineAnnealingLR``
decays it to ``--min-lr``; ``SequentialLR`` chains them. ``scheduler.step()`` runs once per
optimizer step, after it.

Run: ``python examples/lr_schedule.py``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from adopt import ADOPT


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Train for ``--steps``; return (first loss, mean of the last 10 losses)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    parser.add_argument("--warmup", type=int, default=20, help="linear warm-up steps (default: 20)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    parser.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay (default: 1e-5)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    inputs = torch.randn(512, 16)
    targets = inputs @ torch.randn(16, 4)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    optimizer = ADOPT(model.parameters(), lr=args.lr)
    scheduler = SequentialLR(
        optimizer,
        [
            LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=args.warmup),
            CosineAnnealingLR(optimizer, T_max=args.steps - args.warmup, eta_min=args.min_lr),
        ],
        milestones=[args.warmup],
    )

    losses, lrs = [], []
    for _ in range(args.steps):
        batch = torch.randint(len(inputs), (64,))
        loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.step()
        losses.append(loss.item())
    last = sum(losses[-10:]) / 10
    print(f"lr {lrs[0]:.2e} -> peak {max(lrs):.2e} at step {lrs.index(max(lrs))} -> {lrs[-1]:.2e}")
    print(f"loss {losses[0]:.4f} -> {last:.4f}")
    return losses[0], last


if __name__ == "__main__":
    main()
