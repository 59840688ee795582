"""Rotary position embeddings in Mistral's native layout: rotation of consecutive pairs (0,1), (2,3), ...

Hugging Face checkpoints store wq/wk with rows permuted for the "rotate half" formulation; the loaders
undo that permutation, so the model only ever sees this layout.
"""

from __future__ import annotations

import torch


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Unit complex numbers e^{i * pos * f_j} for each position and frequency: [*positions.shape, head_dim // 2]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float()[..., None] * inv_freq
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, T, heads, head_dim] by `freqs_cis` [B, T, head_dim // 2] (computed in fp32)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, T, heads, head_dim // 2]
    rotated = torch.view_as_real(pairs * freqs_cis[:, :, None, :]).flatten(-2)  # [B, T, heads, head_dim]
    return rotated.type_as(x)
