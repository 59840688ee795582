"""What a GGUF file says about its model, without torch: `ModelArgs` from the metadata (checked against
the tensor table) and the internal name of each tensor. The torch loader (`loading/gguf.py`) and the
JAX loader share them.

Rotary layout: llama.cpp's converter permutes Hugging Face's rotate-half q/k rows back into Meta's
interleaved-pairs layout, which is tramontane's internal layout, so GGUF `attn_q`/`attn_k` are used
as stored (`tests/test_gguf.py` checks this against transformers).

Example:
    >>> args = read_gguf_args("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> gguf_to_internal("blk.3.attn_q.weight", (576, 576), "m.gguf")  # doctest: +SKIP
    (['layers.3.attention.wq.weight'], (576, 576))
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from ..args import ModelArgs, MoeArgs
from ..errors import ConfigError
from .gguf_file import GGUFFile, GGUFTensor, read_gguf
from .layout import check_against_tensors, gguf_fields

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

# `{arch}.` metadata keys that read_gguf_args understands (or knows to be harmless); others are warned about.
_KNOWN_ARCH_KEYS = {
    "context_length", "embedding_length", "block_count", "feed_forward_length", "expert_feed_forward_length",
    "vocab_size", "expert_count", "expert_used_count", "tensor_data_layout",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "attention.sliding_window",
    "rope.freq_base", "rope.dimension_count", "rope.scale_linear", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "rope.scaling.finetuned",
}



def read_gguf_args(source: GGUFFile | str | Path) -> ModelArgs:
    """Hyper-parameters from the metadata of a `llama` or `mistral` architecture GGUF file.

    Raises:
        ConfigError: unknown architecture, a missing field, or a feature tramontane lacks
            (rope scaling, partial rotary, per-layer head counts).

    Example:
        >>> args = read_gguf_args("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> args.n_heads, args.n_kv_heads, args.tied_embeddings  # doctest: +SKIP
        (9, 3, True)
    """
    file = read_gguf(source)
    path = str(file.path)
    arch = file.get("general.architecture")
    if arch is None:
        raise ConfigError(path, "missing metadata field general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(
            path, f"unsupported architecture {arch!r} (general.architecture); supported: {', '.join(ARCHITECTURES)}"
        )

    def get_int(key: str) -> int | None:
        value = file.get(f"{arch}.{key}")
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
        value = file.get(f"{arch}.{key}")
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(path, f"{arch}.{key}: expected a number, got {value!r}")
        # GGUF stores float32: keep the shortest decimal that rounds to it (1e-05, not 9.9999997e-06).
        return float(str(np.float32(value)))

    unknown = sorted(
        key for key in file.metadata if key.startswith(f"{arch}.") and key[len(arch) + 1:] not in _KNOWN_ARCH_KEYS
    )
    if unknown:
        warnings.warn(f"{path}: ignoring unknown metadata field(s) {', '.join(unknown)}", stacklevel=2)

    scaling = file.get(f"{arch}.rope.scaling.type")
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

    tensors = {t.name: t for t in file.tensors}
    try:
        args = ModelArgs(
            dim=dim,
            n_layers=require_int("block_count"),
            head_dim=head_dim,
            hidden_dim=hidden_dim,
            n_heads=n_heads,
            n_kv_heads=get_int("attention.head_count_kv") or n_heads,
            norm_eps=norm_eps,
            vocab_size=_vocab_size(file, tensors, arch, path),
            rope_theta=get_float("rope.freq_base") or 10000.0,
            sliding_window=get_int("attention.sliding_window"),
            max_seq_len=get_int("context_length"),
            tied_embeddings="output.weight" not in tensors,
            moe=MoeArgs(*moe) if moe else None,
        )
    except ValueError as e:
        raise ConfigError(path, str(e)) from e
    _check_args_against_tensors(file, args, arch, path)
    return args


def _split_heads(dim: int, n_heads: int, arch: str, path: str) -> int:
    """head_dim when the file gives no key_length: the embedding split evenly between the heads."""
    if n_heads < 1 or dim % n_heads:
        raise ConfigError(path, f"{arch}.embedding_length ({dim}) is not a multiple of {arch}.attention.head_count "
                                f"({n_heads}) and no {arch}.attention.key_length is given")
    return dim // n_heads


def _check_args_against_tensors(file: GGUFFile, args: ModelArgs, arch: str, path: str) -> None:
    """Metadata against the tensor table (block_count = blocks present, ...), before any model is built
    from it: a flipped bit in a count would otherwise size the model."""
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in file.tensors:
        mapped = gguf_to_internal(tensor.name, tensor.shape, path)
        if mapped is not None:  # unknown names are reported by the loader
            shapes.update(dict.fromkeys(mapped[0], mapped[1]))
    check_against_tensors(args, shapes, path, gguf_fields(arch))
    stated = file.get(f"{arch}.vocab_size")
    if stated is not None and stated != args.vocab_size:
        raise ConfigError(path, f"{arch}.vocab_size is {stated!r}, but the embedding token_embd.weight has "
                                f"{args.vocab_size} rows")


def _vocab_size(file: GGUFFile, tensors: dict[str, GGUFTensor], arch: str, path: str) -> int:
    embedding = tensors.get("token_embd.weight")
    if embedding is not None:
        return embedding.shape[0]
    tokens = file.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        return len(tokens)
    size = file.get(f"{arch}.vocab_size")
    if isinstance(size, int):
        return size
    raise ConfigError(path, "cannot tell the vocabulary size: no token_embd.weight, tokenizer.ggml.tokens or vocab_size")


def gguf_to_internal(gguf_name: str, shape: tuple[int, ...], path: str) -> tuple[list[str], tuple[int, ...]] | None:
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
