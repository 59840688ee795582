"""The learning-rate schedule: linear warmup from 0, then cosine decay to `floor` x the peak.

Example:
    >>> scheduler = warmup_cosine(optimizer, warmup=10, total=100)
    >>> scheduler.step()  # once per optimizer step
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                  floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_factor`; its state_dict goes in checkpoints."""
    if warmup < 0 or total < 1:
        raise ValueError(f"schedule: need warmup >= 0 and total >= 1 steps, got {warmup} and {total}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, floor))
