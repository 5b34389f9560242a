"""A plain training loop with ADOPT: a small MLP regressing a synthetic target on the CPU.

Run: ``python examples/train_basic.py``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from adopt import ADOPT


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Train for ``--epochs`` and return (first epoch's mean loss, last epoch's mean loss)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate (default: 3e-3)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    inputs = torch.randn(1024, 8)
    targets = torch.tanh(inputs @ torch.randn(8, 1) / 2) + 0.05 * torch.randn(1024, 1)
    model = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 1))
    # Decoupled weight decay (AdamW-style); ADOPT's default clip schedule bounds early updates.
    optimizer = ADOPT(model.parameters(), lr=args.lr, weight_decay=1e-2, decouple=True)

    losses = []
    for _ in range(args.epochs):
        total = 0.0
        for batch in torch.randperm(len(inputs)).split(64):
            loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(inputs))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses[0], losses[-1]


if __name__ == "__main__":
    main()
