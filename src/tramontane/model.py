"""The transformer: embeddings, blocks, final norm, output head.

Example:
    >>> model = Transformer(args)                       # plain causal forward from position 0
    >>> logits = model(tokens)                          # [batch, seq, vocab]
    >>> cache = KVCache.create(args, batch_size=1, capacity=256)
    >>> logits = model(tokens, positions, cache=cache)  # incremental, see cache/rolling.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .args import ModelArgs
from .cache import KVCache, PagedBatch, step_meta
from .layers import Block, RMSNorm
from .rope import rotary_angles

if TYPE_CHECKING:
    from .cache import StepMeta
    from .parallel.topology import Topology


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # given its weight, nn.Embedding skips its normal_ init, which on the meta device (where every
        # loader builds the model) runs a Python reference that imports torch._dynamo: 1.6 s per start
        table = torch.empty(args.vocab_size, args.dim)
        if not table.is_meta:
            nn.init.normal_(table)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=table)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied models (SmolLM2, small Llamas) project with the embedding matrix and own no `output`;
        # nor do models with a task head (heads.TaskModel), which project to labels instead, nor bare
        # ones (embedding models), which give hidden states only.
        lm_head = not args.tied_embeddings and args.head is None and not args.bare
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False) if lm_head else None
        # This rank's place when the model is one share of a torch.distributed job (parallel/shard.py
        # sets it; `args` are then the share's: its heads, hidden units and layers).
        self.parallel: Topology | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the norms: quantization transforms leave them alone)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | PagedBatch | None = None,
        rows: torch.Tensor | None = None,
        last_only: bool = False,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (fp32) for `tokens` [B, T] at `positions` [B, T].

        Without a cache and positions this is the causal forward from position 0. With a cache,
        positions are required; `rows` [B] picks the cache rows (default rows 0..B-1), or a `PagedBatch`
        gives block tables instead. `last_only` computes logits for the last position only
        ([B, 1, vocab]), which is all a prefill needs. `segments` [B, T] (no cache) packs several
        sequences into one row, as training batches do: a token attends only to earlier tokens of its
        own segment, and each sequence's positions start again at 0.

        This is the reference computation, in PyTorch operations only; generation runs its steps through
        a step backend (`step_backends.choose_backend`), which may run the same blocks natively.
        """
        return self.project(self.features(tokens, positions, cache, rows, last_only, segments))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (fp32) of final-norm hidden states `h` [..., dim]: training scores only the rows it
        needs (the targets) through this.

        Raises:
            ValueError: the model is bare (an embedding model): it has no output layer to give logits.
        """
        if self.args.bare:
            raise ValueError("model: this is a bare transformer (config.json architectures: MistralModel, as embedding "
                             "models ship), with no language-model head: it gives no logits. Use "
                             "model.features(tokens) for its hidden states, or tramontane.embed(...)")
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight).float()
        return self.output(h).float()

    def features(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | PagedBatch | None = None,
        rows: torch.Tensor | None = None,
        last_only: bool = False,
        segments: torch.Tensor | None = None,
        recompute: bool = False,
    ) -> torch.Tensor:
        """The final-norm hidden states [B, T, dim] (T = 1 with `last_only`) that the output head reads;
        arguments as for `forward`. With `recompute` (training: gradient checkpointing), autograd keeps
        only each block's input and runs the block again in the backward pass: one block's activations
        held at a time instead of every block's, for about a third more arithmetic."""
        positions = step_positions(tokens, positions, cache, segments)
        meta = step_meta(positions, self.args.sliding_window, cache, rows, segments)
        h = self.blocks(self.tok_embeddings(tokens), meta, recompute=recompute)
        return self.finish(h, meta, last_only)

    def blocks(self, h: torch.Tensor, meta: StepMeta, freqs_cis: torch.Tensor | None = None,
               recompute: bool = False) -> torch.Tensor:
        """Hidden states `h` [B, T, dim] through every block, in Python, for the step `meta` describes;
        `freqs_cis` are the rotary angles of `meta.positions` when the caller has them already."""
        if freqs_cis is None:
            freqs_cis = rotary_angles(meta.positions, self.args.head_dim, self.args.rope_theta)
        for i, layer in enumerate(self.layers):
            if recompute and torch.is_grad_enabled():
                h = checkpoint(layer, h, freqs_cis, meta, i, use_reentrant=False)  # RNG kept: same dropout
            else:
                h = layer(h, freqs_cis, meta, i)
        return h

    def finish(self, h: torch.Tensor, meta: StepMeta, last_only: bool = False,
               logits_of: torch.Tensor | None = None) -> torch.Tensor:
        """After the blocks: record the step's positions in the cache, and the final norm (of the last
        position only with `last_only`; of the rows `logits_of` [K] only, when given)."""
        meta.commit()
        if last_only:
            h = h[:, -1:]
        if logits_of is not None:
            h = h[logits_of]
        return self.norm(h)


def step_positions(tokens: torch.Tensor, positions: torch.Tensor | None, cache: object | None,
                   segments: torch.Tensor | None = None) -> torch.Tensor:
    """The positions [B, T] of a step of `tokens` [B, T], checked; from 0 when not given (no cache).

    Raises:
        ValueError: a shape does not match, or a cached step has no positions.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    B, T = tokens.shape
    if positions is None:
        if cache is not None:
            raise ValueError("positions are required when a cache is given")
        positions = torch.arange(T, device=tokens.device).expand(B, T)
    elif positions.shape != tokens.shape:
        raise ValueError(f"positions {tuple(positions.shape)} must match tokens {tuple(tokens.shape)}")
    if segments is not None and segments.shape != tokens.shape:
        raise ValueError(f"segments {tuple(segments.shape)} must match tokens {tuple(tokens.shape)}")
    return positions
