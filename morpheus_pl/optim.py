"""Optimiser and learning-rate schedule shared by the LightningModules."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import nn


def adamw_param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters so that biases and normalisation weights (1-d) get no decay."""
    decay, no_decay = [], []
    for param in module.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the base rate, then cosine decay to ``min_lr_ratio`` of it.

    Meant to be stepped once per optimiser step.
    """
    warmup_steps = max(0, min(warmup_steps, total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw_warmup_cosine(
    module: pl.LightningModule,
    lr: float,
    weight_decay: float,
    warmup_epochs: float,
    min_lr_ratio: float = 0.0,
) -> dict:
    """Return Lightning's optimiser configuration: AdamW with per-step warm-up and cosine."""
    groups = adamw_param_groups(module, weight_decay)
    params = [p for group in groups for p in group["params"]]
    # The fused kernel updates all tensors at once, about 5x faster on CPU than the
    # per-tensor loop (measured). It needs floating-point parameters on a CPU or CUDA device.
    fused = bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=fused)
    trainer = module.trainer
    total = int(trainer.estimated_stepping_batches)
    epochs = max(1, trainer.max_epochs or 1)
    warmup = math.ceil(warmup_epochs * total / epochs)
    scheduler = warmup_cosine(optimizer, warmup, total, min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
