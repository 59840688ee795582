"""The runner: executes a scheduler's `Plan` on the model over the paged KV pool, and nothing else.

Example:
    >>> runner = Runner(model, pool)
    >>> seqs, logits = runner.execute(scheduler.schedule())   # logits [len(seqs), vocab]
"""

from __future__ import annotations

import torch

from ..cache import PagedKVCache
from ..model import Transformer
from ..multi_lora import AdapterRows
from .scheduler import Plan, Sequence


class Runner:
    """Runs one step: the plan's prompt chunk (if any), then one decode token for each decoding sequence."""

    def __init__(self, model: Transformer, pool: PagedKVCache, adapters: AdapterRows | None = None) -> None:
        self.model = model
        self.pool = pool
        self.adapters = adapters  # with served LoRA adapters: set to each row's before every forward

    def _select(self, seqs: list[Sequence]) -> None:
        if self.adapters is not None:
            self.adapters.index = torch.tensor([s.adapter for s in seqs], device=self.model.device)

    def execute(self, plan: Plan) -> tuple[list[Sequence], torch.Tensor | None]:
        """The sequences that produced next-token logits this step (a prompt's last chunk, every decode)
        and those logits [N, vocab], or None when there are none. The caller advances the scheduler."""
        device = self.model.device
        self.pool.clear(plan.new_blocks)
        seqs: list[Sequence] = []
        rows: list[torch.Tensor] = []
        if (chunk := plan.prefill) is not None:
            seq = chunk.seq
            tokens = torch.tensor([seq.tokens[chunk.start : chunk.start + chunk.length]], device=device)
            positions = torch.arange(chunk.start, chunk.start + chunk.length, device=device)[None]
            batch = self.pool.batch([seq.blocks], [seq.first_block])
            self._select([seq])
            logits = self.model(tokens, positions, cache=batch, last_only=True)[:, -1]
            if chunk.last:
                seqs.append(seq)
                rows.append(logits)
        if plan.decode:
            tokens = torch.tensor([[s.tokens[-1]] for s in plan.decode], device=device)
            positions = torch.tensor([[len(s.tokens) - 1] for s in plan.decode], device=device)
            batch = self.pool.batch([s.blocks for s in plan.decode], [s.first_block for s in plan.decode])
            seqs.extend(plan.decode)
            self._select(plan.decode)
            rows.append(self.model(tokens, positions, cache=batch)[:, 0])
        if not rows:
            return seqs, None
        return seqs, rows[0] if len(rows) == 1 else torch.cat(rows)
