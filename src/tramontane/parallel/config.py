"""How a model is split across the processes of a torch.distributed job: `ParallelConfig`.

`tp` ranks split every layer (Megatron: heads, feed-forward rows/columns, vocabulary); `pp` stages
hold contiguous runs of layers; tp x pp is the world size. `moe` says how a Mixtral's experts are
split inside a tensor-parallel group: "expert" places whole experts on ranks (expert parallel),
"tensor" splits every expert like a dense feed-forward.

Example:
    >>> ParallelConfig.resolve("tensor", world_size=4)
    ParallelConfig(tp=4, pp=1, moe='expert')
    >>> ParallelConfig.resolve({"tp": 2, "pp": 2}, world_size=4).pp
    2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MOE_SPLITS = ("expert", "tensor")


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    moe: str = "expert"

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel: {name} must be a positive integer, got {value!r}")
        if self.moe not in MOE_SPLITS:
            raise ValueError(f"parallel: moe must be one of {', '.join(MOE_SPLITS)}, got {self.moe!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

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
            unknown = sorted(set(value) - {"tp", "pp", "moe"})
            if unknown:
                raise ValueError(f"parallel: unknown field(s) {', '.join(unknown)} (known: tp, pp, moe)")
            config = cls(**value)
        else:
            raise ValueError(f"parallel must be 'tensor', 'pipeline', a dict with tp/pp or a ParallelConfig, "
                             f"got {value!r}")
        if config.world_size != world_size:
            raise ValueError(f"parallel: tp {config.tp} x pp {config.pp} = {config.world_size} processes, but the "
                             f"job has {world_size} (torchrun --nproc-per-node x --nnodes)")
        return config
