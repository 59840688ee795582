"""Which process does what: the rank's place in the tp x pp grid, its process groups, and the
collectives the parallel modules call (each counts the bytes it sends, for the benchmark).

A rank r is tensor-parallel rank r % tp of pipeline stage r // tp; the ranks of a stage form its
tensor-parallel group, and rank (s, t) sends its activations to rank (s + 1, t).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .config import ParallelConfig

LAUNCH_HINT = ("launch every process with torchrun (e.g. `torchrun --nproc-per-node 2 $(which tramontane) complete "
               "--model M 'text'`, or in Python call torch.distributed.init_process_group() before load_model)")
# How long a collective waits for a peer before failing: a dead or stuck rank makes the others exit
# with an error after this, never hang.
DEFAULT_TIMEOUT = datetime.timedelta(seconds=120)


class ParallelError(RuntimeError):
    """torch.distributed is not set up as `parallel=` needs, or a peer failed."""


@dataclass
class Traffic:
    """Bytes this rank handed to collectives and point-to-point sends (payload, not wire bytes)."""

    all_reduce: int = 0
    all_gather: int = 0
    broadcast: int = 0
    p2p: int = 0

    @property
    def total(self) -> int:
        return self.all_reduce + self.all_gather + self.broadcast + self.p2p


@dataclass
class Topology:
    config: ParallelConfig
    rank: int
    tp_rank: int
    stage: int
    tp_group: dist.ProcessGroup | None  # None when tp == 1
    traffic: Traffic = field(default_factory=Traffic)
    # sends to the next stage still in flight, with the tensors they read (kept alive until done)
    _sends: list[tuple[dist.Work, torch.Tensor]] = field(default_factory=list, repr=False)
    # inside `deferred_logits`: the broadcasts of logits started but not waited for
    _deferred: list[dist.Work] | None = field(default=None, repr=False)

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.config.pp - 1

    @property
    def logits_root(self) -> int:
        """The rank whose logits every rank receives: tensor rank 0 of the last stage."""
        return (self.config.pp - 1) * self.config.tp

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the tensor-parallel group, in place."""
        if self.tp_group is not None:
            self.traffic.all_reduce += x.nbytes
            _checked(dist.all_reduce, x, group=self.tp_group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor-parallel group's `x` [..., n] side by side along the last axis [..., tp * n]."""
        if self.tp_group is None:
            return x
        parts = [torch.empty_like(x) for _ in range(self.config.tp)]
        self.traffic.all_gather += x.nbytes
        _checked(dist.all_gather, parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    def broadcast_logits(self, x: torch.Tensor) -> torch.Tensor:
        """`x` from the last stage's first rank on every rank, in place; inside `deferred_logits` only
        started (read `x` after waiting for what that block yielded)."""
        if self.rank == self.logits_root:
            self.traffic.broadcast += x.nbytes
        if self._deferred is None:
            _checked(dist.broadcast, x, src=self.logits_root)
        else:
            work = _started(dist.broadcast, x, src=self.logits_root, async_op=True)
            self._deferred.append(work)
        return x

    @contextmanager
    def deferred_logits(self) -> Iterator[list[dist.Work]]:
        """Forwards inside this block return logits that are still arriving; wait for the works it yields
        (`wait_all`) before reading them. A pipeline keeps several micro-batches in flight this way: the
        first stage starts the next one while the last stage computes this one.

        Example:
            >>> with topology.deferred_logits() as pending:
            ...     logits = model(tokens, positions, cache=cache)
            >>> wait_all(pending)  # now `logits` holds the last stage's values
        """
        self._deferred = []
        try:
            yield self._deferred
        finally:
            self._deferred = None

    def shared_seed(self, seed: int | None) -> int | None:
        """`seed`, or when None one drawn on rank 0 and given to every rank: sampling then picks the same
        tokens everywhere, so every rank runs the same steps."""
        if seed is not None:
            return seed
        value = torch.randint(0, 2**62, (1,)) if self.rank == 0 else torch.zeros(1, dtype=torch.long)
        _checked(dist.broadcast, value, src=0)
        return int(value.item())

    def from_leader(self, value: object) -> object:
        """Rank 0's `value` on every rank (a prompt, a request): rank 0 reads input, the others follow."""
        box = [value if self.rank == 0 else None]
        _checked(dist.broadcast_object_list, box, src=0)
        return box[0]

    def send_next(self, x: torch.Tensor) -> None:
        """Start sending `x` to the same tensor rank of the next stage; this stage goes on computing
        meanwhile (a send completes once the next stage receives it: waiting here would keep this stage
        idle for as long as the next one computes)."""
        self.traffic.p2p += x.nbytes
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        if len(self._sends) >= 4 * self.config.pp:  # bound what waits: the oldest must have arrived by now
            wait_all([w for w, _ in self._sends])
            self._sends = []
        copy = x.detach().clone(memory_format=torch.contiguous_format)  # the caller may reuse x's memory
        self._sends.append((_started(dist.isend, copy, dst=self.rank + self.config.tp), copy))

    def settle(self) -> None:
        """Wait until every send to the next stage has arrived (before a job or a generation ends)."""
        wait_all([w for w, _ in self._sends])
        self._sends = []

    def recv_prev(self, x: torch.Tensor) -> torch.Tensor:
        _checked(dist.recv, x, src=self.rank - self.config.tp)
        return x


def _checked(op: object, *args: object, **kwargs: object) -> None:
    """Run a c10d operation; a peer that died or timed out becomes a ParallelError naming the rank."""
    _started(op, *args, **kwargs)


def _started(op: object, *args: object, **kwargs: object) -> dist.Work:
    """Start (async_op=True, isend) or run a c10d operation; a failure is a ParallelError (`_failed`)."""
    try:
        return op(*args, **kwargs)  # type: ignore[operator, no-any-return]
    except RuntimeError as e:
        raise _failed(getattr(op, "__name__", str(op)), e) from e


def wait_all(works: list[dist.Work]) -> None:
    """Wait for started c10d operations; a failure is a ParallelError naming the rank."""
    for work in works:
        try:
            work.wait()
        except RuntimeError as e:
            raise _failed("wait", e) from e


def _failed(what: str, e: RuntimeError) -> ParallelError:
    rank = dist.get_rank() if dist.is_initialized() else "?"
    return ParallelError(f"rank {rank}: {what} failed; a peer process died, hung or timed out "
                         f"({str(e).strip().splitlines()[0] if str(e).strip() else e})")


def init_topology(parallel: str | dict[str, object] | ParallelConfig) -> Topology:
    """This rank's Topology for `parallel` (see ParallelConfig.resolve); every rank must call it, in the
    same order (it creates the process groups).

    Raises:
        ParallelError: torch.distributed is not initialised (the message says how to launch).
        ValueError: the config does not fit the world size.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError(f"parallel={parallel!r} needs torch.distributed: {LAUNCH_HINT}")
    config = ParallelConfig.resolve(parallel, dist.get_world_size())  # type: ignore[arg-type]
    rank = dist.get_rank()
    tp_group = None
    for stage in range(config.pp):  # every rank creates every group, as new_group requires
        ranks = list(range(stage * config.tp, (stage + 1) * config.tp))
        group = dist.new_group(ranks) if config.tp > 1 else None
        if rank in ranks:
            tp_group = group
    return Topology(config, rank, rank % config.tp, rank // config.tp, tp_group)


def core_share(cores: list[int], local_rank: int, local_size: int) -> list[int]:
    """The cores of local rank `local_rank` of `local_size` processes on one machine: contiguous, as even
    as can be; all of them when there are fewer cores than processes.

    Example:
        >>> core_share([0, 1, 2, 3], 1, 2)
        [2, 3]
    """
    if local_size <= 1 or len(cores) < local_size:
        return cores
    return cores[local_rank * len(cores) // local_size : (local_rank + 1) * len(cores) // local_size]


def init_distributed(device: str, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> None:
    """Join the job torchrun started (its environment names the rendezvous): gloo for CPU, nccl for CUDA,
    every collective bounded by `timeout`.

    On CPU, a process that shares its machine with other ranks (torchrun's LOCAL_WORLD_SIZE) first binds
    itself to its own share of the cores (`core_share`), before gloo and OpenMP start their threads: the
    ranks then never preempt each other between collectives, and the all-reduces wait less
    (benchmarks/distributed.py)."""
    if dist.is_initialized():
        return
    if torch.device(device).type == "cpu" and hasattr(os, "sched_setaffinity"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        os.sched_setaffinity(0, core_share(sorted(os.sched_getaffinity(0)), local,
                                           int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timeout)
    except ValueError as e:  # no RANK/WORLD_SIZE/MASTER_ADDR: not started by torchrun
        raise ParallelError(f"cannot join a torch.distributed job ({e}): {LAUNCH_HINT}") from e


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
