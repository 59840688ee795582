"""The training loss: summed cross-entropy of the scored rows' logits.

With a frozen float output head (adapters on a float base; the tied embedding table counts) the logits are
never held whole: `head_cross_entropy` walks the vocabulary in slices of `VOCAB_SLICE` columns, keeping a
running log-sum-exp per row, and its backward computes each slice's logits again to turn them into the
gradient of the hidden states. Whole logits of 512 rows of SmolLM2 (49,152 entries) take 100 MB in fp32,
and each of their copies (the fp32 cast, log-softmax, its gradient, the zeros the target gradient is
scattered into) was fresh memory whose first touch cost up to a third of a step; a slice stays in cache.
The price is one more product of the head in the backward. A head that trains (full training), is
quantized (QLoRA's) or is a task head takes the plain path, `F.cross_entropy` over `model.project`.

Example:
    >>> loss = scored_loss(model, h[scored], targets[scored])  # h: final-norm features [N, dim]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..lora import frozen_head
from ..model import Transformer

VOCAB_SLICE = 4096  # columns of logits at a time: 512 rows of fp32 are 8 MiB


def scored_loss(model: Transformer, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the logits of hidden states `h` [N, dim] against `targets` [N]."""
    weight = frozen_head(model)
    if weight is None or torch.is_autocast_enabled(h.device.type):
        return F.cross_entropy(model.project(h), targets, reduction="sum")
    return head_cross_entropy(h, weight, targets)


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i (logsumexp(l_i) - l_i[targets_i]) with l = (h @ weight.T) in fp32, the product taken in the
    weight's dtype as the head's own forward takes it; the gradient flows to `h` only."""
    return _HeadCrossEntropy.apply(h, weight, targets)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = h.to(weight.dtype)  # [N, dim]
        n = x.shape[0]
        top = torch.full((n,), float("-inf"), device=h.device)  # running max per row
        total = torch.zeros(n, device=h.device)  # running sum of exp(logit - top)
        picked = torch.zeros(n, device=h.device)  # each row's target logit
        for v0 in range(0, weight.shape[0], VOCAB_SLICE):
            logits = _slice_logits(x, weight, v0)  # [N, slice]
            rows, cols = _targets_in(targets, v0, logits.shape[1])
            picked[rows] = logits[rows, cols]
            new_top = torch.maximum(top, logits.amax(dim=1))
            total = total * torch.exp(top - new_top) + torch.exp(logits - new_top[:, None]).sum(dim=1)
            top = new_top
        lse = top + torch.log(total)  # [N]
        ctx.save_for_backward(x, weight, targets, lse)
        ctx.h_dtype = h.dtype
        return (lse - picked).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, weight, targets, lse = ctx.saved_tensors
        grad_h = torch.zeros(x.shape, device=x.device)  # [N, dim] fp32
        for v0 in range(0, weight.shape[0], VOCAB_SLICE):
            probs = _slice_logits(x, weight, v0).sub_(lse[:, None]).exp_()  # softmax slice [N, slice]
            rows, cols = _targets_in(targets, v0, probs.shape[1])
            probs[rows, cols] -= 1.0  # d(loss)/d(logits) = softmax - one-hot
            probs.mul_(grad)
            grad_h += torch.mm(probs.to(weight.dtype), weight[v0:v0 + probs.shape[1]]).float()
        return grad_h.to(ctx.h_dtype), None, None


def _targets_in(targets: torch.Tensor, v0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns within the slice) of the targets that fall in vocabulary columns v0..v0+width."""
    rows = torch.nonzero((targets >= v0) & (targets < v0 + width)).squeeze(1)
    return rows, targets[rows] - v0


def _slice_logits(x: torch.Tensor, weight: torch.Tensor, v0: int) -> torch.Tensor:
    """fp32 logits of columns v0.. (at most VOCAB_SLICE) of the head, [N, slice]."""
    return torch.mm(x, weight[v0:v0 + VOCAB_SLICE].t()).float()
