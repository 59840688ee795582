"""Multi-process execution on torch.distributed: tensor, expert and pipeline parallel (launch with torchrun).

Example (every rank runs the same script, `torchrun --nproc-per-node 2 script.py`):
    >>> torch.distributed.init_process_group("gloo")
    >>> model = tramontane.load_model(path, parallel="tensor")   # this rank's share only
    >>> logits = model(tokens)                                    # the full logits, on every rank
"""

from .config import ParallelConfig
from .topology import ParallelError, Topology, init_distributed, init_topology

__all__ = ["ParallelConfig", "ParallelError", "Topology", "init_distributed", "init_topology"]
