"""Writing GGUF files (for tests and for benchmarking llama.cpp on our weights), from internal names."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from ..args import ModelArgs
from ..errors import TensorMismatchError
from ..formats.gguf_args import _EXPERTS, _PER_LAYER
from .common import expected_shapes

WRITE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def write_gguf(
    path: str | Path,
    args: ModelArgs,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer: Mapping[str, Any] | None = None,
    qtype: str = "F32",
) -> None:
    """Write a `llama` architecture GGUF file from a state dict under internal names.

    `qtype` is one of `WRITE_TYPES`; norms stay F32, as llama.cpp writes them, and so does any matrix
    whose rows are not a whole number of quantization blocks. `tokenizer` holds `tokenizer.*`
    metadata to copy in (for example `read_gguf_metadata(other, "tokenizer.")`).

    Example:
        >>> write_gguf("tiny.gguf", args, model.state_dict(), qtype="Q8_0")  # doctest: +SKIP
    """
    if qtype not in WRITE_TYPES:
        raise ValueError(f"qtype must be one of {', '.join(WRITE_TYPES)}, got {qtype!r}")
    path = Path(path)
    expected = expected_shapes(args)
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise TensorMismatchError(path, f"state dict does not match args: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise TensorMismatchError(path, f"{name}: expected shape {shape}, got {tuple(state_dict[name].shape)}")

    target = GGMLQuantizationType[qtype]

    def encoded() -> Iterator[tuple[str, np.ndarray, GGMLQuantizationType | None]]:
        for gguf_name, internal in _gguf_names(args):
            if isinstance(internal, list):
                # experts stacked: [n_experts, rows, cols], ggml ne order [cols, rows, n_experts]
                value = torch.stack([state_dict[n].detach().to("cpu", torch.float32) for n in internal])
            else:
                value = state_dict[internal].detach().to("cpu", torch.float32)
            yield (gguf_name, *_encode(value.contiguous().numpy(), target))

    _write(path, args, tokenizer, encoded(), quantized=target not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16))


def write_gguf_blocks(
    path: str | Path,
    args: ModelArgs,
    blocks: Callable[[str, tuple[int, ...]], tuple[np.ndarray, GGMLQuantizationType | None]],
    tokenizer: Mapping[str, Any] | None = None,
) -> None:
    """Write a `llama` GGUF whose tensors `blocks(internal name, shape)` hands over already encoded:
    a float32 array (type None) or a quantized type's raw bytes, [rows, bytes per row]. For files too
    large to hold as floats (the benchmark's random 7B model writes its Q4_0 blocks directly).
    Dense models only."""
    if args.moe is not None:
        raise ValueError("write_gguf_blocks: mixture-of-experts models are not supported")
    shapes = expected_shapes(args)
    tensors = ((name, *blocks(internal, shapes[internal])) for name, internal in _gguf_names(args)
               if isinstance(internal, str))
    _write(Path(path), args, tokenizer, tensors, quantized=True)


def _write(path: Path, args: ModelArgs, tokenizer: Mapping[str, Any] | None,
           tensors: Iterable[tuple[str, np.ndarray, GGMLQuantizationType | None]], quantized: bool) -> None:
    writer = GGUFWriter(path, "llama")
    _add_args(writer, args)
    if tokenizer is not None:
        for key, value in tokenizer.items():
            _add_value(writer, key, value)
    if quantized:
        writer.add_quantization_version(2)
    for name, value, raw_dtype in tensors:
        writer.add_tensor(name, value, raw_dtype=raw_dtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _add_args(writer: GGUFWriter, args: ModelArgs) -> None:
    writer.add_block_count(args.n_layers)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    if args.max_seq_len is not None:
        writer.add_context_length(args.max_seq_len)
    if args.sliding_window is not None:
        writer.add_sliding_window(args.sliding_window)
    if args.moe is not None:
        writer.add_expert_count(args.moe.num_experts)
        writer.add_expert_used_count(args.moe.num_experts_per_tok)


def _add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        if value >= 0:
            writer.add_uint32(key, value)
        else:
            writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"metadata {key}: cannot write a value of type {type(value).__name__}")


def _encode(value: np.ndarray, target: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    block = GGML_QUANT_SIZES[target][0]
    if value.ndim < 2 or target == GGMLQuantizationType.F32 or value.shape[-1] % block:
        return value, None
    if target == GGMLQuantizationType.F16:
        return value.astype(np.float16), None
    return quantize(value, target), target


def _gguf_names(args: ModelArgs) -> Iterator[tuple[str, str | list[str]]]:
    """(GGUF name, internal name or the per-expert names it stacks), in the order llama.cpp writes them."""
    yield "token_embd.weight", "tok_embeddings.weight"
    for i in range(args.n_layers):
        for gguf_name, internal in _PER_LAYER.items():
            if internal.startswith("feed_forward.") and (args.moe is None) == (internal == "feed_forward.gate"):
                continue
            yield f"blk.{i}.{gguf_name}.weight", f"layers.{i}.{internal}.weight"
        if args.moe is not None:
            for gguf_name, w in _EXPERTS.items():
                names = [f"layers.{i}.feed_forward.experts.{e}.{w}.weight" for e in range(args.moe.num_experts)]
                yield f"blk.{i}.{gguf_name}_exps.weight", names
    yield "output_norm.weight", "norm.weight"
    if not args.tied_embeddings:
        yield "output.weight", "output.weight"
