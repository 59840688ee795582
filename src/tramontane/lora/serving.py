"""Many LoRA adapters over one base model, each batch row with its own (as S-LoRA and punica serve them).

`serve_adapters` swaps every adapted projection for a `MultiLoraLinear` holding all adapters stacked:
A [n + 1, r, in] and B [n + 1, out, r] (scaling folded into B, ranks zero-padded to the largest, slot 0
all zeros: the base model). Before each forward the caller says which adapter each batch row uses by
setting `AdapterRows.index` [B]; each projection then adds `B[i] @ A[i] @ x` row by row through two
batched products over the gathered stacks. Rows with different adapters share one step.

A Mixtral layer routes tokens to experts across rows, so its experts see tokens, not rows: the whole
sparse feed-forward is wrapped in `ByAdapter`, which runs it once per adapter present over that
adapter's rows (routing is per token, so this is exact), with `AdapterRows.single` naming the adapter.

Example:
    >>> rows = serve_adapters(model, [read_adapter("a/", model.args), read_adapter("b/", model.args)])
    >>> rows.index = torch.tensor([0, 2, 1])   # row 0: base, row 1: adapter "b", row 2: adapter "a"
    >>> logits = model(tokens)                 # tokens [3, T]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn

from ..fuse import unfuse_projections
from ..layers import MoeFeedForward
from ..model import Transformer
from .modules import LoraWeights, lora_slots


class AdapterRows:
    """Which adapter each batch row of the next forward uses (0: none, i: the i-th adapter served).
    Shared by every MultiLoraLinear of a model; the engine's runner sets it before each step."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.index: torch.Tensor | None = None  # [B] int64; None: every row uses the base model
        self.single: int | None = None  # inside `ByAdapter`: the one adapter of the rows being run


class MultiLoraLinear(nn.Module):
    """A frozen `base` linear plus, per batch row, the update of the adapter `rows.index` picks."""

    a: torch.Tensor
    b: torch.Tensor

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, rows: AdapterRows) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = cast(int, base.in_features), cast(int, base.out_features)
        self.register_buffer("a", a)  # [n + 1, r, in]
        self.register_buffer("b", b)  # [n + 1, out, r], scaling folded in
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [B, T, out], or [N, out] for an expert's tokens
        index, single = self.rows.index, self.rows.single
        if single is None and index is not None and bool((index == index[0]).all()):
            single = int(index[0])  # one adapter for the whole batch (every prefill): one plain product
        if single is not None or index is None:
            if not single:
                return y
            h = x.to(self.a.dtype)
            return y + ((h @ self.a[single].T) @ self.b[single].T).to(y.dtype)
        if x.dim() != 3 or index.shape[0] != x.shape[0]:
            raise ValueError(f"adapter rows: {index.shape[0]} indices for input {tuple(x.shape)} (want [B, T, in])")
        a, b = self.a[index], self.b[index]  # [B, r, in], [B, out, r]
        h = x.to(a.dtype)
        update = torch.matmul(torch.matmul(h, a.transpose(1, 2)), b.transpose(1, 2))  # [B, T, r] -> [B, T, out]
        return y + update.to(y.dtype)


class ByAdapter(nn.Module):
    """Runs `inner` ([B, T, dim] -> same) once per adapter among the rows, over those rows only."""

    def __init__(self, inner: nn.Module, rows: AdapterRows) -> None:
        super().__init__()
        self.inner = inner
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self.rows.index
        if index is None:
            return cast(torch.Tensor, self.inner(x))
        out = torch.empty_like(x)
        try:
            for adapter in index.unique().tolist():
                sel = torch.nonzero(index == adapter).squeeze(1)  # the rows of this adapter
                self.rows.single = int(adapter)
                out[sel] = self.inner(x[sel])
        finally:
            self.rows.single = None
        return out


def serve_adapters(model: Transformer, adapters: Sequence[Mapping[str, LoraWeights]]) -> AdapterRows:
    """Give `model` every adapter of `adapters` at once (adapter i + 1 in `AdapterRows.index`), in place;
    returns the rows selector its MultiLoraLinear modules read. Fused projections are split back.

    Raises:
        ValueError: an adapter names a projection the model lacks (read adapters with `read_adapter`,
            which checks them against the model's shapes).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    unfuse_projections(model)
    rows = AdapterRows(len(adapters))
    slots = {qualified: (parent, name) for qualified, parent, name in lora_slots(model)}
    names = sorted({name for adapter in adapters for name in adapter})
    for qualified in names:
        if qualified not in slots:
            raise ValueError(f"{qualified}: not a projection of this model")
        parent, name = slots[qualified]
        base = getattr(parent, name)
        weights = [adapter.get(qualified) for adapter in adapters]
        rank = max(w.rank for w in weights if w is not None)
        device = next(iter([*base.parameters(), *base.buffers()])).device
        a = torch.zeros(len(adapters) + 1, rank, base.in_features, device=device)
        b = torch.zeros(len(adapters) + 1, base.out_features, rank, device=device)
        for i, w in enumerate(weights, start=1):
            if w is not None:
                a[i, : w.rank] = w.a.float()
                b[i, :, : w.rank] = w.b.float() * w.scaling
        setattr(parent, name, MultiLoraLinear(base, a, b, rows))
    if any(".experts." in name for name in names):
        for layer in model.layers:
            if isinstance(layer.feed_forward, MoeFeedForward):
                layer.feed_forward = ByAdapter(layer.feed_forward, rows)
    return rows
