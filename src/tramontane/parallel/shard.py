"""Cutting a checkpoint into one rank's share, as it streams in.

`ShardPlan` says for every checkpoint tensor whether this rank keeps it and which slice:

- wq, wk, wv, w1, w3 (every expert's too, under moe="tensor"): rows of this rank's heads / hidden units;
- wo, w2: the matching input columns (the output is a partial sum, all-reduced by `modules.AllReduce`);
- tok_embeddings, output: rows of this rank's vocabulary slice;
- experts under moe="expert": the whole tensors of this rank's experts, none of the others';
- layers outside this rank's pipeline stage: none (the others are renumbered from 0).

Quantized tensors split the same way: every tensor of a layer has one row per output, and a row of
int4 or GGUF blocks cut at a block boundary stays valid, so column splits must fall on whole blocks
(groups), which `check_*` verify before any memory is reserved. The model is built at the local sizes
(`local_args`), tensors are sliced into copies of their own (`pick`, a view would keep the whole
memory-mapped source alive), and `parallelize` swaps in the collectives once loading is done.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..args import ModelArgs
from ..gguf_linear import UNIT, fits
from ..layers import Block, FeedForward, MoeFeedForward
from ..model import Transformer
from ..quantize import QuantConfig
from .modules import (
    AllReduce,
    BroadcastLogits,
    GatheredHead,
    LocalExperts,
    ReceiveHidden,
    ReceiveLogits,
    SendAfter,
    TiedHead,
    VocabParallelEmbedding,
)
from .topology import Topology

ROW_SPLIT = ("wq", "wk", "wv", "w1", "w3")
COLUMN_SPLIT = ("wo", "w2")


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """The contiguous layers of `stage`: as even as can be, the first stages taking one more."""
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


@dataclass(frozen=True)
class ShardPlan:
    args: ModelArgs  # the whole model's
    topology: Topology

    def __post_init__(self) -> None:
        a, c = self.args, self.topology.config
        if a.head is not None:
            raise ValueError("parallel: models with a task head are not supported; load them in one process")
        checks = [("n_heads", a.n_heads), ("n_kv_heads", a.n_kv_heads), ("vocab_size", a.vocab_size)]
        if a.moe is None or c.moe == "tensor":
            checks.append(("hidden_dim", a.hidden_dim))
        else:
            checks.append(("moe.num_experts", a.moe.num_experts))
        for name, value in checks:
            if value % c.tp:
                raise ValueError(f"parallel: {name} ({value}) is not divisible by tp {c.tp}; choose a tp that divides it")
        if a.n_layers < c.pp:
            raise ValueError(f"parallel: n_layers ({a.n_layers}) is fewer than pp {c.pp} stages")

    @property
    def tp(self) -> int:
        return self.topology.config.tp

    @property
    def layers(self) -> range:
        return stage_layers(self.args.n_layers, self.topology.config.pp, self.topology.stage)

    @property
    def experts_split(self) -> bool:
        return self.args.moe is not None and self.topology.config.moe == "expert"

    def local_experts(self) -> range:
        assert self.args.moe is not None  # only asked for a mixture of experts
        n = self.args.moe.num_experts // self.tp
        return range(self.topology.tp_rank * n, (self.topology.tp_rank + 1) * n)

    def local_args(self) -> ModelArgs:
        """The args of this rank's share: its heads, hidden units and layers (vocabulary and dim whole:
        the logits a rank returns are the full ones)."""
        a = self.args
        hidden = a.hidden_dim if self.experts_split else a.hidden_dim // self.tp
        return dataclasses.replace(a, n_heads=a.n_heads // self.tp, n_kv_heads=a.n_kv_heads // self.tp,
                                   hidden_dim=hidden, n_layers=len(self.layers))

    def _keeps_embeddings(self) -> bool:
        return self.topology.first_stage or (self.args.tied_embeddings and self.topology.last_stage)

    # ------------------------------------------------------------------ before loading
    def skeleton(self, model: Transformer) -> None:
        """Give `model` (built from `local_args` on the meta device) the shapes of this rank's tensors."""
        a, t = self.args, self.topology
        rows = a.vocab_size // self.tp
        if self._keeps_embeddings():
            model.tok_embeddings = nn.Embedding(rows, a.dim)
        else:
            model.tok_embeddings = ReceiveHidden(a.dim, torch.float32, t)  # type: ignore[assignment]
        if not t.last_stage:
            model.output = ReceiveLogits(a.vocab_size, t)  # type: ignore[assignment]
        elif model.output is not None:
            model.output = nn.Linear(a.dim, rows, bias=False)
        if self.experts_split:
            assert a.moe is not None
            for layer in model.layers:
                assert isinstance(layer, Block)
                layer.feed_forward = LocalExperts(a.dim, a.hidden_dim, a.moe.num_experts, a.moe.num_experts_per_tok,
                                                  self.local_experts())

    def check_quantization(self, quant: QuantConfig | None) -> None:
        """A column split of int4 weights must keep whole groups."""
        if quant is None or quant.method == "int8" or self.tp == 1:
            return
        for name, cols in self._column_widths().items():
            if cols % quant.group_size:
                raise ValueError(f"parallel: tp {self.tp} leaves {name} {cols} input columns per rank, not whole "
                                 f"{quant.method} groups of {quant.group_size}; use a smaller tp or group_size")

    def formats(self, formats: dict[str, str]) -> dict[str, str]:
        """GGUF formats by this rank's names; a column split must keep whole blocks of the format."""
        out: dict[str, str] = {}
        widths = self._column_widths()
        for name, kind in formats.items():
            if self.tp > 1 and (leaf := _projection(name)) in widths:
                cols = widths[leaf]
                whole = cols % 32 == 0 if kind in ("Q4_0", "Q4_1") else fits(kind, cols)
                if not whole:
                    raise ValueError(f"parallel: tp {self.tp} leaves {name} {cols} input columns per rank, not whole "
                                     f"{kind} units of {UNIT.get(kind, 32)}; use a smaller tp")
            local = self.local_name(name)
            if local is not None:
                out[local] = kind
        return out

    def _column_widths(self) -> dict[str, int]:
        a = self.args
        widths = {"wo": a.n_heads * a.head_dim // self.tp}
        if not self.experts_split:
            widths["w2"] = a.hidden_dim // self.tp
        return widths

    # ------------------------------------------------------------------ while loading
    def local_name(self, name: str) -> str | None:
        """This rank's name for checkpoint tensor `name` (layers renumbered in a stage), None if it keeps none of it."""
        parts = name.split(".")
        if parts[0] == "layers":
            i = int(parts[1])
            if i not in self.layers:
                return None
            if self.experts_split and parts[3] == "experts" and int(parts[4]) not in self.local_experts():
                return None
            return ".".join(["layers", str(i - self.layers.start), *parts[2:]])
        if parts[0] == "tok_embeddings" and not self._keeps_embeddings():
            return None
        if parts[0] == "output" and not self.topology.last_stage:
            return None
        return name

    def pick(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """This rank's name and slice (a copy) of checkpoint tensor `name`, or None if it keeps none of it."""
        local = self.local_name(name)
        if local is None:
            return None
        if self.tp == 1:
            return local, tensor
        r, n = self.topology.tp_rank, self.tp
        kind = _projection(name)
        whole_expert = self.experts_split and ".experts." in name
        if name.startswith(("tok_embeddings.", "output.")) or (kind in ROW_SPLIT and not whole_expert):
            size = tensor.shape[0] // n
            return local, tensor.narrow(0, r * size, size).clone(memory_format=torch.contiguous_format)
        if kind in COLUMN_SPLIT and not whole_expert and tensor.dim() == 2:  # int8's per-row scale is whole
            size = tensor.shape[1] // n
            return local, tensor.narrow(1, r * size, size).clone(memory_format=torch.contiguous_format)
        return local, tensor

    # ------------------------------------------------------------------ after loading
    def parallelize(self, model: Transformer) -> Transformer:
        """Swap the collectives into a loaded share, in place: all-reduces after wo and w2 (or a whole
        mixture of experts), the vocabulary-parallel embedding and head, the pipeline hand-offs."""
        t = self.topology
        if self.tp > 1:
            for layer in model.layers:
                assert isinstance(layer, Block)
                layer.attention.wo = AllReduce(layer.attention.wo, t)  # type: ignore[assignment]
                ff = layer.feed_forward
                if isinstance(ff, FeedForward):
                    ff.w2 = AllReduce(ff.w2, t)  # type: ignore[assignment]
                else:
                    assert isinstance(ff, MoeFeedForward | LocalExperts)
                    layer.feed_forward = AllReduce(ff, t)
        embedding = model.tok_embeddings
        if t.last_stage:
            head: nn.Module | None = model.output
            if head is None:  # a tied float model
                assert isinstance(embedding, nn.Embedding)
                head = TiedHead(embedding)
            if self.tp > 1:
                head = GatheredHead(head, t)
            model.output = BroadcastLogits(head, t) if t.config.pp > 1 else head  # type: ignore[assignment]
        if not t.first_stage:
            model.tok_embeddings = ReceiveHidden(self.args.dim, model.dtype, t)  # type: ignore[assignment]
        elif self.tp > 1:
            start = t.tp_rank * (self.args.vocab_size // self.tp)
            model.tok_embeddings = VocabParallelEmbedding(  # type: ignore[assignment]
                embedding, start, self.args.vocab_size // self.tp, t)
        if not t.last_stage:
            model.output = ReceiveLogits(self.args.vocab_size, t)  # type: ignore[assignment]  # (a tied table was set)
            model.layers[-1] = SendAfter(model.layers[-1], t)
        model.parallel = t
        return model


def _projection(name: str) -> str | None:
    """'wq' for 'layers.0.attention.wq.weight' (the module a tensor belongs to), None for global tensors."""
    parts = name.split(".")
    return parts[-2] if parts[0] == "layers" and len(parts) >= 4 else None
