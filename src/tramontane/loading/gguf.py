"""GGUF checkpoints (llama.cpp files): hyper-parameters and weights under internal names (the writer is
in gguf_write.py).

GGUF keeps llama.cpp's tensor names (`blk.3.attn_q.weight`) and stores shapes in ggml's reversed
("ne") order; `gguf.GGUFReader` already hands tensors over in torch order, so a `[vocab, dim]`
embedding is listed as `ne = [dim, vocab]` but read as `(vocab, dim)`.

Rotary layout: llama.cpp's converter permutes Hugging Face's rotate-half q/k rows back into Meta's
interleaved-pairs layout, which is tramontane's internal layout, so GGUF `attn_q`/`attn_k` are used
as stored (`tests/test_gguf.py` checks this against transformers, which permutes them the other way,
using `layout.permute_hf_to_native`).

Example:
    >>> args, weights = load_gguf_state_dict("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> args.dim, weights["layers.0.attention.wk.weight"].shape  # doctest: +SKIP
    (576, torch.Size([192, 576]))
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize

from ..args import ModelArgs, MoeArgs
from ..blocks import fits, row_bytes
from ..errors import CheckpointError, ConfigError, TensorMismatchError
from ..kernels import qlinear, weight_empty
from .common import expected_shapes
from .gguf_layout import check_gguf_layout
from .validate import check_against_tensors, gguf_fields

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = ("llama", "mistral")  # newer llama.cpp writes "mistral" for native Mistral checkpoints

# GGUF name -> internal name, for tensors outside the blocks and for one block's tensors.
_TOP_LEVEL = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_PER_LAYER = {
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "ffn_gate_inp": "feed_forward.gate",
}
_EXPERTS = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")
_OLD_EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_down|ffn_up)\.(\d+)\.weight")  # pre-2024 Mixtral files

_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64}
_INT_TYPES = {GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32, GGMLQuantizationType.I64}

# `{arch}.` metadata keys that read_gguf_args understands (or knows to be harmless); others are warned about.
_KNOWN_ARCH_KEYS = {
    "context_length", "embedding_length", "block_count", "feed_forward_length", "expert_feed_forward_length",
    "vocab_size", "expert_count", "expert_used_count", "tensor_data_layout",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "attention.sliding_window",
    "rope.freq_base", "rope.dimension_count", "rope.scale_linear", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "rope.scaling.finetuned",
}


# ---------------------------------------------------------------------------------------------- reading


def open_gguf(path: str | Path) -> GGUFReader:
    """Open a GGUF file memory-mapped; a missing, foreign, truncated or corrupt file raises CheckpointError.

    Example:
        >>> reader = open_gguf("model.gguf")  # doctest: +SKIP
        >>> read_gguf_args(reader).n_layers  # doctest: +SKIP
        30
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from e
    if magic != GGUF_MAGIC:
        raise CheckpointError(path, f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    check_gguf_layout(path)  # every count and offset checked against the file before the reader trusts them
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader fails on bad bytes with whatever numpy raises first
        if isinstance(e, ValueError) and "GGMLQuantizationType" in str(e):
            raise CheckpointError(path, f"unsupported tensor type ({e})") from e
        raise CheckpointError(path, f"truncated or corrupt GGUF file ({size} bytes): {type(e).__name__}: {e}") from e
    if reader.byte_order != "I":
        raise CheckpointError(path, "GGUF file has the opposite byte order to this machine; not supported")
    return reader


def read_gguf_metadata(source: GGUFReader | str | Path, prefix: str = "") -> dict[str, Any]:
    """Metadata key/values whose key starts with `prefix`, as plain Python values (str, int, float, lists)."""
    reader = _reader(source)
    try:
        return {
            key: field.contents() for key, field in reader.fields.items()
            if key.startswith(prefix) and not key.startswith("GGUF.")
        }
    except (UnicodeDecodeError, IndexError, ValueError) as e:
        raise CheckpointError(_path_of(reader), f"corrupt metadata: {e}") from e


def gguf_tensor_info(source: GGUFReader | str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF tensor name -> (ggml type name, shape in torch order), read without touching the weights."""
    reader = _reader(source)
    return {t.name: (t.tensor_type.name, _torch_shape(t)) for t in reader.tensors}


def read_gguf_args(source: GGUFReader | str | Path) -> ModelArgs:
    """Hyper-parameters from the metadata of a `llama` or `mistral` architecture GGUF file.

    Raises:
        ConfigError: unknown architecture, a missing field, or a feature tramontane lacks
            (rope scaling, partial rotary, per-layer head counts).

    Example:
        >>> args = read_gguf_args("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> args.n_heads, args.n_kv_heads, args.tied_embeddings  # doctest: +SKIP
        (9, 3, True)
    """
    reader = _reader(source)
    path = _path_of(reader)
    arch = _meta(reader, "general.architecture", path)
    if arch is None:
        raise ConfigError(path, "missing metadata field general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(
            path, f"unsupported architecture {arch!r} (general.architecture); supported: {', '.join(ARCHITECTURES)}"
        )

    def get_int(key: str) -> int | None:
        value = _meta(reader, f"{arch}.{key}", path)
        if value is None:
            return None
        if isinstance(value, list):
            raise ConfigError(path, f"{arch}.{key}: per-layer values are not supported, got {value!r}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(path, f"{arch}.{key}: expected an integer, got {value!r}")
        return value

    def require_int(key: str) -> int:
        value = get_int(key)
        if value is None:
            raise ConfigError(path, f"missing metadata field {arch}.{key}")
        if value < 1:
            raise ConfigError(path, f"{arch}.{key}: expected a positive integer, got {value}")
        return value

    def get_float(key: str) -> float | None:
        value = _meta(reader, f"{arch}.{key}", path)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(path, f"{arch}.{key}: expected a number, got {value!r}")
        # GGUF stores float32: keep the shortest decimal that rounds to it (1e-05, not 9.9999997e-06).
        return float(str(np.float32(value)))

    unknown = sorted(
        key for key in reader.fields if key.startswith(f"{arch}.") and key[len(arch) + 1:] not in _KNOWN_ARCH_KEYS
    )
    if unknown:
        warnings.warn(f"{path}: ignoring unknown metadata field(s) {', '.join(unknown)}", stacklevel=2)

    scaling = _meta(reader, f"{arch}.rope.scaling.type", path)
    factor = get_float("rope.scaling.factor")
    if scaling not in (None, "none") and not (scaling == "linear" and factor in (None, 1.0)):
        raise ConfigError(path, f"rope scaling {scaling!r} (factor {factor}) is not supported")
    old_factor = get_float("rope.scale_linear")
    if old_factor not in (None, 1.0):
        raise ConfigError(path, f"rope scaling 'linear' (factor {old_factor}) is not supported")

    dim = require_int("embedding_length")
    n_heads = require_int("attention.head_count")
    head_dim = get_int("attention.key_length") or _split_heads(dim, n_heads, arch, path)
    value_dim = get_int("attention.value_length") or head_dim
    if value_dim != head_dim:
        raise ConfigError(path, f"{arch}.attention.value_length ({value_dim}) differs from key_length ({head_dim})")
    rotary_dim = get_int("rope.dimension_count") or head_dim
    if rotary_dim != head_dim:
        raise ConfigError(path, f"partial rotary ({arch}.rope.dimension_count={rotary_dim}, head_dim={head_dim})")
    norm_eps = get_float("attention.layer_norm_rms_epsilon")
    if norm_eps is None:
        raise ConfigError(path, f"missing metadata field {arch}.attention.layer_norm_rms_epsilon")
    hidden_dim = get_int("feed_forward_length") or get_int("expert_feed_forward_length")
    if hidden_dim is None:
        raise ConfigError(path, f"missing metadata field {arch}.feed_forward_length")

    n_experts = get_int("expert_count") or 0
    moe = None
    if n_experts:
        used = get_int("expert_used_count")
        if used is None:
            raise ConfigError(path, f"{arch}.expert_count is {n_experts} but {arch}.expert_used_count is missing")
        moe = (n_experts, used)

    tensors = {t.name: t for t in reader.tensors}
    try:
        args = ModelArgs(
            dim=dim,
            n_layers=require_int("block_count"),
            head_dim=head_dim,
            hidden_dim=hidden_dim,
            n_heads=n_heads,
            n_kv_heads=get_int("attention.head_count_kv") or n_heads,
            norm_eps=norm_eps,
            vocab_size=_vocab_size(reader, tensors, arch, path),
            rope_theta=get_float("rope.freq_base") or 10000.0,
            sliding_window=get_int("attention.sliding_window"),
            max_seq_len=get_int("context_length"),
            tied_embeddings="output.weight" not in tensors,
            moe=MoeArgs(*moe) if moe else None,
        )
    except ValueError as e:
        raise ConfigError(path, str(e)) from e
    _check_args_against_tensors(reader, args, arch, path)
    return args


def _split_heads(dim: int, n_heads: int, arch: str, path: str) -> int:
    """head_dim when the file gives no key_length: the embedding split evenly between the heads."""
    if n_heads < 1 or dim % n_heads:
        raise ConfigError(path, f"{arch}.embedding_length ({dim}) is not a multiple of {arch}.attention.head_count "
                                f"({n_heads}) and no {arch}.attention.key_length is given")
    return dim // n_heads


def _check_args_against_tensors(reader: GGUFReader, args: ModelArgs, arch: str, path: str) -> None:
    """Metadata against the tensor table (block_count = blocks present, ...), before any model is built
    from it: a flipped bit in a count would otherwise size the model."""
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in reader.tensors:
        mapped = _internal_names(tensor.name, _torch_shape(tensor), path)
        if mapped is not None:  # unknown names are reported by _plan
            shapes.update(dict.fromkeys(mapped[0], mapped[1]))
    check_against_tensors(args, shapes, path, gguf_fields(arch))
    stated = _meta(reader, f"{arch}.vocab_size", path)
    if stated is not None and stated != args.vocab_size:
        raise ConfigError(path, f"{arch}.vocab_size is {stated!r}, but the embedding token_embd.weight has "
                                f"{args.vocab_size} rows")


def iter_gguf_tensors(
    source: GGUFReader | str | Path,
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
    reader = _reader(source)
    path = _path_of(reader)
    if args is None:
        args = read_gguf_args(reader)
    for tensor, names, stacked in _plan(reader, args, path):
        kind = _kept(tensor, keep)
        if kind is not None:
            shape = _torch_shape(tensor)
            rows, cols = shape[-2:]
            for expert, name in enumerate(names):  # one matrix, or each expert of a stack
                offset = tensor.data_offset + expert * rows * row_bytes(kind, cols)
                if kind in ("Q4_0", "Q4_1"):
                    prefix = name.removesuffix("weight")
                    for leaf, part in zip(("weight", "scale", "mins"), _q4_parts(path, tensor.name, kind, offset, rows, cols)):
                        yield prefix + leaf, part.to(device)
                else:
                    yield name, _read_rows(path, tensor.name, offset, rows, row_bytes(kind, cols)).to(device)
            continue
        value = _to_torch(tensor, path)
        _release_mapped(tensor)
        if not stacked:
            yield names[0], value.to(device=device, dtype=dtype)
            continue
        for expert, name in enumerate(names):  # value: [n_experts, rows, cols]
            yield name, value[expert].to(device=device, dtype=dtype, copy=True)
        del value


def kept_formats(source: GGUFReader | str | Path, args: ModelArgs, keep: Collection[str]) -> dict[str, str]:
    """Internal weight name -> GGUF format, for every tensor `iter_gguf_tensors(..., keep=keep)` yields as
    stored (a layer of that format must take it)."""
    reader = _reader(source)
    formats: dict[str, str] = {}
    for tensor, names, _ in _plan(reader, args, _path_of(reader)):
        kind = _kept(tensor, keep)
        if kind is not None:
            formats.update(dict.fromkeys(names, kind))
    return formats


def loaded_bytes(source: GGUFReader | str | Path, keep: Collection[str], dtype: torch.dtype) -> int:
    """The bytes a load keeping the formats in `keep` will hold: those tensors' own bytes, and the
    others' elements as `dtype`."""
    reader = _reader(source)
    return sum(int(t.n_bytes) if _kept(t, keep) else int(t.n_elements) * dtype.itemsize for t in reader.tensors)


def dequantized_types(source: GGUFReader | str | Path, keep: Collection[str]) -> list[str]:
    """The quantized GGUF types of the file that loading with `keep` turns into floats."""
    reader = _reader(source)
    return sorted({t.tensor_type.name for t in reader.tensors
                   if t.tensor_type not in _FLOAT_TYPES and t.tensor_type.name not in keep})


def _kept(tensor: ReaderTensor, keep: Collection[str]) -> str | None:
    """The format `tensor` is kept in, or None when it is dequantized."""
    kind = tensor.tensor_type.name
    if kind not in keep or len(tensor.shape) < 2:
        return None
    if kind in ("Q4_0", "Q4_1"):
        return kind
    return kind if fits(kind, _torch_shape(tensor)[-1]) else None


def _read_rows(path: str, name: str, offset: int, rows: int, nbytes: int) -> torch.Tensor:
    """`rows` rows of `nbytes` bytes from `offset`, read a few MiB at a time straight into the memory
    the weights keep (see `_q4_parts` for why not through the memory map)."""
    out = weight_empty((rows, nbytes), torch.uint8)
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
    reader = open_gguf(path)
    args = read_gguf_args(reader)
    return args, dict(iter_gguf_tensors(reader, args, dtype=dtype, device=device))


# ---------------------------------------------------------------------------------------------- helpers


def _reader(source: GGUFReader | str | Path) -> GGUFReader:
    return source if isinstance(source, GGUFReader) else open_gguf(source)


def _path_of(reader: GGUFReader) -> str:
    return str(getattr(reader.data, "filename", None) or "<gguf>")


def _meta(reader: GGUFReader, key: str, path: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (UnicodeDecodeError, IndexError, ValueError) as e:
        raise ConfigError(path, f"metadata field {key} is corrupt: {e}") from e


def _torch_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ggml ne order is innermost first


def _vocab_size(reader: GGUFReader, tensors: dict[str, ReaderTensor], arch: str, path: str) -> int:
    embedding = tensors.get("token_embd.weight")
    if embedding is not None:
        return _torch_shape(embedding)[0]
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    size = _meta(reader, f"{arch}.vocab_size", path)
    if isinstance(size, int):
        return size
    raise ConfigError(path, "cannot tell the vocabulary size: no token_embd.weight, tokenizer.ggml.tokens or vocab_size")


def _internal_names(gguf_name: str, shape: tuple[int, ...], path: str) -> tuple[list[str], tuple[int, ...]] | None:
    """Internal name(s) of one GGUF tensor and the shape of each; None if the name is unknown.

    A merged expert tensor `[n_experts, rows, cols]` gives one name per expert, each `[rows, cols]`.
    """
    top, _, suffix = gguf_name.partition(".")
    if suffix == "weight" and top in _TOP_LEVEL:
        return [f"{_TOP_LEVEL[top]}.weight"], shape
    if top == "rope_freqs":
        raise ConfigError(path, f"tensor {gguf_name}: rope scaling (llama3-style frequency factors) is not supported")
    if (m := _OLD_EXPERT_TENSOR.fullmatch(gguf_name)) is not None:
        layer, kind, expert = m.groups()
        return [f"layers.{layer}.feed_forward.experts.{expert}.{_EXPERTS[kind]}.weight"], shape
    if (m := _BLOCK_TENSOR.fullmatch(gguf_name)) is None:
        return None
    layer, kind = m.groups()
    if kind in _PER_LAYER:
        return [f"layers.{layer}.{_PER_LAYER[kind]}.weight"], shape
    if kind.endswith("_exps") and kind.removesuffix("_exps") in _EXPERTS and len(shape) == 3:
        w = _EXPERTS[kind.removesuffix("_exps")]
        return [f"layers.{layer}.feed_forward.experts.{e}.{w}.weight" for e in range(shape[0])], shape[1:]
    return None


def _plan(reader: GGUFReader, args: ModelArgs, path: str) -> list[tuple[ReaderTensor, list[str], bool]]:
    """Map every tensor to (tensor, internal names, is a stack of experts), checking names, shapes and
    types before any weight is read."""
    expected = expected_shapes(args)
    plan: list[tuple[ReaderTensor, list[str], bool]] = []
    seen: set[str] = set()
    for tensor in reader.tensors:
        shape = _torch_shape(tensor)
        mapped = _internal_names(tensor.name, shape, path)
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
    for kind in sorted({t.tensor_type for t in reader.tensors}):
        if not _can_read(kind):
            name = next(t.name for t in reader.tensors if t.tensor_type == kind)
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


def _q4_parts(path: str, name: str, kind: str, offset: int, rows: int, cols: int) -> list[torch.Tensor]:
    """A Q4_0 matrix (`rows` x `cols` from `offset`) split into packed nibbles [rows, cols / 2] and
    float16 scales [rows, cols / 32]; a Q4_1 matrix, also float16 minimums [rows, cols / 32].

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
    nbytes = cols // 32 * block
    parts = [weight_empty((rows, cols // 2), torch.uint8)]
    parts += [weight_empty((rows, cols // 32), torch.float16) for _ in range(head // 2)]
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


def _to_torch(tensor: ReaderTensor, path: str) -> torch.Tensor:
    """The tensor's values as a fresh float tensor (a copy, never a view into the memory map)."""
    if tensor.tensor_type == GGMLQuantizationType.Q8_0:
        # 34-byte blocks: a float16 scale, then 32 int8 values; value = q * scale. In torch rather than
        # gguf-py's numpy (same products, several times faster and with one float temporary, not three)
        with warnings.catch_warnings():  # the map is read-only, and only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            blocks = torch.from_numpy(np.asarray(tensor.data)).view(-1, 34)  # [n_blocks, 34] uint8
        values = blocks[:, 2:].view(torch.int8).float()
        values.mul_(blocks[:, :2].contiguous().view(torch.float16).float())
        return values.view(_torch_shape(tensor))
    return torch.from_numpy(_to_numpy(tensor, path))


def _release_mapped(tensor: ReaderTensor) -> None:
    """Release the reader's mapped pages of a tensor that has been copied out: mapped pages count as
    this process's memory for as long as the file stays mapped (loading a 7B Q8_0 file as int8 peaked
    at 2.6x the weights). Never loses data: the pages are read again if touched."""
    ext = qlinear()
    if ext is not None:
        data = np.asarray(tensor.data)
        ext.release_pages(data.ctypes.data, data.nbytes)


def _to_numpy(tensor: ReaderTensor, path: str) -> np.ndarray:
    """The tensor's values as a fresh float array (a copy, never a view into the memory map)."""
    if tensor.tensor_type in _FLOAT_TYPES:
        return np.array(tensor.data)
    try:
        return dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, ValueError) as e:
        raise CheckpointError(path, f"tensor {tensor.name}: cannot dequantize {tensor.tensor_type.name}: {e}") from e
