"""The runner: executes a scheduler's `Plan` on the model over the paged KV pool, and nothing else.

A plan becomes `StepInputs` first: token ids, positions and block ids only, so that in a parallel job
rank 0 can hand them to the other ranks (`Topology.from_leader`), which run the same step on their
shares of the model without a scheduler of their own.

Example:
    >>> runner = Runner(model, pool)
    >>> seqs, logits = runner.execute(scheduler.schedule())   # logits [len(seqs), vocab]
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..cache import PagedKVCache
from ..lora.serving import AdapterRows
from ..model import Transformer
from ..parallel.topology import wait_all
from ..step_backends import choose_backend
from .drafters import StepCosts
from .scheduler import Chunk, Plan, Sequence


@dataclass(frozen=True)
class Forward:
    """One forward call: row b feeds `tokens[b]` from position `starts[b]` over block table `tables[b]`
    (whose first entry is logical block `first_blocks[b]`) with LoRA adapter `adapters[b]`."""

    tokens: list[list[int]]
    starts: list[int]
    tables: list[list[int]]
    first_blocks: list[int]
    adapters: list[int]

    @classmethod
    def of(cls, seqs: list[Sequence], tokens: list[list[int]], starts: list[int]) -> Forward:
        return cls(tokens, starts, [list(s.blocks) for s in seqs], [s.first_block for s in seqs],
                   [s.adapter for s in seqs])

    def split(self, groups: int) -> list[Forward]:
        """The rows in `groups` contiguous groups as even as can be."""
        n = len(self.tokens)
        bounds = [n * g // groups for g in range(groups + 1)]
        return [Forward(self.tokens[a:b], self.starts[a:b], self.tables[a:b], self.first_blocks[a:b],
                        self.adapters[a:b]) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class StepInputs:
    """What every rank needs to run one step: blocks to zero first, prompt chunks (one forward per length,
    a row per chunk of that length: each row's last position's logits), the step's rows of one token
    each (`decode`: the tokens of its short prompt chunks, then one decode token per decoding sequence;
    `logits_of` the rows whose logits are sampled, None for all) or, in a step that checks drafts, every
    decoding sequence's last token and its drafts (none for some), padded to one length by repeating the
    row's last token (every position's logits)."""

    new_blocks: list[int]
    prefills: list[Forward]
    decode: Forward | None
    verify: Forward | None = None
    logits_of: list[int] | None = None


@dataclass(frozen=True)
class StepLogits:
    """A step's logits: per prompt forward its rows' last positions [rows, V], the decode rows [B, V] and
    the verifying rows at every position [B', T, V] (None for a part the step does not have)."""

    prefills: list[torch.Tensor]
    decode: torch.Tensor | None
    verify: torch.Tensor | None


# A prompt chunk that ends before this position runs as rows of the step's one forward of single tokens,
# beside the decode rows and the other short chunks, when the step has more than that one chunk: the
# weights are then read (and, beyond the small-batch limit, dequantized) once per step instead of once per
# chunk length. Each of its rows attends to at most this many keys, as a decode row does.
FLAT_REACH = 512


def split_chunks(plan: Plan) -> tuple[list[Chunk], list[Chunk]]:
    """The plan's prompt chunks that run as rows of the step's flat forward, and the others (all of them in
    a step that checks drafts: its verifying rows are a forward of their own, of every position's logits)."""
    short = [c for c in plan.prefills if c.start + c.length <= FLAT_REACH]
    if len(short) + len(plan.decode) < 2 or plan.verify:  # a lone chunk: a forward of its own, as [1, T]
        return [], plan.prefills
    return short, [c for c in plan.prefills if c.start + c.length > FLAT_REACH]


def chunks_by_length(chunks: list[Chunk]) -> list[list[Chunk]]:
    """A plan's prompt chunks grouped by length, in order of first appearance: each group is one forward."""
    groups: dict[int, list[Chunk]] = {}
    for chunk in chunks:
        groups.setdefault(chunk.length, []).append(chunk)
    return list(groups.values())


class Runner:
    """Runs one step: the plan's prompt chunks (if any), then one decode token for each decoding sequence."""

    def __init__(self, model: Transformer, pool: PagedKVCache, adapters: AdapterRows | None = None,
                 costs: StepCosts | None = None) -> None:
        self.model = model
        self.pool = pool
        self.adapters = adapters  # with served LoRA adapters: set to each row's before every forward
        self.step = choose_backend(model)  # once: the model's modules are fixed while it serves
        self.costs = costs or StepCosts()  # the decode forwards' times by rows, for speculative decoding

    @staticmethod
    def inputs(plan: Plan) -> StepInputs:
        flat, rest = split_chunks(plan)
        prefills = [Forward.of([c.seq for c in group], [c.seq.tokens[c.start : c.start + c.length] for c in group],
                               [c.start for c in group]) for group in chunks_by_length(rest)]
        seqs, tokens, starts, sampled = [], [], [], []
        for chunk in flat:
            for at in range(chunk.start, chunk.start + chunk.length):
                seqs.append(chunk.seq)
                tokens.append([chunk.seq.tokens[at]])
                starts.append(at)
            if chunk.last:
                sampled.append(len(tokens) - 1)
        for seq in plan.decode:
            sampled.append(len(tokens))
            seqs.append(seq)
            tokens.append([seq.tokens[-1]])
            starts.append(len(seq.tokens) - 1)
        decode = Forward.of(seqs, tokens, starts) if tokens else None
        logits_of = sampled if flat else None
        verify = None
        if plan.verify:
            width = max(len(s.draft) for s in plan.verify)
            verify = Forward.of(plan.verify, [[s.tokens[-1], *s.draft, *(s.draft or s.tokens)[-1:] * (width - len(s.draft))]
                                              for s in plan.verify], [len(s.tokens) - 1 for s in plan.verify])
        return StepInputs(list(plan.new_blocks), prefills, decode, verify, logits_of)

    def run(self, inputs: StepInputs) -> StepLogits:
        self.pool.clear(inputs.new_blocks)
        prefills = [self._forward(f, last_only=True)[:, -1] for f in inputs.prefills]
        decode = verify = None
        t0 = time.perf_counter()
        if inputs.decode is not None:
            decode = self._decode(inputs.decode, inputs.logits_of)
            self.costs.observe(len(inputs.decode.tokens), time.perf_counter() - t0)
        elif inputs.verify is not None:
            verify = self._forward(inputs.verify, last_only=False)
            self.costs.observe(len(inputs.verify.tokens) * len(inputs.verify.tokens[0]), time.perf_counter() - t0)
        return StepLogits(prefills, decode, verify)

    def _decode(self, f: Forward, logits_of: list[int] | None) -> torch.Tensor:
        """The logits [K, vocab] of the rows `logits_of` (all B rows when None). On a pipeline, rows of
        decode tokens only run as `ParallelConfig.groups_for(B)` groups in flight: the first stage starts
        the next group while the last stage computes this one, and the logits are waited for once every
        group is on its way."""
        topology = self.model.parallel
        groups = 1 if topology is None or logits_of is not None else topology.config.groups_for(len(f.tokens))
        if groups == 1 or topology is None:
            return self._forward(f, last_only=False, logits_of=logits_of)[:, 0]
        outs, pending = [], []
        for part in f.split(groups):
            with topology.deferred_logits() as started:
                outs.append(self._forward(part, last_only=False)[:, 0])
            pending.extend(started)
        wait_all(pending)
        return torch.cat(outs)

    def _forward(self, f: Forward, last_only: bool, logits_of: list[int] | None = None) -> torch.Tensor:
        device = self.model.device
        tokens = torch.tensor(f.tokens, device=device)  # [B, T]
        positions = torch.tensor(f.starts, device=device)[:, None] + torch.arange(tokens.shape[1], device=device)
        if self.adapters is not None:
            self.adapters.index = torch.tensor(f.adapters, device=device)
        batch = self.pool.batch(f.tables, f.first_blocks)
        rows = None if logits_of is None else torch.tensor(logits_of, device=device)
        return self.step(tokens, positions, batch, last_only=last_only, logits_of=rows)

    def execute(self, plan: Plan, inputs: StepInputs | None = None
                ) -> tuple[list[Sequence], torch.Tensor | None, torch.Tensor | None]:
        """The sequences that produced next-token logits this step (a prompt's last chunk, every decode)
        and those logits [N, vocab], or None when there are none; then the verifying rows' logits
        [len(plan.verify), T, vocab] (or None). The caller advances the scheduler. `inputs` are the plan's
        (`inputs(plan)`) when the caller has them already."""
        out = self.run(inputs or self.inputs(plan))
        flat, rest = split_chunks(plan)
        seqs: list[Sequence] = []
        rows: list[torch.Tensor] = []
        for group, logits in zip(chunks_by_length(rest), out.prefills):
            for chunk, row in zip(group, logits):
                if chunk.last:  # a prompt's end: its next token is sampled
                    seqs.append(chunk.seq)
                    rows.append(row[None])
        if out.decode is not None:  # the flat rows: short chunks' ends, then the decode rows
            seqs.extend([c.seq for c in flat if c.last] + plan.decode)
            rows.append(out.decode)
        if not rows:
            return seqs, None, out.verify
        return seqs, rows[0] if len(rows) == 1 else torch.cat(rows), out.verify
