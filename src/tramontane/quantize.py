"""Weight-only quantization: a transform that swaps modules, plus metadata saved with the checkpoint.

- int8: one scale per output channel, symmetric, q in [-127, 127]; w = q * scale.
- int4: groups of `group_size` (a multiple of 32) along the input dimension, symmetric like GGUF's
  Q4_0: w = (q - 8) * scale with q in [0, 15] and a float16 scale; 4.5 bits per weight at groups of
  32. Packed two to a byte in blocks of 32, the bytes of Q4_0 (see kernels/int4.cpp), so a Q4_0 GGUF
  loads without requantizing.
- int4_asym: the same with a float16 minimum (zero point) per group, like Q4_1: w = q * scale + min;
  5 bits per weight, closer to the float weights, and a Q4_1 GGUF loads without requantizing.

Every linear layer of the blocks, the output head and the token embeddings are quantized (a tied head
shares the embedding's quantized tensors); norms and the MoE router stay in full precision. The model
code does not know: `Int8Linear`/`Int4Linear` are drop-in modules.

Example:
    >>> model = quantize_model(load_model(path), QuantConfig("int4", group_size=32))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kernels import Kernels, load_kernels, weight_empty
from .kernels.policy import kernel_policy
from .model import Transformer

METHODS = ("int8", "int4", "int4_asym")
# Rows quantized at a time: the float temporaries of quantizing stay small (a 7B embedding at once made
# three 805 MB ones), and the results go straight into the memory the weights keep (`weight_empty`).
QUANTIZE_ROWS = 1024


@dataclass(frozen=True)
class QuantConfig:
    method: str
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantize: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != "int8" and (self.group_size < 32 or self.group_size % 32):
            raise ValueError(f"group_size must be a positive multiple of 32, got {self.group_size}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        if self.method != "int8":
            out["group_size"] = self.group_size
        return out

    @classmethod
    def from_json(cls, data: Any, source: str | Path) -> QuantConfig:
        if not isinstance(data, dict) or "method" not in data:
            raise ConfigError(source, f"quantization must be an object with a method, got {data!r}")
        try:
            return cls(data["method"], int(data.get("group_size", 32)))
        except ValueError as e:
            raise ConfigError(source, f"quantization: {e}") from e


class QuantLinearBase(nn.Module):
    """What int8 and int4 layers share: decode-sized inputs on CPU go to the fused kernel, the rest
    (prefill, other devices, no compiler) dequantize once and use a plain matmul."""

    in_features: int
    out_features: int

    def dequantize(self, rows: slice | torch.Tensor = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in `dtype` (fp32 or bf16): of output `rows` only (a slice or index tensor) if given."""
        raise NotImplementedError

    def _fused(self, ext: Kernels, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # Whether the kernel has an AMX path that decodes each block of 32 to bf16 once for all rows
    # (kernels/amx.h; faster than the GEMM for int4, Q4_K and Q6_K, benchmarks/dot_rates.py), so
    # that on AMX it wins at any number of rows (`KernelPolicy.vector_wins`).
    amx_tiles = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _FrozenQuantMatmul.apply(x, self)  # training through a frozen base (QLoRA)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [M, in]
        policy = kernel_policy()
        ext = policy.kernels if flat.device.type == "cpu" else None
        if ext is not None and policy.vector_wins(flat.shape[0], self.amx_tiles, self.in_features):
            y = self._fused(ext, flat.float().contiguous())
        elif ext is not None:
            y = self._tiled(flat.float())
        else:
            y = F.linear(flat.float(), self.dequantize())
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T dequantizing the policy's prefill_tile output rows at a time: each tile is multiplied
        while it is still in cache, instead of writing the whole float matrix to memory and reading it
        back. Where the CPU multiplies bf16 much faster than fp32 (the policy's gemm_dtype: AMX), tiles
        and activations are rounded to bf16 for the product (accumulated in fp32), as weights that are
        already 8 or 4 bits lose little more; elsewhere the product stays fp32."""
        policy = kernel_policy()
        dtype, tile = policy.gemm_dtype, policy.prefill_tile
        xd = x.to(dtype)
        if self.out_features <= tile:
            return torch.mm(xd, self.dequantize(dtype=dtype).t()).float()  # [M, out]
        # x @ W.T per tile, written into the tile's columns: measured faster (SmolLM2 and 7B shapes, Zen 5)
        # than W @ x.T into rows of [out, M] and one transposing copy at the end
        y = torch.empty(x.shape[0], self.out_features)  # [M, out] fp32
        for r0 in range(0, self.out_features, tile):
            r1 = min(r0 + tile, self.out_features)
            y[:, r0:r1] = torch.mm(xd, self.dequantize(slice(r0, r1), dtype).t())
        return y


class _FrozenQuantMatmul(torch.autograd.Function):
    """y = x @ W.T through a frozen quantized W: the backward passes grad_x = grad_y @ W, dequantizing
    the policy's prefill_tile rows of W at a time, so no float copy of the weight outlives one tile (W gets no grad)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantLinearBase) -> torch.Tensor:
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        return layer._forward(x)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer: QuantLinearBase = ctx.layer
        gy = grad_y.reshape(-1, layer.out_features).float()  # [M, out]
        gx = torch.zeros(gy.shape[0], layer.in_features, dtype=torch.float32, device=gy.device)  # [M, in]
        tile = kernel_policy().prefill_tile
        for r0 in range(0, layer.out_features, tile):
            r1 = min(r0 + tile, layer.out_features)
            gx.addmm_(gy[:, r0:r1], layer.dequantize(slice(r0, r1)).to(gy.device))
        return gx.to(ctx.x_dtype).view(*grad_y.shape[:-1], layer.in_features), None


# ------------------------------------------------------------------------------------------ int8
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q [N, K] int8, scale [N] fp32)."""
    N, K = w.shape
    q = weight_empty((N, K), torch.int8, w.device)
    scale = torch.empty(N, dtype=torch.float32, device=w.device)
    for r in range(0, N, QUANTIZE_ROWS):  # see QUANTIZE_ROWS
        part = w[r : r + QUANTIZE_ROWS].float()
        s = (part.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q[r : r + QUANTIZE_ROWS] = torch.round(part / s[:, None]).clamp(-127, 127)
        scale[r : r + QUANTIZE_ROWS] = s
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


class Int8Linear(QuantLinearBase):
    """y = x @ (q * scale).T with int8 q [out, in] and one fp32 scale per output channel."""

    weight: torch.Tensor
    amx_tiles = True
    scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Linear:
        out_features, in_features = weight.shape
        with torch.device("meta"):
            m = cls(in_features, out_features)
        m.weight, m.scale = quantize_int8(weight)
        return m

    def dequantize(self, rows: slice | torch.Tensor = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight[rows], self.scale[rows]).to(dtype)

    def _fused(self, ext: Kernels, flat: torch.Tensor) -> torch.Tensor:
        return ext.int8_linear(flat, self.weight, self.scale)


# ------------------------------------------------------------------------------------------ int4
def quantize_int4(
    w: torch.Tensor, group_size: int, zero_point: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group-wise int4: (packed [N, K/2] uint8, scale [N, K/G] float16, mins [N, K/G] float16 or None).

    Symmetric: the scale maps the group's largest-magnitude value to -8, the end of the range with one
    more step, so that value is exact and the other side keeps 7 steps. With a zero point: the group's
    [min, max] spans q = 0..15. q is rounded against the float16 scale and min actually stored.
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4: input size {K} is not a multiple of group_size {group_size}")
    packed = weight_empty((N, K // 2), torch.uint8, w.device)
    scale = torch.empty(N, K // group_size, dtype=torch.float16, device=w.device)
    mins = torch.empty_like(scale) if zero_point else None
    for r in range(0, N, QUANTIZE_ROWS):  # see QUANTIZE_ROWS
        rows = slice(r, r + QUANTIZE_ROWS)
        packed[rows], scale[rows], part_mins = _quantize_int4_rows(w[rows], group_size, zero_point)
        if mins is not None and part_mins is not None:
            mins[rows] = part_mins
    return packed, scale, mins


def _quantize_int4_rows(
    w: torch.Tensor, group_size: int, zero_point: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    N, K = w.shape
    groups = w.float().view(N, K // group_size, group_size)
    if zero_point:
        mins = groups.amin(dim=-1).to(torch.float16)
        scale = ((groups.amax(dim=-1) - mins.float()) / 15).to(torch.float16)
        shifted = groups - mins.float()[..., None]
    else:
        extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # signed, [N, K/G]
        scale, mins = (extreme / -8).to(torch.float16), None
        shifted = groups + 8 * scale.float()[..., None]
    step = scale.float()
    step = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.round(shifted / step[..., None]).clamp(0, 15).to(torch.uint8)
    blocks = q.view(N, K // 32, 32)  # byte i of a block: element i (low nibble), element i + 16 (high)
    packed = (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(N, K // 2)
    return packed.contiguous(), scale.contiguous(), None if mins is None else mins.contiguous()


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None = None) -> torch.Tensor:
    N, half = packed.shape
    K = half * 2
    blocks = packed.view(N, K // 32, 16)
    q = torch.cat([blocks & 15, blocks >> 4], dim=-1).view(N, scale.shape[1], -1).float()  # [N, groups, G]
    if mins is None:
        return ((q - 8) * scale.float()[..., None]).view(N, K)
    return (q * scale.float()[..., None] + mins.float()[..., None]).view(N, K)


def interleave_int4(packed: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows in order -> rows interleaved by eights (kernels/int4.cpp): per group of 8 rows and block of
    32, half p (8 bytes) of the 8 rows one after another; scales and minimums [group][row]."""
    N, half = packed.shape
    groups = scale.shape[1]
    w = packed.view(N // 8, 8, half // 16, 2, 8).permute(0, 2, 3, 1, 4)  # [N/8, block, half, row, 8]
    by_group = lambda t: t.view(N // 8, 8, groups).transpose(1, 2).contiguous().view(N, groups)  # noqa: E731
    return w.contiguous().view(N, half), by_group(scale), None if mins is None else by_group(mins)


def rows_in_order(packed: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of `interleave_int4`."""
    N, half = packed.shape
    groups = scale.shape[1]
    w = packed.view(N // 8, half // 16, 2, 8, 8).permute(0, 3, 1, 2, 4)  # [N/8, row, block, half, 8]
    by_row = lambda t: t.view(N // 8, groups, 8).transpose(1, 2).contiguous().view(N, groups)  # noqa: E731
    return w.contiguous().view(N, half), by_row(scale), None if mins is None else by_row(mins)


class InterleavedRows(QuantLinearBase):
    """A quantized linear whose buffers may hold rows interleaved by eights (`interleave`, kernels/int4.cpp),
    the layout the kernels read fastest without AMX; outputs, `dequantize` and the state dict (rows in
    order, as checkpoints keep them) are the same in both layouts. A subclass says how its buffers repack
    (`_repacked`) and whether its format can (`interleaves`)."""

    interleaved = False
    format_name: str  # for messages
    weight: torch.Tensor

    def interleaves(self) -> bool:
        """Whether these rows can be interleaved (whole groups of 8, in a format that has the layout)."""
        return self.out_features % 8 == 0

    def _repacked(self, interleave: bool) -> dict[str, torch.Tensor | None]:
        """The buffers by name, repacked into rows interleaved by eights, or back into rows in order."""
        raise NotImplementedError

    def _check_interleaves(self) -> None:
        """Raises ValueError, naming the format, unless these rows can be interleaved."""
        if self.out_features % 8:
            raise ValueError(f"{self.format_name}: {self.out_features} output rows cannot be interleaved by eights")
        if not self.interleaves():
            raise ValueError(f"{self.format_name}: rows of this format are not interleaved")

    def interleave(self) -> None:
        """Repack the buffers, in place, into rows interleaved by eights (a no-op when they are)."""
        if not self.interleaved:
            self._check_interleaves()
            for name, tensor in self._repacked(True).items():
                setattr(self, name, tensor)
            self.interleaved = True

    def in_order(self) -> None:
        """Repack the buffers, in place, into rows in order (a no-op when they are)."""
        if self.interleaved:
            for name, tensor in self._repacked(False).items():
                setattr(self, name, tensor)
            self.interleaved = False

    def _groups(self, rows: slice | torch.Tensor) -> tuple[slice | torch.Tensor, torch.Tensor | None]:
        """The groups of 8 interleaved rows that hold output `rows`, and which row of each to take (None:
        all 8, the rows being whole groups in order)."""
        wanted = torch.arange(self.out_features, device=self.weight.device)[rows]  # [n]
        if isinstance(rows, slice) and len(wanted) and wanted[0] % 8 == 0 and len(wanted) % 8 == 0 \
                and rows.step in (None, 1):
            return slice(int(wanted[0]) // 8, int(wanted[0]) // 8 + len(wanted) // 8), None
        return wanted // 8, wanted % 8

    @staticmethod
    def _taken(out: torch.Tensor, take: torch.Tensor | None) -> torch.Tensor:
        """Rows of whole groups dequantized [8 n, in] -> the rows asked for (`_groups`' take)."""
        if take is None:
            return out
        return out.view(-1, 8, out.shape[1])[torch.arange(len(take)), take]  # [n, in]

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if not self.interleaved:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, tensor in self._repacked(False).items():
            if tensor is not None:
                destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # the state dict holds rows in order: load them so, then repack as before
        interleaved = self.interleaved
        self.in_order()
        super()._load_from_state_dict(state_dict, prefix, *args)
        if interleaved:
            self.interleave()


class Int4Linear(InterleavedRows):
    """y = x @ dequant(w).T with group-wise int4 weights, packed two per byte; symmetric, or with a
    minimum per group (`zero_point`); rows in order or interleaved by eights (`InterleavedRows`)."""

    amx_tiles = True
    format_name = "int4"

    weight: torch.Tensor
    scale: torch.Tensor
    mins: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, group_size: int, zero_point: bool = False,
                 interleaved: bool = False) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4: input size {in_features} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        if interleaved:
            self._check_interleaves()
        self.interleaved = interleaved
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float16))
        # a None buffer is left out of the state dict: symmetric layers save weight and scale only
        self.register_buffer("mins", torch.empty(out_features, groups, dtype=torch.float16) if zero_point else None)

    @property
    def zero_point(self) -> bool:
        return self.mins is not None

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int, zero_point: bool = False) -> Int4Linear:
        out_features, in_features = weight.shape
        with torch.device("meta"):
            m = cls(in_features, out_features, group_size, zero_point)
        m.weight, m.scale, mins = quantize_int4(weight, group_size, zero_point)
        if mins is not None:
            m.mins = mins
        return m

    def _repacked(self, interleave: bool) -> dict[str, torch.Tensor | None]:
        w, s, m = (interleave_int4 if interleave else rows_in_order)(self.weight, self.scale, self.mins)
        return {"weight": w, "scale": s, "mins": m}

    def dequantize(self, rows: slice | torch.Tensor = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        ext = load_kernels() if self.weight.device.type == "cpu" else None
        bf16 = dtype == torch.bfloat16
        if not self.interleaved:
            mins = None if self.mins is None else self.mins[rows]
            if ext is not None:
                return ext.int4_dequantize(self.weight[rows], self.scale[rows], mins, self.group_size, bf16=bf16).to(dtype)
            return dequantize_int4(self.weight[rows], self.scale[rows], mins).to(dtype)
        groups, take = self._groups(rows)
        by_group = lambda t: t.view(self.out_features // 8, -1)[groups]  # noqa: E731
        w, s = by_group(self.weight), by_group(self.scale)
        m = None if self.mins is None else by_group(self.mins)
        n = w.shape[0] * 8
        w, s = w.reshape(n, -1), s.reshape(n, -1)
        m = None if m is None else m.reshape(n, -1)
        if ext is not None:
            out = ext.int4_dequantize(w, s, m, self.group_size, interleaved=True, bf16=bf16).to(dtype)
        else:
            out = dequantize_int4(*rows_in_order(w, s, m)).to(dtype)
        return self._taken(out, take)

    def _fused(self, ext: Kernels, flat: torch.Tensor) -> torch.Tensor:
        return ext.int4_linear(flat, self.weight, self.scale, self.mins, self.group_size, self.interleaved)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"zero_point={self.zero_point}" + (", interleaved=True" if self.interleaved else ""))


QuantLinear = Int8Linear | Int4Linear


class QuantEmbedding(nn.Module):
    """Token embeddings read from a quantized matrix: the rows of the batch are dequantized on the fly."""

    def __init__(self, table: QuantLinearBase, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantize(tokens.reshape(-1))  # [N, dim]
        return rows.to(self.dtype).view(*tokens.shape, self.table.in_features)


def quantize_linear(config: QuantConfig, weight: torch.Tensor) -> QuantLinear:
    """The quantized layer for a float `weight` [out, in]; for a meta weight, an empty one on meta
    (a skeleton for `load_state_dict(assign=True)`)."""
    out_features, in_features = weight.shape
    if weight.is_meta:
        with torch.device("meta"):
            if config.method == "int8":
                return Int8Linear(in_features, out_features)
            return Int4Linear(in_features, out_features, config.group_size, config.method == "int4_asym")
    if config.method == "int8":
        return Int8Linear.from_float(weight)
    return Int4Linear.from_float(weight, config.group_size, config.method == "int4_asym")


def _linear_slots(model: Transformer) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every linear layer to quantize: all but the MoE router."""
    slots = []
    for name, module in model.layers.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.Linear) and not (attr == "gate" and name.endswith("feed_forward")):
                slots.append((module, attr, child))
    return slots


def quantize_model(model: Transformer, config: QuantConfig) -> Transformer:
    """Quantize `model` in place (weights are replaced one at a time) and return it.

    On the meta device this only swaps in empty quantized modules, ready for `load_state_dict(assign=True)`.
    """
    dtype = model.dtype
    for parent, attr, linear in _linear_slots(model):
        setattr(parent, attr, quantize_linear(config, linear.weight))
    if isinstance(model.tok_embeddings, nn.Embedding):
        table = quantize_linear(config, model.tok_embeddings.weight)  # [vocab, dim], like a head
        model.tok_embeddings = QuantEmbedding(table, dtype)  # type: ignore[assignment]
    if isinstance(model.output, nn.Linear):
        model.output = quantize_linear(config, model.output.weight)  # type: ignore[assignment]
    model.quantization = config  # type: ignore[assignment]
    tie_quantized_head(model)
    return model


def tie_quantized_head(model: Transformer) -> None:
    """A tied model projects with the embedding's quantized table (call after loading)."""
    if model.args.tied_embeddings and isinstance(model.tok_embeddings, QuantEmbedding):
        model.output = model.tok_embeddings.table  # type: ignore[assignment]


def quantized_state_dict(model: Transformer, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The tensors to save: a tied head is not written twice."""
    state = model.state_dict(keep_vars=keep_vars)
    if model.args.tied_embeddings:
        state = {k: v for k, v in state.items() if not k.startswith("output.")}
    return state
