"""GGUF checkpoints (llama.cpp files): hyper-parameters and weights under internal names (the writer is
in gguf_write.py).

GGUF keeps llama.cpp's tensor names (`blk.3.attn_q.weight`) and stores shapes in ggml's reversed
("ne") order; `gguf_file.read_gguf` hands them over in torch order, so a `[vocab, dim]` embedding is
listed as `ne = [dim, vocab]` but read as `(vocab, dim)`.

The file's header is read by `gguf_file.read_gguf`, its hyper-parameters and tensor names by
`gguf_args` (both torch-free, shared with the JAX loader); here the tensors become torch weights.

Example:
    >>> args, weights = load_gguf_state_dict("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> args.dim, weights["layers.0.attention.wk.weight"].shape  # doctest: +SKIP
    (576, torch.Size([192, 576]))
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ..args import ModelArgs
from ..errors import CheckpointError, TensorMismatchError
from ..formats.gguf_args import gguf_to_internal, read_gguf_args
from ..formats.gguf_file import GGUFFile, GGUFTensor, read_gguf
from ..fuse import FUSED
from ..gguf_linear import fits, row_bytes
from ..kernels import load_kernels, weight_empty
from .common import expected_shapes

_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64}
_INT_TYPES = {GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32, GGMLQuantizationType.I64}

# ---------------------------------------------------------------------------------------------- reading


def read_gguf_metadata(source: GGUFFile | str | Path, prefix: str = "") -> dict[str, Any]:
    """Metadata key/values whose key starts with `prefix`, as plain Python values (str, int, float, lists)."""
    return {key: value for key, value in read_gguf(source).metadata.items() if key.startswith(prefix)}


def gguf_tensor_info(source: GGUFFile | str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF tensor name -> (ggml type name, shape in torch order), read without touching the weights."""
    return {t.name: (t.type.name, t.shape) for t in read_gguf(source).tensors}


def iter_gguf_tensors(
    source: GGUFFile | str | Path,
    args: ModelArgs | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    keep: Collection[str] = (),
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(internal name, tensor)` one at a time, dequantized to `dtype` on `device`, except the
    tensors whose format is in `keep` (GGUF type names), which come as stored (`kept_formats` says
    which):

    - Q4_0 (Q4_1) as packed nibbles (`<name>.weight`, uint8 [rows, cols / 2]), float16 block scales
      (`<name>.scale`, [rows, cols / 32]) and for Q4_1 block minimums (`<name>.mins`): the layout of
      tramontane's int4 (int4_asym) with groups of 32;
    - the block formats of `blocks.BLOCK_FORMATS` (Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) as their rows of
      bytes (`<name>.weight`, uint8 [rows, row bytes]), one tensor per expert for merged experts.

    Every name, shape and tensor type is checked against `args` (read from the file when not given)
    before the first tensor is yielded, so a bad file fails fast. Merged expert tensors
    (`ffn_*_exps`) are split into one tensor per expert.

    Raises:
        TensorMismatchError: a tensor is missing, unknown, or has the wrong shape.
        CheckpointError: a tensor has a type that cannot be dequantized.
    """
    file = read_gguf(source)
    path = str(file.path)
    if args is None:
        args = read_gguf_args(file)
    plan = _plan(file, args, path)
    place = _Stacks(plan, keep)
    for tensor, names, stacked in plan:
        kind = _kept(tensor, keep)
        if kind is not None:
            shape = tensor.shape
            rows, cols = shape[-2:]
            for expert, name in enumerate(names):  # one matrix, or each expert of a stack
                offset = tensor.start + expert * rows * row_bytes(kind, cols)
                if kind in ("Q4_0", "Q4_1"):
                    prefix = name.removesuffix("weight")
                    leaves = _q4_leaves(kind, cols)
                    outs = [place.rows(name, leaf, rows, shape, dt) for leaf, (shape, dt) in leaves.items()]
                    for leaf, part in zip(leaves, _q4_parts(path, tensor.name, kind, offset, outs)):
                        yield prefix + leaf, part.to(device)
                else:
                    out = place.rows(name, "weight", rows, (row_bytes(kind, cols),), torch.uint8)
                    yield name, _read_rows(path, tensor.name, offset, out).to(device)
            continue
        value = _to_torch(file, tensor)
        _release_mapped(file, tensor)
        if not stacked:
            yield names[0], value.to(device=device, dtype=dtype)
            continue
        for expert, name in enumerate(names):  # value: [n_experts, rows, cols]
            yield name, value[expert].to(device=device, dtype=dtype, copy=True)
        del value


def kept_formats(source: GGUFFile | str | Path, args: ModelArgs, keep: Collection[str]) -> dict[str, str]:
    """Internal weight name -> GGUF format, for every tensor `iter_gguf_tensors(..., keep=keep)` yields as
    stored (a layer of that format must take it)."""
    file = read_gguf(source)
    formats: dict[str, str] = {}
    for tensor, names, _ in _plan(file, args, str(file.path)):
        kind = _kept(tensor, keep)
        if kind is not None:
            formats.update(dict.fromkeys(names, kind))
    return formats


def loaded_bytes(source: GGUFFile | str | Path, keep: Collection[str], dtype: torch.dtype) -> int:
    """The bytes a load keeping the formats in `keep` will hold: those tensors' own bytes, and the
    others' elements as `dtype`."""
    file = read_gguf(source)
    return sum(int(t.n_bytes) if _kept(t, keep) else int(t.n_elements) * dtype.itemsize for t in file.tensors)


def dequantized_types(source: GGUFFile | str | Path, keep: Collection[str]) -> list[str]:
    """The quantized GGUF types of the file that loading with `keep` turns into floats."""
    file = read_gguf(source)
    return sorted({t.type.name for t in file.tensors
                   if t.type not in _FLOAT_TYPES and t.type.name not in keep})


def _kept(tensor: GGUFTensor, keep: Collection[str]) -> str | None:
    """The format `tensor` is kept in, or None when it is dequantized."""
    kind = tensor.type.name
    if kind not in keep or len(tensor.shape) < 2:
        return None
    if kind in ("Q4_0", "Q4_1"):
        return kind
    return kind if fits(kind, tensor.shape[-1]) else None


class _Stacks:
    """Where each kept matrix is read to: the projections that `fuse_projections` stacks (q, k and v; w1
    and w3) into consecutive rows of one buffer per tensor of theirs (a block format's bytes; Q4_0's
    nibbles and scales, Q4_1's also minimums), when they share their format, so that fusing them copies
    nothing (on a 7B Q4_K_M file, a copy of 2.5 GB into fresh memory: seconds of loading); every other
    matrix into memory of its own.

    That memory is in 4 KiB pages: a 7B file's formats decoded only 1-1.5% slower in them than in 2 MiB
    pages (Q4_K_M and Q4_0), while a fresh 2 MiB page's first write tripled the 7B Q4_K_M's load on this
    project's VM (7.0 s against 4.1)."""

    def __init__(self, plan: list[tuple[GGUFTensor, list[str], bool]], keep: Collection[str]) -> None:
        kept = {name: (kind, tensor.shape[-2], row_bytes(kind, tensor.shape[-1]))
                for tensor, names, _ in plan if (kind := _kept(tensor, keep)) is not None
                for name in names}
        self._slot: dict[str, tuple[tuple[str, str], int, int]] = {}  # name -> (stack, first row, stack rows)
        self._members: dict[tuple[str, str], int] = {}  # matrices in each stack
        for name in kept:
            prefix, _, leaf = name.removesuffix(".weight").rpartition(".")
            for fused, parts in FUSED.items():
                members = [f"{prefix}.{part}.weight" for part in parts]
                if leaf != parts[0] or any(m not in kept for m in members) \
                        or len({(kept[m][0], kept[m][2]) for m in members}) != 1:
                    continue
                first = 0
                for m in members:
                    self._slot[m] = ((prefix, fused), first, sum(kept[x][1] for x in members))
                    first += kept[m][1]
                self._members[(prefix, fused)] = len(members)
        self._buffers: dict[tuple[str, str, str], tuple[torch.Tensor, int]] = {}  # (stack, leaf) -> (buffer, left)

    def rows(self, name: str, leaf: str, rows: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised `dtype` [rows, *shape] for tensor `leaf` of matrix `name`."""
        if name not in self._slot:
            return weight_empty((rows, *shape), dtype, huge_pages=False)
        (prefix, fused), first, total = self._slot[name]
        key = (prefix, fused, leaf)
        if key not in self._buffers:
            self._buffers[key] = (weight_empty((total, *shape), dtype, huge_pages=False), self._members[(prefix, fused)])
        buffer, left = self._buffers[key]
        if left > 1:
            self._buffers[key] = (buffer, left - 1)
        else:  # every member has its rows: the buffer lives on in their views
            del self._buffers[key]
        return buffer[first : first + rows]


def _read_rows(path: str, name: str, offset: int, out: torch.Tensor) -> torch.Tensor:
    """`out` (uint8 [rows, row bytes]) filled with the rows at `offset`, read a few MiB at a time straight
    into the memory the weights keep (see `_q4_parts` for why not through the memory map)."""
    nbytes = out.shape[1]
    flat = out.view(-1).numpy()
    step = max(1, (4 << 20) // nbytes) * nbytes
    with open(path, "rb") as f:
        f.seek(offset)
        for start in range(0, flat.nbytes, step):
            chunk = flat[start : start + step]
            if f.readinto(chunk.data) != chunk.nbytes:
                raise CheckpointError(path, f"tensor {name}: file ends inside its data")
    return out


def load_gguf_state_dict(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Hyper-parameters and a state dict under tramontane's internal (Mistral-native) names.

    Example:
        >>> args, weights = load_gguf_state_dict("model.gguf", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> sorted(weights)[:2]  # doctest: +SKIP
        ['layers.0.attention.wk.weight', 'layers.0.attention.wo.weight']
    """
    file = read_gguf(path)
    args = read_gguf_args(file)
    return args, dict(iter_gguf_tensors(file, args, dtype=dtype, device=device))


# ---------------------------------------------------------------------------------------------- helpers


def _plan(file: GGUFFile, args: ModelArgs, path: str) -> list[tuple[GGUFTensor, list[str], bool]]:
    """Map every tensor to (tensor, internal names, is a stack of experts), checking names, shapes and
    types before any weight is read."""
    expected = expected_shapes(args)
    plan: list[tuple[GGUFTensor, list[str], bool]] = []
    seen: set[str] = set()
    for tensor in file.tensors:
        shape = tensor.shape
        mapped = gguf_to_internal(tensor.name, shape, path)
        if mapped is None:
            raise TensorMismatchError(path, f"unknown tensor {tensor.name} (shape {shape})")
        names, each = mapped
        for name in names:
            if name not in expected:
                raise TensorMismatchError(path, f"tensor {tensor.name} ({name}) does not fit the model's shape")
            if name in seen:
                raise TensorMismatchError(path, f"tensor {tensor.name}: {name} appears twice")
            if each != expected[name]:
                raise TensorMismatchError(
                    path, f"tensor {tensor.name} ({name}): expected shape {expected[name]}, got {each}"
                )
            seen.add(name)
        plan.append((tensor, names, each != shape))
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise TensorMismatchError(path, f"missing tensor(s) {', '.join(missing[:5])}{more}")
    for kind in sorted({t.type for t in file.tensors}):
        if not _can_read(kind):
            name = next(t.name for t in file.tensors if t.type == kind)
            raise CheckpointError(path, f"tensor {name}: unsupported tensor type {kind.name}")
    return plan


def _can_read(kind: GGMLQuantizationType) -> bool:
    if kind in _FLOAT_TYPES:
        return True
    if kind in _INT_TYPES:
        return False
    block = np.zeros((1, GGML_QUANT_SIZES[kind][1]), dtype=np.uint8)
    try:
        dequantize(block, kind)
    except NotImplementedError:
        return False
    return True


def _q4_leaves(kind: str, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors a Q4_0 (Q4_1) matrix of `cols` columns is kept as: each one's row shape and dtype."""
    leaves: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"weight": ((cols // 2,), torch.uint8),
                                                              "scale": ((cols // 32,), torch.float16)}
    if kind == "Q4_1":
        leaves["mins"] = ((cols // 32,), torch.float16)
    return leaves


def _q4_parts(path: str, name: str, kind: str, offset: int, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """A Q4_0 matrix (from `offset`) split into `parts` (`_q4_leaves`: packed nibbles [rows, cols / 2] and
    float16 scales [rows, cols / 32]; a Q4_1 matrix, also float16 minimums [rows, cols / 32]).

    A Q4_0 block is 18 bytes: the float16 scale, then 16 bytes whose byte i holds element i (low
    nibble) and element i + 16 (high nibble), value (q - 8) * scale. Q4_1 has the minimum after the
    scale (20 bytes), value q * scale + min. The bytes are read from the file a few MiB at a time into
    one buffer, not through the reader's memory map (mapped pages count as this process's memory) nor
    into a whole-tensor temporary (freed temporaries of every size leave the heap fragmented), and
    straight into the memory the weights keep (`weight_empty`): loading a 7B model then peaks near the
    size of its weights.
    """
    head = 2 if kind == "Q4_0" else 4  # float16 scale (and min)
    block = head + 16
    rows, cols = parts[0].shape[0], parts[0].shape[1] * 2
    nbytes = cols // 32 * block
    step = max(1, (4 << 20) // nbytes)
    buffer = np.empty(min(rows, step) * nbytes, dtype=np.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            chunk = buffer[: n * nbytes]
            if f.readinto(chunk.data) != chunk.nbytes:
                raise CheckpointError(path, f"tensor {name}: file ends inside its data")
            blocks = torch.from_numpy(chunk).view(n, cols // 32, block)
            # strided copies into the destination rows, without temporaries: [n, cols / 32, bytes]
            parts[0][r0 : r0 + n].view(n, cols // 32, 16).copy_(blocks[..., head:])
            for i, part in enumerate(parts[1:]):
                part[r0 : r0 + n].view(torch.uint8).view(n, cols // 32, 2).copy_(blocks[..., 2 * i : 2 * i + 2])
    return parts


def _to_torch(file: GGUFFile, tensor: GGUFTensor) -> torch.Tensor:
    """The tensor's values as a fresh float tensor (a copy, never a view into the memory map)."""
    if tensor.type == GGMLQuantizationType.Q8_0:
        # 34-byte blocks: a float16 scale, then 32 int8 values; value = q * scale. In torch rather than
        # gguf-py's numpy (same products, several times faster and with one float temporary, not three)
        with warnings.catch_warnings():  # the map is read-only, and only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            blocks = torch.from_numpy(file.array(tensor)).view(-1, 34)  # [n_blocks, 34] uint8
        values = blocks[:, 2:].view(torch.int8).float()
        values.mul_(blocks[:, :2].contiguous().view(torch.float16).float())
        return values.view(tensor.shape)
    return torch.from_numpy(_to_numpy(file, tensor))


def _release_mapped(file: GGUFFile, tensor: GGUFTensor) -> None:
    """Release the reader's mapped pages of a tensor that has been copied out: mapped pages count as
    this process's memory for as long as the file stays mapped (benchmarks/load_memory.py measures the
    peak). Never loses data: the pages are read again if touched."""
    ext = load_kernels()
    if ext is not None:
        data = file.array(tensor)
        ext.release_pages(data.ctypes.data, data.nbytes)


def _to_numpy(file: GGUFFile, tensor: GGUFTensor) -> np.ndarray:
    """The tensor's values as a fresh float array (a copy, never a view into the memory map)."""
    if tensor.type in _FLOAT_TYPES:
        return np.array(file.array(tensor))
    try:
        return dequantize(file.array(tensor), tensor.type)
    except (NotImplementedError, ValueError) as e:
        raise CheckpointError(file.path, f"tensor {tensor.name}: cannot dequantize {tensor.type.name}: {e}") from e
