"""ADOPT in PyTorch Lightning: ``configure_optimizers`` returns it with a per-step LR schedule.

Requires ``pip install lightning``. Trains a small classifier on the CPU for a few epochs.

Run: ``python examples/lightning_module.py``
"""

from __future__ import annotations

import argparse
import math
import lightning as L
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, TensorDataset

from adopt import ADOPT


class Classifier(L.LightningModule):
    """A two-layer MLP trained with ADOPT, warm-up then cosine decay per optimizer step."""

    def __init__(self, lr: float = 3e-3, warmup_steps: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr, self.warmup_steps = lr, warmup_steps
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self.net(inputs), labels)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = ADOPT(self.parameters(), lr=self.lr, weight_decay=1e-2, decouple=True)
        total = self.trainer.estimated_stepping_batches
        warmup = self.warmup_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        scheduler = LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Fit for ``--epochs``; return (mean loss of the first 5 steps, of the last 5 steps)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    inputs = torch.randn(1024, 20)
    labels = (inputs[:, :3] @ torch.randn(3, 3)).argmax(dim=1)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=64, shuffle=True)
    model = Classifier()
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    first, last = sum(model.losses[:5]) / 5, sum(model.losses[-5:]) / 5
    print(f"loss {first:.4f} -> {last:.4f}")
    return first, last


if __name__ == "__main__":
    main()
