"""The training loss: summed cross-entropy of the scored rows' logits.

With a frozen float output head (LoRA and QLoRA training; the tied embedding table counts) the logits are
never held whole: `head_cross_entropy` walks the vocabulary in slices of `VOCAB_SLICE` columns, keeping a
running log-sum-exp per row, and its backward computes each slice's logits again to turn them into the
gradient of the hidden states. Whole logits of 512 rows of SmolLM2 (49,152 entries) take 100 MB in fp32,
and each of their copies (the fp32 cast, log-softmax, its gradient, the zeros the target gradient is
scattered into) was fresh memory whose first touch cost up to a third of a step; a slice stays in cache.
The price is one more product of the head in the backward. A head that trains (full training) or is
quantized takes the plain path, `F.cross_entropy` over `model.project`.

Example:
    >>> loss = scored_loss(model, h[scored], targets[scored])  # h: final-norm features [N, dim]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Transformer

VOCAB_SLICE = 4096  # columns of logits at a time: 512 rows of fp32 are 8 MiB


def frozen_head(model: Transformer) -> torch.Tensor | None:
    """The output head's weight [vocab, dim] when it is a frozen float matrix (an `nn.Linear` such as
    lora.FrozenLinear, or the tied embedding table), else None."""
    head = model.output
    if head is None:
        weight = model.tok_embeddings.weight
    elif isinstance(head, nn.Linear) and head.bias is None:  # FrozenLinear and FastLinear too: the same product
        weight = head.weight
    else:
        return None
    frozen = isinstance(weight, torch.Tensor) and weight.is_floating_point() and not weight.requires_grad
    return weight if frozen else None


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
        rows = torch.arange(n, device=h.device)
        for v0 in range(0, weight.shape[0], VOCAB_SLICE):
            logits = _slice_logits(x, weight, v0)  # [N, slice]
            here = (targets >= v0) & (targets < v0 + logits.shape[1])
            picked[here] = logits[rows[here], targets[here] - v0]
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
        n = x.shape[0]
        rows = torch.arange(n, device=x.device)
        grad_h = torch.zeros(n, x.shape[1], device=x.device)  # [N, dim] fp32
        for v0 in range(0, weight.shape[0], VOCAB_SLICE):
            probs = _slice_logits(x, weight, v0).sub_(lse[:, None]).exp_()  # softmax slice [N, slice]
            here = (targets >= v0) & (targets < v0 + probs.shape[1])
            probs[rows[here], targets[here] - v0] -= 1.0  # d(loss)/d(logits) = softmax - one-hot
            probs.mul_(grad)
            grad_h += torch.mm(probs.to(weight.dtype), weight[v0:v0 + probs.shape[1]]).float()
        return grad_h.to(ctx.h_dtype), None, None


def _slice_logits(x: torch.Tensor, weight: torch.Tensor, v0: int) -> torch.Tensor:
    """fp32 logits of columns v0.. (at most VOCAB_SLICE) of the head, [N, slice]."""
    return torch.mm(x, weight[v0:v0 + VOCAB_SLICE].t()).float()
