"""Mixed precision with ADOPT: float16 autocast and ``torch.amp.GradScaler``.

The scaler multiplies the loss so float16 gradients do not underflow, unscales them before
``optimizer.step()`` and skips a step (lowering the scale) when it finds inf/nan. ADOPT needs
nothing special for this. Runs on CUDA when available, else on the CPU (CPU autocast).

Run: ``python examples/amp_gradscaler.py``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from adopt import ADOPT


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Train for ``--steps``; return (first loss, mean of the last 10 losses)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    inputs = torch.randn(1024, 32, device=device)
    labels = (inputs[:, :4].sum(dim=1) > 0).long()
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 2)).to(device)
    optimizer = ADOPT(model.parameters(), lr=3e-3, weight_decay=1e-2, decouple=True)
    scaler = torch.amp.GradScaler(device.type)

    losses = []
    skipped = 0
    for step in range(args.steps):
        batch = torch.randint(len(inputs), (128,), device=device)
        with torch.autocast(device.type, dtype=torch.float16):
            logits = model(inputs[batch])
        loss = nn.functional.cross_entropy(logits.float(), labels[batch])
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(optimizer)  # unscales, then steps unless inf/nan was found
        scaler.update()
        skipped += scaler.get_scale() < scale  # the scale only drops after a skipped step
        losses.append(loss.item())
    last = sum(losses[-10:]) / 10
    print(f"skipped {skipped} of {args.steps} steps (inf/nan gradients); final scale {scaler.get_scale():.0f}")
    print(f"loss {losses[0]:.4f} -> {last:.4f}")
    return losses[0], last


if __name__ == "__main__":
    main()
