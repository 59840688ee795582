"""Fused projections: wq/wk/wv become one `wqkv` and w1/w3 one `w13`, stacked by output rows.

A decode step is a long chain of small operations, so three matmuls that read the same input cost
more than one that reads it once. The transform works on float and quantized linears alike (all their
tensors are split by output rows), runs after loading, and `unfused_state_dict` gives back the
checkpoint names for saving.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .gguf_linear import BlockLinear
from .kernels import weight_empty
from .kernels.policy import kernel_policy
from .layers import Attention, FeedForward
from .model import Transformer
from .quantize import Int4Linear, Int8Linear, InterleavedRows, QuantLinearBase

# fused name -> the projections stacked into it, in row order
FUSED = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}


def _layout(module: nn.Module) -> tuple[object, ...]:
    """What linears must share for their rows to be stacked into one: class, input size and format."""
    return (type(module), getattr(module, "in_features", None), getattr(module, "group_size", None),
            getattr(module, "zero_point", None), getattr(module, "kind", None), getattr(module, "interleaved", None),
            *(t.dtype for t in itertools.chain(module.parameters(), module.buffers())))


def concat_rows(parts: list[nn.Module]) -> nn.Module | None:
    """One linear whose output is the outputs of `parts` side by side; None when the parts are not all
    of one layout (a GGUF Q4_K_M file keeps some projections in Q6_K beside Q4_K ones)."""
    if len({_layout(p) for p in parts}) != 1:
        return None
    first = parts[0]
    out_features = 0
    for p in parts:
        assert isinstance(p, nn.Linear | QuantLinearBase)
        out_features += p.out_features
    fused = _empty_like(first, out_features)
    for name, tensor in list(first.named_parameters()) + list(first.named_buffers()):
        pieces = [getattr(p, name) for p in parts]
        joined = _adjacent(pieces)  # a loader that put them one after the other: no copy at all
        if joined is None:
            # the fused weight goes straight where it will stay (2 MiB pages on CPU): no second move, and
            # the parts' memory, freed layer by layer, goes back to the system instead of the C heap
            joined = weight_empty((sum(t.shape[0] for t in pieces), *tensor.shape[1:]), tensor.dtype, tensor.device)
            with torch.no_grad():
                torch.cat(pieces, dim=0, out=joined)
        _set_tensor(fused, name, joined, tensor)
    return fused


def _adjacent(pieces: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor spanning `pieces` when they are consecutive rows of one buffer, else None."""
    first = pieces[0]
    at = first.storage_offset()
    for piece in pieces:
        if not piece.is_contiguous() or piece.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() \
                or piece.storage_offset() != at or piece.shape[1:] != first.shape[1:]:
            return None
        at += piece.numel()
    return first.as_strided((sum(p.shape[0] for p in pieces), *first.shape[1:]), first.stride())


def split_rows(fused: nn.Module, sizes: list[int]) -> list[nn.Module]:
    """The inverse of `concat_rows`: linears whose outputs are `fused`'s rows in pieces of `sizes`
    (views of its tensors, no copy)."""
    if isinstance(fused, InterleavedRows) and any(n % 8 for n in sizes):
        fused.in_order()  # groups of 8 rows would straddle the parts
    parts = [_empty_like(fused, n) for n in sizes]
    for name, tensor in list(fused.named_parameters()) + list(fused.named_buffers()):
        for part, chunk in zip(parts, tensor.split(sizes, dim=0)):  # every tensor has one row per output
            _set_tensor(part, name, chunk, tensor)
    return parts


def _empty_like(first: nn.Module, out_features: int) -> nn.Module:
    """A linear of `first`'s kind and input size with `out_features` outputs, its tensors on meta."""
    with torch.device("meta"):
        if isinstance(first, nn.Linear):
            return type(first)(first.in_features, out_features, bias=False)
        if isinstance(first, Int8Linear):
            return Int8Linear(first.in_features, out_features)
        if isinstance(first, Int4Linear):
            return Int4Linear(first.in_features, out_features, first.group_size, first.zero_point, first.interleaved)
        if isinstance(first, BlockLinear):
            return BlockLinear(first.in_features, out_features, first.kind, first.interleaved)
    raise TypeError(f"cannot fuse {type(first).__name__}")


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    if isinstance(like, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=False))
    else:
        setattr(module, name, value)


class FastLinear(nn.Linear):
    """nn.Linear whose few-row fp32 CPU products (batched decode) go to the native kernel: PyTorch's own
    matmul reads the weights well for one row (measured faster there) but not for a handful, and every
    batched decode step is a handful. Same parameters and state-dict names as nn.Linear. The kernel has
    no backward: products that autograd follows (training) stay in PyTorch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        training = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        policy = kernel_policy()
        if not training and 2 <= rows <= policy.small_batch and x.dtype == torch.float32 \
                and self.weight.dtype == torch.float32 and x.device.type == "cpu":
            ext = policy.kernels
            if ext is not None:
                y = ext.f32_linear(x.reshape(rows, self.in_features).contiguous(), self.weight)
                return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)


def use_fast_linears(model: Transformer) -> Transformer:
    """Swap every plain nn.Linear for a FastLinear sharing its weight, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                with torch.device("meta"):
                    fast = FastLinear(child.in_features, child.out_features, bias=False)
                fast.weight = child.weight
                setattr(module, name, fast)
    return model


def fuse_projections(model: Transformer) -> Transformer:
    """Fuse every attention's q/k/v and every (expert) feed-forward's w1/w3, in place, where their
    layouts agree."""
    for module in model.modules():
        if isinstance(module, Attention) and module.wqkv is None:
            if (fused := concat_rows([module.wq, module.wk, module.wv])) is not None:
                module.wqkv = fused
                del module.wq, module.wk, module.wv
        elif isinstance(module, FeedForward) and module.w13 is None:
            if (fused := concat_rows([module.w1, module.w3])) is not None:
                module.w13 = fused
                del module.w1, module.w3
    return model


def unfuse_projections(model: Transformer) -> Transformer:
    """Split every fused wqkv and w13 back into wq/wk/wv and w1/w3 (views of the fused tensors), in
    place: for transforms that work per projection, such as LoRA adapters."""
    for module in model.modules():
        for fused_name, names in FUSED.items():
            fused = module._modules.get(fused_name)
            if fused is None:
                continue
            for name, part in zip(names, split_rows(fused, _fused_sizes(model)[fused_name])):
                setattr(module, name, part)
            setattr(module, fused_name, None)
    return model


def _fused_sizes(model: Transformer) -> dict[str, list[int]]:
    args = model.args
    return {"wqkv": [args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim,
                     args.n_kv_heads * args.head_dim],
            "w13": [args.hidden_dim, args.hidden_dim]}


def unfused_state_dict(state: dict[str, torch.Tensor], model: Transformer) -> dict[str, torch.Tensor]:
    """`state` with fused tensors split back into the checkpoint's wq/wk/wv and w1/w3."""
    sizes = _fused_sizes(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix, _, rest = key.rpartition(".")
        head, _, fused = prefix.rpartition(".")
        if fused in FUSED:
            # every tensor of a linear (weight, scale) has one row per output
            for part, chunk in zip(FUSED[fused], value.split(sizes[fused], dim=0)):
                out[f"{head}.{part}.{rest}"] = chunk.contiguous()
        else:
            out[key] = value
    return out
