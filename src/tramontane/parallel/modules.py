"""Modules swapped into a sharded model: the collectives live here, never in the model's own code.

- `AllReduce`: wraps a module whose output is this rank's partial sum (a row-parallel linear, wo or
  w2, or a whole mixture of experts) and adds the partial sums of the tensor-parallel group.
- `VocabParallelEmbedding` / `GatheredHead`: each rank holds a contiguous slice of the vocabulary.
- `LocalExperts`: Mixtral's experts of this rank only (expert parallel), the router replicated.
- `ReceiveHidden`, `SendAfter`, `ReceiveLogits`, `BroadcastLogits`: the pipeline's hand-offs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import StepMeta
from ..layers import FeedForward, route_to_experts
from .topology import Topology


class AllReduce(nn.Module):
    """`inner(x)` summed over the tensor-parallel group."""

    def __init__(self, inner: nn.Module, topology: Topology) -> None:
        super().__init__()
        self.inner = inner
        self.topology = topology

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.topology.all_reduce(self.inner(x).contiguous())


class VocabParallelEmbedding(nn.Module):
    """Token embeddings of the rows [start, start + n) of the vocabulary; the other tokens' rows come
    from the ranks that hold them (zeros here, one all-reduce: exactly one rank adds a non-zero row)."""

    def __init__(self, inner: nn.Module, start: int, rows: int, topology: Topology) -> None:
        super().__init__()
        self.inner, self.start, self.rows, self.topology = inner, start, rows, topology

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.rows)
        h = self.inner(local.masked_fill(outside, 0))  # [B, T, dim]
        return self.topology.all_reduce(h.masked_fill(outside[..., None], 0).contiguous())


class GatheredHead(nn.Module):
    """The output head over this rank's vocabulary slice, the slices of the group gathered: full logits."""

    def __init__(self, inner: nn.Module, topology: Topology) -> None:
        super().__init__()
        self.inner, self.topology = inner, topology

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.topology.all_gather_last(self.inner(h).float())


class TiedHead(nn.Module):
    """Projection with a (sharded) float embedding matrix, for tied models whose head is not `output`."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.embedding.weight)


class LocalExperts(nn.Module):
    """A mixture of experts that holds only some experts (a dict keyed by expert number, so their
    parameter names stay the checkpoint's); the router is whole, so every rank routes every token alike
    and adds what its own experts give. Its output is a partial sum: wrap it in `AllReduce`."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, local: range) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleDict({str(e): FeedForward(dim, hidden_dim) for e in local})
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return route_to_experts(x, self.gate, self.top_k,
                                lambda e: self.experts[str(e)] if str(e) in self.experts else None)


class ReceiveHidden(nn.Module):
    """In place of the embeddings on a later pipeline stage: the previous stage's hidden states."""

    def __init__(self, dim: int, dtype: torch.dtype, topology: Topology) -> None:
        super().__init__()
        self.dim, self.dtype, self.topology = dim, dtype, topology

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.empty(*tokens.shape, self.dim, dtype=self.dtype, device=tokens.device)  # [B, T, dim]
        return self.topology.recv_prev(h)


class SendAfter(nn.Module):
    """The last block of a stage that is not the last: its output also goes to the next stage."""

    def __init__(self, block: nn.Module, topology: Topology) -> None:
        super().__init__()
        self.block, self.topology = block, topology

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, meta: StepMeta, layer: int) -> torch.Tensor:
        h: torch.Tensor = self.block(x, freqs_cis, meta, layer)
        self.topology.send_next(h)
        return h


class ReceiveLogits(nn.Module):
    """In place of the head on a stage that is not the last: the logits the last stage broadcasts."""

    def __init__(self, vocab_size: int, topology: Topology) -> None:
        super().__init__()
        self.vocab_size, self.topology = vocab_size, topology

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.empty(*h.shape[:-1], self.vocab_size, dtype=torch.float32, device=h.device)
        return self.topology.broadcast_logits(logits)


class BroadcastLogits(nn.Module):
    """The last stage's head, its logits broadcast to every rank."""

    def __init__(self, head: nn.Module, topology: Topology) -> None:
        super().__init__()
        self.head, self.topology = head, topology

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.topology.broadcast_logits(self.head(h).float().contiguous())
