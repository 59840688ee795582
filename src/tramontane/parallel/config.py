"""How a model is split across the processes of a torch.distributed job: `ParallelConfig`.

`tp` ranks split every layer (Megatron: heads, feed-forward rows/columns, vocabulary); `pp` stages
hold contiguous runs of layers; tp x pp is the world size. `moe` says how a Mixtral's experts are
split inside a tensor-parallel group: "expert" places whole experts on ranks (expert parallel),
"tensor" splits every expert like a dense feed-forward. `micro_batches` is how many groups of
sequences a pipeline keeps in flight while they decode, so that every stage has work: the first stage
computes one group's next step while later stages compute another's (1: no overlap). By default a
pipeline forms one group per stage once each keeps MIN_GROUP_ROWS sequences (`groups_for`).

Example:
    >>> ParallelConfig.resolve("tensor", world_size=4)
    ParallelConfig(tp=4, pp=1, moe='expert', micro_batches=None)
    >>> ParallelConfig.resolve({"tp": 2, "pp": 2}, world_size=4).pp
    2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MOE_SPLITS = ("expert", "tensor")
# Fewer sequences than this per group are not worth splitting by default: a step of a few rows reads
# every weight once however many rows it has, so halving the rows barely shortens it, and two groups
# read the weights twice: benchmarks/distributed.py measures where two groups start to pay.
MIN_GROUP_ROWS = 8


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    moe: str = "expert"
    micro_batches: int | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "micro_batches"):
            value = getattr(self, name)
            if name == "micro_batches" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel: {name} must be a positive integer, got {value!r}")
        if self.moe not in MOE_SPLITS:
            raise ValueError(f"parallel: moe must be one of {', '.join(MOE_SPLITS)}, got {self.moe!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def groups_for(self, sequences: int) -> int:
        """How many groups `sequences` decoding sequences form, each in flight while the others compute:
        `micro_batches` if given, else one per stage as long as each keeps MIN_GROUP_ROWS sequences;
        one without a pipeline, and never more than the sequences.

        Example:
            >>> ParallelConfig(pp=2).groups_for(4), ParallelConfig(pp=2).groups_for(16)
            (1, 2)
        """
        if self.pp == 1:
            return 1
        wanted = self.micro_batches or min(self.pp, sequences // MIN_GROUP_ROWS)
        return max(1, min(wanted, sequences))

    @classmethod
    def resolve(cls, value: str | dict[str, Any] | ParallelConfig, world_size: int) -> ParallelConfig:
        """The config that `parallel=` names for a job of `world_size` processes: "tensor" (tp = world
        size), "pipeline" (pp = world size), a dict of ParallelConfig's fields, or a config."""
        if isinstance(value, ParallelConfig):
            config = value
        elif value == "tensor":
            config = cls(tp=world_size)
        elif value == "pipeline":
            config = cls(pp=world_size)
        elif isinstance(value, dict):
            unknown = sorted(set(value) - {"tp", "pp", "moe", "micro_batches"})
            if unknown:
                raise ValueError(f"parallel: unknown field(s) {', '.join(unknown)} (known: tp, pp, moe, micro_batches)")
            config = cls(**value)
        else:
            raise ValueError(f"parallel must be 'tensor', 'pipeline', a dict with tp/pp or a ParallelConfig, "
                             f"got {value!r}")
        if config.world_size != world_size:
            raise ValueError(f"parallel: tp {config.tp} x pp {config.pp} = {config.world_size} processes, but the "
                             f"job has {world_size} (torchrun --nproc-per-node x --nnodes)")
        return config
