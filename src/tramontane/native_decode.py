"""The decode backend: the blocks of a step as one native call (kernels/decode.cpp), where the model
allows it, else the model's Python blocks. Generation and the engine run their steps through `run_step`.

Decoding a token of a small model is hundreds of tiny operations; through Python each costs more
than its arithmetic. `run_step` hands a step to the native stack when it is an fp32 CPU
step of up to the small-batch limit of tokens (a decode step of B sequences, or a short prompt chunk
whose tokens become rows) over a KV cache or a paged pool (float32, bfloat16, float16 or int8), of a
dense model (projections fused as `load_model` leaves them, or side by side where a checkpoint keeps
them in different formats), or of a pipeline stage's blocks (which hands its output on after the stack).
Everything else runs the Python blocks, which stay the reference: the tests check that both paths give
the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import BLOCK_FORMATS, BlockLinear
from .cache import KV_DTYPES, KVCache, PagedBatch, StepMeta
from .kernels import DecodeStack, Kernels, Projection
from .kernels.policy import kernel_policy
from .layers import Block, FeedForward
from .model import Transformer
from .parallel.modules import SendAfter
from .quantize import Int4Linear, Int8Linear


@dataclass
class NativeStack:
    """The native stack of a model's blocks, and where a pipeline stage sends their output (None: nowhere)."""

    blocks: DecodeStack
    send: SendAfter | None

    def forward(self, h: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        """h [B, T, dim] through every block, each of the B * T tokens a row of a decode step over
        `meta.view` (T = 1 for a decode step, T > 1 for a short prompt chunk)."""
        view = meta.view
        assert view is not None and meta.rot is not None  # the model set them for this step
        shape = h.shape
        h = self.blocks.forward(h.reshape(-1, shape[-1]), meta.rot, view.k, view.v, view.k_scale, view.v_scale,
                                view.tables, view.key_pos, view.write, meta.positions.reshape(-1), view.window,
                                view.scan).view(shape)
        if self.send is not None:
            self.send.topology.send_next(h)
        return h


def run_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | PagedBatch,
             rows: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
    """The logits of one step over a cache, as `model(tokens, positions, cache, rows, last_only)` gives
    them, through the native stack where this step allows it."""
    return model(tokens, positions, cache=cache, rows=rows, last_only=last_only,
                 native=native_stack(model, tokens, cache))


def native_stack(model: Transformer, tokens: torch.Tensor, cache: KVCache | PagedBatch | None) -> NativeStack | None:
    """The model's native block stack if a step of `tokens` [B, T] over `cache` can use it, else None
    (built on first use and rebuilt when a block's modules or weights have been replaced). Up to the
    policy's small_batch tokens in all: a decode step of B sequences, or a short prompt chunk, whose
    tokens the stack takes as rows (with `step_meta(flat=True)`), so it runs without Python's
    per-operation cost."""
    if model.parallel is not None and model.parallel.config.tp > 1:
        return None  # a tensor-parallel share: its blocks end in collectives, which the native stack has not
    policy = kernel_policy()
    if cache is None or tokens.numel() > policy.small_batch or torch.is_grad_enabled():
        return None
    store = cache.pool.k if isinstance(cache, PagedBatch) else cache.k
    if model.dtype != torch.float32 or model.device.type != "cpu" or store.dtype not in KV_DTYPES \
            or store.device.type != "cpu" or policy.kernels is None:
        return None
    key = _weights_key(model)
    built = model.__dict__.get("_native_stack")
    if built is None or built[0] != key:
        blocks = _build(model, policy.kernels)
        last = model.layers[-1]
        built = (key, None if blocks is None else NativeStack(blocks, last if isinstance(last, SendAfter) else None))
        model.__dict__["_native_stack"] = built
    return built[1]


def _weights_key(model: Transformer) -> tuple[int, ...]:
    """Identities of every module and weight the stack holds. Read from the modules' own dicts: this
    runs every step, and through nn.Module attribute lookup it took 199 us per step on the 1B shape
    instead of 25 (warm caches; both grow several times after a step's weights have streamed by)."""
    ids: list[int] = []
    for layer in _blocks(model):
        mods = layer._modules
        a, f = mods["attention"], mods["feed_forward"]
        assert a is not None and f is not None  # every Block has both
        parts = (mods["attention_norm"], mods["ffn_norm"], a, f, a._modules.get("wqkv"), a._modules.get("wo"),
                 f._modules.get("w13"), f._modules.get("w2"))
        for part in parts:
            ids.append(id(part))
            if part is not None:
                weight = part._parameters.get("weight")
                ids.append(id(weight if weight is not None else part._buffers.get("weight")))
    return tuple(ids)


def _blocks(model: Transformer) -> list[Block]:
    """The model's blocks, a pipeline stage's last one unwrapped from its hand-off."""
    return [layer.block if isinstance(layer, SendAfter) else layer for layer in model.layers]  # type: ignore[misc]


def _build(model: Transformer, ext: Kernels) -> DecodeStack | None:
    args = model.args
    stack = ext.DecodeStack(args.norm_eps, args.n_heads, args.n_kv_heads)
    for layer in _blocks(model):
        a, f = layer.attention, layer.feed_forward
        if not isinstance(f, FeedForward):
            return None
        norms = (layer.attention_norm.weight, layer.ffn_norm.weight)
        if any(n.dtype != torch.float32 or n.device.type != "cpu" for n in norms):
            return None
        # projections that could not be fused (kept in different formats) run side by side
        qkv: nn.Module | list[nn.Module] = a.wqkv if a.wqkv is not None else [a.wq, a.wk, a.wv]
        w13: nn.Module | list[nn.Module] = f.w13 if f.w13 is not None else [f.w1, f.w3]
        projections = [_projection(ext, m) for m in (qkv, a.wo, w13, f.w2)]
        if None in projections:
            return None
        wqkv, wo, w13p, w2 = (p for p in projections if p is not None)
        stack.add_block(norms[0].detach(), norms[1].detach(), wqkv, wo, w13p, w2)
    return stack


def _projection(ext: Kernels, module: nn.Module | list[nn.Module]) -> Projection | None:
    if isinstance(module, list):
        parts = [_projection(ext, m) for m in module]
        whole = [p for p in parts if p is not None]
        return ext.Projection.side_by_side(whole) if len(whole) == len(parts) else None
    if isinstance(module, BlockLinear):
        return ext.Projection(3, module.weight, torch.empty(0), BLOCK_FORMATS[module.kind])
    if isinstance(module, Int4Linear):
        return ext.Projection(2, module.weight, module.scale, module.group_size, module.mins)
    if isinstance(module, Int8Linear):
        return ext.Projection(1, module.weight, module.scale, 0)
    if isinstance(module, nn.Linear) and module.bias is None and module.weight.dtype == torch.float32 \
            and module.weight.device.type == "cpu" and module.weight.is_contiguous():
        return ext.Projection(0, module.weight.detach(), torch.empty(0), 0)
    return None
