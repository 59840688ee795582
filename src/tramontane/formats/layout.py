"""A Hugging Face checkpoint's files, and its tensor names and layouts <-> the internal (Mistral native)
ones, for any array type with `shape`, `reshape` and `swapaxes` (torch tensors, numpy and JAX arrays):
the torch loaders and the torch-free JAX loader share them; and the check every loader runs before
building a model, that the config's counts agree with the tensors present (`check_against_tensors`).
Nothing here imports torch."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ..args import ModelArgs
from ..errors import CheckpointError, ConfigError, TensorMismatchError

Array = Any  # torch.Tensor or numpy.ndarray

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_GLOBAL = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
_PER_LAYER = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "block_sparse_moe.gate.weight": "feed_forward.gate.weight",
    "mlp.gate.weight": "feed_forward.gate.weight",  # transformers >= 5 in memory
}
# task heads (heads.py): transformers' `score` (classification) or `qa_outputs` (question answering)
_HEAD = {"score.weight": "head.weight", "score.bias": "head.bias",
         "qa_outputs.weight": "head.weight", "qa_outputs.bias": "head.bias"}
_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def permute_hf_to_native(w: Array, n_heads: int) -> Array:
    """Rows of one head go from rotate-half order (0..D/2-1 | D/2..D-1) to interleaved pairs."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, dim).swapaxes(1, 2).reshape(rows, dim)


def permute_native_to_hf(w: Array, n_heads: int) -> Array:
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, dim).swapaxes(1, 2).reshape(rows, dim)


def to_internal(name: str, tensor: Array, args: ModelArgs, source: Path) -> list[tuple[str, Array]]:
    """Map one Hugging Face tensor to internal name(s); q/k are un-permuted, fused experts split."""
    if args.head is not None:
        if name in _HEAD:
            return [(_HEAD[name], tensor)]
        if name.startswith("transformer."):  # LlamaForQuestionAnswering's body prefix
            name = "model." + name.removeprefix("transformer.")
    if args.bare and not name.startswith("model."):  # a bare MistralModel saves its body without the prefix
        name = "model." + name
    if name in _GLOBAL:
        if name == "lm_head.weight" and args.tied_embeddings:
            return []  # some tied checkpoints store the shared matrix twice
        return [(_GLOBAL[name], tensor)]
    m = _LAYER.fullmatch(name)
    if m is None:
        raise TensorMismatchError(source, f"unexpected tensor {name!r}")
    layer, rest = m.groups()
    prefix = f"layers.{layer}."
    if rest.endswith("rotary_emb.inv_freq"):
        return []  # a cached buffer, recomputed from rope_theta
    if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
        q = rest.startswith("self_attn.q")
        heads, field = (args.n_heads, "num_attention_heads") if q else (args.n_kv_heads, "num_key_value_heads")
        if len(tensor.shape) != 2 or tensor.shape[0] != heads * args.head_dim:
            raise TensorMismatchError(
                source, f"tensor {name!r} has shape {list(tensor.shape)}, expected {heads * args.head_dim} rows "
                        f"({field} {heads} x head_dim {args.head_dim})",
            )
        return [(prefix + ("attention.wq.weight" if q else "attention.wk.weight"), permute_hf_to_native(tensor, heads))]
    if rest in _PER_LAYER:
        return [(prefix + _PER_LAYER[rest], tensor)]
    e = _EXPERT.fullmatch(rest)
    if e is not None:
        return [(f"{prefix}feed_forward.experts.{e.group(1)}.{e.group(2)}.weight", tensor)]
    if rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj") and len(tensor.shape) != 3:
        raise TensorMismatchError(source, f"tensor {name!r} has shape {list(tensor.shape)}, expected [experts, rows, cols]")
    if rest == "mlp.experts.gate_up_proj":  # [E, 2 * hidden, dim], gate rows first
        out = []
        for i, t in enumerate(tensor):
            gate, up = t[: t.shape[0] // 2], t[t.shape[0] // 2 :]
            out += [(f"{prefix}feed_forward.experts.{i}.w1.weight", gate),
                    (f"{prefix}feed_forward.experts.{i}.w3.weight", up)]
        return out
    if rest == "mlp.experts.down_proj":  # [E, dim, hidden]
        return [(f"{prefix}feed_forward.experts.{i}.w2.weight", t) for i, t in enumerate(tensor)]
    raise TensorMismatchError(source, f"unexpected tensor {name!r}")


def to_hf(name: str, tensor: Array, args: ModelArgs) -> tuple[str, Array]:
    """Map one internal tensor to its Hugging Face name (q/k re-permuted)."""
    hf_name, tensor = _to_hf_body(name, tensor, args)
    if args.bare:  # as transformers' MistralModel.save_pretrained names them
        hf_name = hf_name.removeprefix("model.")
    if args.head is not None and args.to_hf_config()["architectures"] == ["LlamaForQuestionAnswering"]:
        hf_name = hf_name.replace("model.", "transformer.", 1)  # that class keeps its old body prefix
    return hf_name, tensor


def _to_hf_body(name: str, tensor: Array, args: ModelArgs) -> tuple[str, Array]:
    if name.startswith("head."):
        assert args.head is not None  # only a TaskModel has a head
        return ("qa_outputs." if args.head.kind == "qa" else "score.") + name.removeprefix("head."), tensor
    reverse = {v: k for k, v in _GLOBAL.items()}
    if name in reverse:
        return reverse[name], tensor
    _, layer, rest = name.split(".", 2)
    prefix = f"model.layers.{layer}."
    if rest == "attention.wq.weight":
        return prefix + "self_attn.q_proj.weight", permute_native_to_hf(tensor, args.n_heads)
    if rest == "attention.wk.weight":
        return prefix + "self_attn.k_proj.weight", permute_native_to_hf(tensor, args.n_kv_heads)
    if rest.startswith("feed_forward.experts."):
        _, _, expert, w, _ = rest.split(".")
        return f"{prefix}block_sparse_moe.experts.{expert}.{w}.weight", tensor
    if rest == "feed_forward.gate.weight":
        return prefix + "block_sparse_moe.gate.weight", tensor
    reverse_layer = {v: k for k, v in _PER_LAYER.items() if not k.startswith(("mlp.gate.", "block_sparse"))}
    return prefix + reverse_layer[rest], tensor


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the folder: those its index names (each checked to lie inside the
    folder before any is opened), or the lone `model.safetensors`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(index, f"invalid index file ({e})") from e
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                index, f"weight_map must be an object of tensor name -> file name, got {_brief(weight_map)}"
            )
        files = [_inside(folder, name, index) for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f, "listed in model.safetensors.index.json but missing")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if list(folder.glob("*.bin")):
        raise CheckpointError(folder, "only pickle .bin weights found; convert them to safetensors first")
    raise CheckpointError(folder, "no model.safetensors or model.safetensors.index.json")


def _inside(folder: Path, name: str, index: Path) -> Path:
    """`folder / name`, refused when `name` is absolute or leads out of the folder (`..`, a symlink), or
    cannot be a file name at all (a NUL byte, which the operating system refuses in paths)."""
    if "\0" in name:
        raise CheckpointError(index, f"weight_map names {name!r}, which holds a NUL byte: not a file name")
    root = folder.resolve()
    target = (folder / name).resolve()
    if Path(name).is_absolute() or not target.is_relative_to(root) or target == root:
        raise CheckpointError(index, f"weight_map names {name!r}, which is outside the checkpoint folder {folder}")
    return folder / name


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_safetensors(path: Path, framework: str) -> Iterator[tuple[str, Any]]:
    """Tensors of a safetensors file as `framework`'s arrays ("pt", "flax", "numpy"), one at a time from
    the memory map."""
    try:
        with safe_open(str(path), framework=framework) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"cannot read safetensors file ({e}); is it truncated or corrupt?") from e


# ModelArgs field -> how each format's config names it, for the error messages.
NATIVE_FIELDS = {"n_layers": "n_layers", "vocab_size": "vocab_size", "num_experts": "moe.num_experts"}
HF_FIELDS = {"n_layers": "num_hidden_layers", "vocab_size": "vocab_size", "num_experts": "num_local_experts"}


def gguf_fields(arch: str) -> dict[str, str]:
    """The GGUF metadata keys of an `arch` file, under the same ModelArgs names."""
    keys = {"n_layers": "block_count", "vocab_size": "vocab_size", "num_experts": "expert_count"}
    return {field: f"{arch}.{key}" for field, key in keys.items()}


_INTERNAL_LAYER = re.compile(r"layers\.(\d+)\.")
_INTERNAL_EXPERT = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(\d+)\.")


def check_against_tensors(args: ModelArgs, shapes: Mapping[str, tuple[int, ...]], source: str | Path,
                          fields: Mapping[str, str]) -> None:
    """Compare the counts in `args` (layers, experts, vocabulary) with the tensors present: `shapes`
    maps internal names to shapes (for quantized tensors, the rows must be the logical ones).

    Raises:
        ConfigError: a count or size in the config disagrees with the tensors (named: the config field,
            the value it holds, and what the tensors say).
    """

    def refuse(field: str, value: object, found: str) -> ConfigError:
        return ConfigError(source, f"{fields[field]} is {value}, but {found}")

    # Counts above what the weights hold are refused here (they would size the model); counts below
    # leave tensors over, which loading reports by name as unexpected.
    layers = {int(m.group(1)) for name in shapes if (m := _INTERNAL_LAYER.match(name))}
    if args.n_layers > max(layers, default=-1) + 1:
        raise refuse("n_layers", args.n_layers, f"the weights hold {len(layers)} layers")
    experts: dict[int, set[int]] = {}
    for name in shapes:
        if (m := _INTERNAL_EXPERT.match(name)) is not None:
            experts.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if args.moe is None and experts:
        most = max(len(e) for e in experts.values())
        raise ConfigError(source, f"the weights hold {most} experts per layer, but {fields['num_experts']} is not set")
    if args.moe is not None and args.moe.num_experts > max((max(e) + 1 for e in experts.values()), default=0):
        found = ", ".join(str(c) for c in sorted({len(e) for e in experts.values()})) or "no"
        raise refuse("num_experts", args.moe.num_experts, f"the weights hold {found} experts per layer")

    embedding = shapes.get("tok_embeddings.weight") or shapes.get("tok_embeddings.table.weight")
    if embedding and embedding[0] != args.vocab_size:
        raise refuse("vocab_size", args.vocab_size, f"the embedding tok_embeddings.weight has {embedding[0]} rows")
    # Other sizes (dim, heads, feed-forward) need no check here: they do not multiply the modules built,
    # and each tensor's shape is compared with the model's before any weight is read.
