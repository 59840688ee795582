"""GGUF block formats kept as the file stores them: a linear layer over rows of Q8_0, Q5_0, Q5_1, Q4_K, Q5_K
or Q6_K blocks, the bytes unchanged (Q4_0 and Q4_1 are `Int4Linear`'s own layouts, see quantize.py).

Decode-sized inputs run the native integer kernels of `kernels/blocks.cpp` (on AMX CPUs its AMX tiles
instead, from 6 rows for the K-quants and 9 for the others, and for every larger input); larger ones
dequantize tiles and multiply, like every quantized layer (`QuantLinearBase`). Without the kernels the rows are dequantized by gguf-py's
reference code. Q5_0, Q5_1 and Q8_0 rows can be interleaved by eights where the kernel policy says
(`interleave`, `r8_order`): the kernels of int4 rows so interleaved then read them, faster on narrow rows.

Example:
    >>> layer = BlockLinear.from_blocks(rows, in_features=4096, kind="Q4_K")  # rows: uint8 [out, row bytes]
    >>> y = layer(x)
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from torch import nn

from .kernels import Kernels, load_kernels
from .model import Transformer
from .quantize import Int4Linear, InterleavedRows, QuantEmbedding, QuantLinearBase

# format name -> ggml type number (what the kernels take)
BLOCK_FORMATS = {name: int(GGMLQuantizationType[name]) for name in ("Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")}
# elements per unit of each format: the kernels work on two 32-element blocks, or one K-quant super-block
UNIT = {"Q8_0": 64, "Q5_0": 64, "Q5_1": 64, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
# the formats whose rows can be interleaved by eights (`r8_order`)
INTERLEAVED_FORMATS = ("Q5_0", "Q5_1", "Q8_0")


def row_bytes(kind: str, in_features: int) -> int:
    """Bytes of one row of `in_features` elements in format `kind`."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    return in_features // block * size


def fits(kind: str, in_features: int) -> bool:
    """Whether rows of `in_features` elements can stay in format `kind` (whole kernel units)."""
    return kind in BLOCK_FORMATS and in_features % UNIT[kind] == 0


@functools.lru_cache(maxsize=64)
def r8_order(kind: str, in_features: int) -> torch.Tensor:
    """How 8 rows of Q5_0, Q5_1 or Q8_0 blocks interleave (kernels/int4.cpp's R8Rows): byte i of the group
    interleaved is byte order[i] of the 8 rows in order. Per block of 32, the 8 rows' codes (Q5: nibbles
    [half][row][8], then fifth bits [byte][row]; Q8_0: elements [0, 16) as [half][row][8], then [16, 32)),
    scales [row] (2 bytes each) and, Q5_1, minimums [row]. A block in the file: its scale, (its minimum,)
    (4 bytes of fifth bits,) its codes."""
    head = 4 if kind == "Q5_1" else 2  # float16 scale (and minimum)
    block, blocks = GGML_QUANT_SIZES[GGMLQuantizationType[kind]][1], in_features // 32
    at = torch.arange(8 * blocks * block).view(8, blocks, block)  # [row, block, byte] in order
    if kind == "Q8_0":
        codes = [at[:, :, head:].reshape(8, blocks, 2, 2, 8).permute(1, 2, 3, 0, 4)]  # [block, 16s, half, row, 8]
    else:
        nibbles = at[:, :, head + 4 :].reshape(8, blocks, 2, 8).permute(1, 2, 0, 3)  # [block, half, row, 8]
        codes = [nibbles, at[:, :, head : head + 4].permute(1, 2, 0)]  # bits: [block, byte, row]
    halves = [at[:, :, f : f + 2].permute(1, 0, 2) for f in range(0, head, 2)]  # [block, row, 2]
    return torch.cat([f.reshape(blocks, -1) for f in codes + halves], 1).reshape(-1)


class BlockLinear(InterleavedRows):
    """y = x @ dequant(W).T with W's rows in a GGUF block format (uint8 [out, row bytes]); Q5_0, Q5_1 and
    Q8_0 rows in order or interleaved by eights (`InterleavedRows`)."""

    weight: torch.Tensor
    amx_tiles = True

    def __init__(self, in_features: int, out_features: int, kind: str, interleaved: bool = False) -> None:
        super().__init__()
        if not fits(kind, in_features):
            raise ValueError(f"{kind}: rows of {in_features} elements are not whole units of {UNIT.get(kind)}")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.format_name = kind
        self.register_buffer("weight", torch.empty(out_features, row_bytes(kind, in_features), dtype=torch.uint8))
        if interleaved:
            self._check_interleaves()
        self.interleaved = interleaved

    def interleaves(self) -> bool:
        return self.kind in INTERLEAVED_FORMATS and super().interleaves()

    @classmethod
    def from_blocks(cls, rows: torch.Tensor, in_features: int, kind: str) -> BlockLinear:
        with torch.device("meta"):
            m = cls(in_features, rows.shape[0], kind)
        if tuple(rows.shape) != tuple(m.weight.shape) or rows.dtype != torch.uint8:
            raise ValueError(f"{kind}: expected uint8 rows {tuple(m.weight.shape)}, got {rows.dtype} {tuple(rows.shape)}")
        m.weight = rows
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"
                + (", interleaved=True" if self.interleaved else ""))

    def _repacked(self, interleave: bool) -> dict[str, torch.Tensor | None]:
        order = r8_order(self.kind, self.in_features).to(self.weight.device)
        if not interleave:
            order = torch.argsort(order)
        groups = self.weight.view(self.out_features // 8, -1)
        return {"weight": groups[:, order].view(self.out_features, -1)}

    def dequantize(self, rows: slice | torch.Tensor = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        ext = load_kernels() if self.weight.device.type == "cpu" else None
        bf16 = dtype == torch.bfloat16
        if not self.interleaved:
            part = self.weight[rows]
        else:  # whole groups of 8 rows, then the rows asked for among them
            groups, take = self._groups(rows)
            part = self.weight.view(self.out_features // 8, -1)[groups].view(-1, self.weight.shape[1])
            if ext is not None:
                return self._taken(ext.block_dequantize(part, BLOCK_FORMATS[self.kind], bf16, interleaved=True).to(dtype), take)
            order = torch.argsort(r8_order(self.kind, self.in_features)).to(part.device)
            return self._taken(self._dequantize(part.view(-1, order.numel())[:, order], dtype), take)
        if ext is not None:
            return ext.block_dequantize(part.contiguous(), BLOCK_FORMATS[self.kind], bf16=bf16).to(dtype)
        return self._dequantize(part, dtype)

    def _dequantize(self, part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows in order of this format -> fp32 or bf16, by gguf-py's reference."""
        values = gguf_dequantize(part.cpu().numpy(), GGMLQuantizationType[self.kind])
        return torch.from_numpy(values.astype(np.float32)).to(part.device, dtype).view(-1, self.in_features)

    def _fused(self, ext: Kernels, flat: torch.Tensor) -> torch.Tensor:
        return ext.block_linear(flat, self.weight, BLOCK_FORMATS[self.kind], self.interleaved)


def block_module(kind: str, in_features: int, out_features: int) -> QuantLinearBase:
    """An empty layer (on meta) that takes a GGUF tensor of format `kind` as stored: Q4_0 and Q4_1 are
    tramontane's int4 and int4_asym in groups of 32, the others `BlockLinear`."""
    with torch.device("meta"):
        if kind in ("Q4_0", "Q4_1"):
            return Int4Linear(in_features, out_features, 32, zero_point=kind == "Q4_1")
        return BlockLinear(in_features, out_features, kind)


def use_block_formats(model: Transformer, formats: dict[str, str], dtype: torch.dtype) -> None:
    """On a model built on the meta device, swap in for every weight named in `formats` (internal name
    -> GGUF format) an empty layer of that format, ready for `load_state_dict(assign=True)`."""
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            kind = formats.get(f"{name}.{attr}.weight" if name else f"{attr}.weight")
            if kind is None:
                continue
            if isinstance(child, nn.Embedding):
                table = block_module(kind, child.embedding_dim, child.num_embeddings)  # [vocab, dim], like a head
                setattr(module, attr, QuantEmbedding(table, dtype))
            elif isinstance(child, nn.Linear):
                setattr(module, attr, block_module(kind, child.in_features, child.out_features))


def block_formats(model: nn.Module) -> Counter[str]:
    """How many of the model's layers hold each GGUF block format (Q4_0/Q4_1 as int4 layers)."""
    counts: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, BlockLinear):
            counts[module.kind] += 1
        elif isinstance(module, Int4Linear) and module.group_size == 32:
            counts["Q4_1" if module.zero_point else "Q4_0"] += 1
    return counts
