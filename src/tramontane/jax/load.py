"""Weights for the JAX model, read without torch: native and Hugging Face safetensors folders (names and
q/k layout through `tramontane.formats.layout`, the torch loaders' own table) and GGUF files (header, hyper-
parameters and names through `gguf_file` and `gguf_args`, as the torch loader reads them; the blocks
dequantized by gguf-py's numpy code)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from gguf.quants import dequantize

from ..args import ModelArgs
from ..errors import CheckpointError, TensorMismatchError
from ..formats.gguf_args import gguf_to_internal, read_gguf_args
from ..formats.gguf_file import GGUFFile, find_gguf, read_gguf
from ..formats.layout import read_safetensors, to_internal, weight_files
from .model import Params


def load_params(path: str | Path, dtype: Any = jnp.float32) -> tuple[Params, ModelArgs]:
    """The weights of a checkpoint as the JAX model's pytree, in `dtype`, and its ModelArgs.

    Raises:
        CheckpointError: no checkpoint at `path`, a `.pth` native folder (convert it to safetensors with
            `tramontane convert`), or tensors that do not match the config (the message names the file).
    """
    p = Path(path)
    if p.suffix == ".gguf" or (p.is_dir() and any(p.glob("*.gguf"))):
        file = read_gguf(find_gguf(p))
        args = read_gguf_args(file)
        return _assemble(args, _gguf_arrays(file, dtype), file.path), args
    if (p / "params.json").is_file():
        args = ModelArgs.from_params_json(p / "params.json")
        files = sorted(p.glob("consolidated*.safetensors"))
        if not files:
            raise CheckpointError(p, "no consolidated*.safetensors file (a .pth checkpoint needs torch: "
                                     "`tramontane convert` it to safetensors first)")
        tensors: Iterator[tuple[str, jax.Array, Path]] = ((n, t, f) for f in files for n, t in read_safetensors(f, "flax"))
    elif (p / "config.json").is_file():
        args = ModelArgs.from_hf_config_json(p / "config.json")
        tensors = ((i, t, f) for f in weight_files(p) for n, raw in read_safetensors(f, "flax") for i, t in to_internal(n, raw, args, f))
    else:
        raise CheckpointError(p, "no params.json, config.json or .gguf file: not a checkpoint")
    if args.head is not None:
        raise CheckpointError(p, "task heads are not in the JAX model; load it with tramontane.load_model")
    return _assemble(args, ((n, t.astype(dtype), f) for n, t, f in tensors), p), args


def _gguf_arrays(file: GGUFFile, dtype: Any) -> Iterator[tuple[str, jax.Array, Path]]:
    """Each GGUF tensor dequantized, under its internal name(s): a stack of experts gives one per expert."""
    for tensor in file.tensors:
        mapped = gguf_to_internal(tensor.name, tensor.shape, str(file.path))
        if mapped is None:
            raise TensorMismatchError(file.path, f"unknown tensor {tensor.name} (shape {tensor.shape})")
        names, each = mapped
        try:
            values = dequantize(file.array(tensor), tensor.type)  # float32 [*tensor.shape]
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(file.path, f"tensor {tensor.name}: cannot dequantize {tensor.type.name}: {e}") from e
        if each == tensor.shape:
            yield names[0], jnp.asarray(values, dtype), file.path
        else:  # [n_experts, rows, cols]
            for expert, name in enumerate(names):
                yield name, jnp.asarray(values[expert], dtype), file.path


def _assemble(args: ModelArgs, tensors: Iterator[tuple[str, jax.Array, Path]], source: Path) -> Params:
    """Stack per-layer tensors (and experts) on leading axes; check every expected tensor is there once."""
    flat: dict[str, jax.Array] = {}
    for name, tensor, file in tensors:
        if name in flat:
            raise TensorMismatchError(file, f"tensor {name!r} appears twice")
        flat[name] = tensor
    experts = args.moe.num_experts if args.moe is not None else 0
    params: Params = {"tok_embeddings": _take(flat, "tok_embeddings.weight", source),
                      "norm": _take(flat, "norm.weight", source)}
    if not args.tied_embeddings:
        params["output"] = _take(flat, "output.weight", source)
    layers: dict[str, list[jax.Array]] = {}
    for i in range(args.n_layers):
        for key, name in _layer_names(i, experts):
            layers.setdefault(key, []).append(_take(flat, name, source))
    if flat:
        raise TensorMismatchError(source, f"unexpected tensors {sorted(flat)[:3]}")
    stacked = {}
    for key, parts in layers.items():
        if experts and key in ("w1", "w2", "w3"):
            # [L * E, ...] -> [L, E, ...]
            parts = [jnp.stack(parts[i * experts:(i + 1) * experts]) for i in range(args.n_layers)]
        stacked[key] = jnp.stack(parts)
    params["layers"] = stacked
    _check_shapes(args, params, source)
    return params


def _layer_names(i: int, experts: int) -> Iterator[tuple[str, str]]:
    yield "attention_norm", f"layers.{i}.attention_norm.weight"
    yield "ffn_norm", f"layers.{i}.ffn_norm.weight"
    for w in ("wq", "wk", "wv", "wo"):
        yield w, f"layers.{i}.attention.{w}.weight"
    if experts:
        yield "gate", f"layers.{i}.feed_forward.gate.weight"
        for w in ("w1", "w2", "w3"):
            for e in range(experts):
                yield w, f"layers.{i}.feed_forward.experts.{e}.{w}.weight"
    else:
        for w in ("w1", "w2", "w3"):
            yield w, f"layers.{i}.feed_forward.{w}.weight"


def _take(flat: dict[str, jax.Array], name: str, source: Path) -> jax.Array:
    if name not in flat:
        raise TensorMismatchError(source, f"missing tensor {name!r}")
    return flat.pop(name)


def _check_shapes(args: ModelArgs, params: Params, source: Path) -> None:
    L, D, F, hd = args.n_layers, args.dim, args.hidden_dim, args.head_dim
    E = (args.moe.num_experts,) if args.moe is not None else ()
    want = {"wq": (L, args.n_heads * hd, D), "wk": (L, args.n_kv_heads * hd, D), "wv": (L, args.n_kv_heads * hd, D),
            "wo": (L, D, args.n_heads * hd), "w1": (L, *E, F, D), "w3": (L, *E, F, D), "w2": (L, *E, D, F),
            "attention_norm": (L, D), "ffn_norm": (L, D)}
    for key, shape in want.items():
        got = tuple(params["layers"][key].shape)
        if got != shape:
            raise TensorMismatchError(source, f"layer tensors {key!r} have shape {got[1:]}, the config wants {shape[1:]}")
    if tuple(params["tok_embeddings"].shape) != (args.vocab_size, D):
        raise TensorMismatchError(source, f"tok_embeddings has shape {tuple(params['tok_embeddings'].shape)}, "
                                          f"the config wants {(args.vocab_size, D)}")
