"""Step backends: what runs one step of a model over a KV cache, chosen once by `choose_backend`.

A step is `backend(tokens [B, T], positions [B, T], cache, rows, last_only, logits_of) -> logits`, as
`model(tokens, positions, cache=cache, ...)` gives them (`logits_of` [K]: only those rows' logits, what a
step of many prompt tokens as rows needs). Generation (`generate.stream`) and the server's
engine choose a backend when they start, after every load-time transform (fusing, quantizing, GGUF
formats, LoRA, sharding), and run every step through it; a model changed afterwards gets a new backend
from the next `choose_backend`. Each backend builds its own step metadata (`cache.step_meta`) with what
its blocks need.

- `PythonBlocks`: the model's blocks in PyTorch, as `Transformer.forward` runs them; on an fp32 CPU
  model with the kernels built, a decode step's attention runs as one native call per layer (rotary,
  cache write and attention). A tensor-parallel share runs here too: its blocks end in collectives.
- `NativeBlocks`: every block of a step as one native call (kernels/decode.cpp), for steps of up to the
  kernel policy's small-batch limit of tokens (a decode step of B sequences, or a short prompt chunk
  whose tokens become rows); longer steps, and chunks that would overwrite keys they still need, run on
  its `PythonBlocks`. Decoding a token of a small model is hundreds of tiny operations, and through
  Python each costs more than its arithmetic.

The Python blocks stay the reference: the tests check that both backends give the same logits.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .cache import KV_DTYPES, KVCache, PagedBatch, StepMeta, step_meta
from .gguf_linear import BLOCK_FORMATS, BlockLinear
from .kernels import DecodeStack, Kernels, Projection
from .kernels.policy import kernel_policy
from .layers import Block, FeedForward
from .model import Transformer, step_positions
from .parallel.modules import SendAfter
from .quantize import Int4Linear, Int8Linear, InterleavedRows
from .rope import rotary_angles


class StepBackend(Protocol):
    """Runs steps of `model`: logits [B, T, vocab] (T = 1 with `last_only`; K rows, not B, with
    `logits_of` [K]) of `tokens` [B, T] at `positions` [B, T] over `cache` (`rows` pick a KVCache's rows)."""

    model: Transformer

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | PagedBatch,
                 rows: torch.Tensor | None = None, last_only: bool = False,
                 logits_of: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass
class PythonBlocks:
    """The model's blocks in PyTorch; `fused` (the kernels, or None) runs a decode step's attention natively."""

    model: Transformer
    fused: Kernels | None = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | PagedBatch,
                 rows: torch.Tensor | None = None, last_only: bool = False,
                 logits_of: torch.Tensor | None = None) -> torch.Tensor:
        model = self.model
        positions = step_positions(tokens, positions, cache)
        meta = step_meta(positions, model.args.sliding_window, cache, rows)
        return self.run(tokens, meta, last_only, logits_of)

    def run(self, tokens: torch.Tensor, meta: StepMeta, last_only: bool,
            logits_of: torch.Tensor | None = None) -> torch.Tensor:
        """The step of `tokens` that `meta` describes, through the Python blocks."""
        model = self.model
        freqs_cis = rotary_angles(meta.positions, model.args.head_dim, model.args.rope_theta)
        if self.fused is not None and meta.decode and native_cache(meta):
            meta.rot = rotary_pairs(freqs_cis)
            meta.fused = self.fused
        h = model.blocks(model.tok_embeddings(tokens), meta, freqs_cis)
        return model.project(model.finish(h, meta, last_only, logits_of))


@dataclass
class NativeBlocks:
    """Every block of a step as one native call, for steps of up to `small_batch` tokens; `send` is where
    a pipeline stage hands its output on (None: nowhere); other steps run on `python`."""

    model: Transformer
    stack: DecodeStack
    send: SendAfter | None
    python: PythonBlocks
    small_batch: int

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | PagedBatch,
                 rows: torch.Tensor | None = None, last_only: bool = False,
                 logits_of: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.numel() > self.small_batch or torch.is_grad_enabled():
            return self.python(tokens, positions, cache, rows, last_only, logits_of)
        model = self.model
        positions = step_positions(tokens, positions, cache)
        # flat: each of the B * T tokens is a row of the step, all keys written before any row attends
        meta = step_meta(positions, model.args.sliding_window, cache, rows, flat=True)
        if meta.view is None or not native_cache(meta):  # a chunk that wraps a rolling buffer
            return self.python.run(tokens, meta, last_only, logits_of)
        return self.run(tokens, meta, last_only, logits_of)

    def run(self, tokens: torch.Tensor, meta: StepMeta, last_only: bool,
            logits_of: torch.Tensor | None = None) -> torch.Tensor:
        """The step of `tokens` that `meta` (with a view of the cache) describes, through the native stack."""
        model, view = self.model, meta.view
        assert view is not None  # the caller checked
        rot = rotary_pairs(rotary_angles(meta.positions, model.args.head_dim, model.args.rope_theta))
        h = model.tok_embeddings(tokens)
        shape = h.shape
        h = self.stack.forward(h.reshape(-1, shape[-1]), rot, view.k, view.v, view.k_scale, view.v_scale,
                               view.tables, view.key_pos, view.write, meta.positions.reshape(-1), view.window,
                               view.scan).view(shape)
        if self.send is not None:
            self.send.topology.send_next(h)
        return model.project(model.finish(h, meta, last_only, logits_of))


@dataclass
class CompiledDecode:
    """Decode steps (one token per row) through torch.compile of the Python blocks (`compile_decode`);
    other steps, and every step once compiling has failed, on `inner`."""

    model: Transformer
    inner: PythonBlocks | NativeBlocks
    compiled: _Compiled

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | PagedBatch,
                 rows: torch.Tensor | None = None, last_only: bool = False,
                 logits_of: torch.Tensor | None = None) -> torch.Tensor:
        if self.compiled.compiled is not None and tokens.shape[1] == 1 and rows is None and logits_of is None:
            try:
                return self.compiled.compiled(tokens, positions, cache)
            except Exception as e:  # any failure of Dynamo/Inductor or the compiler it calls
                warnings.warn(f"tramontane: torch.compile of the decode step failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); decoding without it", stacklevel=2)
                self.compiled.compiled = None
        return self.inner(tokens, positions, cache, rows, last_only, logits_of)


@dataclass
class _Compiled:
    compiled: Callable[..., torch.Tensor] | None  # None once compiling has failed


def compile_decode(model: Transformer, backend: str = "inductor") -> None:
    """Route `model`'s decode steps through torch.compile (Inductor): every backend chosen from now on
    (generate, stream, the chat, the server's engine) runs them so.

    Compilation happens on the first step (tens of seconds) and again for new shapes. If compiling or
    running the compiled step fails, decoding goes on eagerly, with one warning. Worth it on GPUs; on
    CPU the native decode stack already runs the blocks of a step in one call, and compiling the rest
    measured slower than eager. `backend` is torch.compile's ("aot_eager" traces the same graphs
    without generating code: what the CPU tests use).

    Example:
        >>> compile_decode(model)
        >>> generate(model, [[1, 851, 349]], max_tokens=16)  # first step compiles
    """
    compiled = torch.compile(functools.partial(_python_step, model), dynamic=True, backend=backend)
    model.__dict__["_compiled_decode"] = _Compiled(compiled)


def _python_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache | PagedBatch) -> torch.Tensor:
    return PythonBlocks(model)(tokens, positions, cache)


def choose_backend(model: Transformer) -> PythonBlocks | NativeBlocks | CompiledDecode:
    """The backend for `model` as it is now: the native stack where every block has a native form (dense
    feed-forward, projections the kernels read) on an fp32 CPU model with the kernels built, and the
    model is not a tensor-parallel share; else the Python blocks (with the native decode attention on
    an fp32 CPU model). After `compile_decode(model)`, decode steps run compiled. Choose again after
    changing the model's modules or weights. On CPU, choosing repacks int4 weights into the layout the
    kernel policy gives them (`repack_rows`), once.

    Example:
        >>> step = choose_backend(model)
        >>> logits = step(tokens, positions, cache)
    """
    backend = _eager_backend(model)
    compiled = model.__dict__.get("_compiled_decode")  # set by compile_decode, the user's explicit request
    return backend if compiled is None else CompiledDecode(model, backend, compiled)


def _eager_backend(model: Transformer) -> PythonBlocks | NativeBlocks:
    ext = kernel_policy().kernels
    if ext is None or model.dtype != torch.float32 or model.device.type != "cpu":
        return PythonBlocks(model)
    repack_rows(model)
    python = PythonBlocks(model, ext)
    if model.parallel is not None and model.parallel.config.tp > 1:
        return python  # its blocks end in collectives, which the native stack has not
    stack = _build(model, ext)
    if stack is None:
        return python
    last = model.layers[-1]
    return NativeBlocks(model, stack, last if isinstance(last, SendAfter) else None, python,
                        kernel_policy().small_batch)


def repack_rows(model: Transformer) -> None:
    """Quantized weights, in place, in the layout the kernel policy gives them (rows interleaved by eights
    for the formats where it pays); outputs and state dicts do not change."""
    formats = kernel_policy().interleaved
    for module in model.modules():
        if isinstance(module, InterleavedRows) and module.format_name in formats and module.interleaves() \
                and module.weight.device.type == "cpu":
            module.interleave()


def native_cache(meta: StepMeta) -> bool:
    """Whether the native kernels can read and write the cache of this step (a CPU store of a KV dtype)."""
    view = meta.view
    return view is not None and view.k.dtype in KV_DTYPES and view.k.device.type == "cpu"


def rotary_pairs(freqs_cis: torch.Tensor) -> torch.Tensor:
    """The native kernels' rotary: (cos, sin) pairs of each token [B * T, head_dim / 2, 2]."""
    return torch.view_as_real(freqs_cis.reshape(-1, freqs_cis.shape[-1])).contiguous()


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
    kind = ext.ProjectionKind
    if isinstance(module, list):
        parts = [_projection(ext, m) for m in module]
        whole = [p for p in parts if p is not None]
        return ext.Projection.side_by_side(whole) if len(whole) == len(parts) else None
    if isinstance(module, BlockLinear):
        return ext.Projection(kind.GGUF_INTERLEAVED if module.interleaved else kind.GGUF, module.weight, torch.empty(0),
                              BLOCK_FORMATS[module.kind])
    if isinstance(module, Int4Linear):
        return ext.Projection(kind.INT4_INTERLEAVED if module.interleaved else kind.INT4, module.weight, module.scale,
                              module.group_size, module.mins)
    if isinstance(module, Int8Linear):
        return ext.Projection(kind.INT8, module.weight, module.scale, 0)
    if isinstance(module, nn.Linear) and module.bias is None and module.weight.dtype == torch.float32 \
            and module.weight.device.type == "cpu" and module.weight.is_contiguous():
        return ext.Projection(kind.FLOAT, module.weight.detach(), torch.empty(0), 0)
    return None
