"""Load a model from whatever checkpoint the user has: a native folder, a Hugging Face folder or a GGUF file.

The format is decided by what the path holds (params.json, config.json, the GGUF magic), never by its name.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..args import ModelArgs
from ..download import resolve_model_name
from ..errors import CheckpointError
from ..formats.gguf_args import read_gguf_args
from ..formats.gguf_file import find_gguf, read_gguf
from ..fuse import unfused_state_dict
from ..gguf_linear import BLOCK_FORMATS, block_formats
from ..lora import LoraWeights, attach_lora
from ..lora.files import merged_tensors, read_adapter
from ..model import Transformer
from ..parallel.config import ParallelConfig
from ..parallel.shard import ShardPlan
from ..parallel.topology import Topology, init_topology
from ..quantize import QuantConfig, quantized_state_dict
from . import hf, native
from .common import NamedTensors, build_model
from .validate import check_memory

GGUF_MAGIC = b"GGUF"


def checkpoint_format(path: str | Path) -> str:
    """'native', 'hf' or 'gguf' for what `path` holds; CheckpointError if it is none of them."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(p, "no such file or folder")
    if p.is_file():
        with p.open("rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return "gguf"
        raise CheckpointError(p, "not a GGUF file (bad magic); give a model folder or a .gguf file")
    if native.is_native_folder(p):
        return "native"
    if hf.is_hf_folder(p):
        return "hf"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise CheckpointError(p, "no params.json (Mistral native) or config.json (Hugging Face) in this folder")


def read_model_args(path: str | Path) -> ModelArgs:
    """The hyper-parameters of a checkpoint (or of a downloaded model card's name), without loading weights."""
    p = resolve_model_name(path)
    fmt = checkpoint_format(p)
    if fmt == "native":
        return native.read_args(p)
    if fmt == "hf":
        return hf.read_args(p)
    return read_gguf_args(find_gguf(p))


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    quantize: str | QuantConfig | None = None,
    dequantize: bool = False,
    progress: bool = False,
    lora: str | Path | None = None,
    parallel: str | dict[str, object] | ParallelConfig | None = None,
) -> Transformer:
    """Load a model for inference, optionally quantizing its weights as they stream in.

    A GGUF file's quantized tensors stay in their own formats (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K,
    Q5_K, Q6_K: the same bytes, each with a kernel of its own), so a 4-bit file loads in about its size;
    float tensors take `dtype`. `dequantize=True` turns them all into `dtype` floats instead; other
    quantized types (Q2_K, Q3_K, IQ*) are always dequantized, with a warning.

    `quantize` is "int8", "int4", "int4_asym" (groups of 32) or a QuantConfig: every weight is converted
    to that scheme. A checkpoint saved quantized (`tramontane quantize`) loads as it was saved, without
    quantizing again; so do the Q4_0 (Q4_1) tensors of a GGUF file loaded as "int4" ("int4_asym").

    `path` may also be the name of a downloaded model card (`tramontane models` lists them).

    `lora` is a LoRA adapter folder (PEFT's or mistral-finetune's format). On a float base it is merged
    into the weights as they stream in (the model is then as fast as the base); on a quantized one
    (`quantize`, a saved quantized checkpoint, a GGUF file's kept formats) it stays beside the frozen
    weights as LoraLinear modules, as it was trained in QLoRA.

    Example:
        >>> model = load_model("mistral-7B-v0.3/", dtype=torch.bfloat16, device="cuda")
        >>> model = load_model("mistral-7b-instruct-v0.3")  # after `tramontane download mistral-7b-instruct-v0.3`
        >>> small = load_model("SmolLM2.gguf", quantize="int8")

    `parallel` ("tensor", "pipeline", {"tp": 2, "pp": 2} or a ParallelConfig; every rank of a
    torch.distributed job calls load_model alike) loads this rank's share only: see parallel/. The model
    then returns the full logits on every rank. An adapter is then merged as the weights stream in,
    before they are cut; one that cannot be merged (a quantized base) is refused.

    Before any memory is reserved, every config field is checked against the tensors the checkpoint
    holds (layers, experts, vocabulary, head sizes) and the weights' size against the memory available.

    Raises:
        CheckpointError: the path holds no usable checkpoint, names a model card not downloaded yet
            (`tramontane download NAME`), or does not fit in memory; the message names the file and
            problem (ConfigError: the config field).
        ValueError: `quantize` names no known scheme, disagrees with the checkpoint's, or is given with
            `dequantize`; or `lora` on a quantized base with `parallel`.
        ParallelError: `parallel` without torch.distributed initialised (the message says how to launch).
    """
    p = resolve_model_name(path)
    args = read_model_args(p) if lora is not None else None
    adapters = read_adapter(lora, args) if lora is not None and args is not None else {}
    topology = init_topology(parallel) if parallel is not None else None
    model, merged = _load(p, dtype, device, quantize, dequantize, progress, adapters, topology)
    if adapters and not merged:
        if topology is not None:
            raise ValueError(f"lora: {lora} stays beside a quantized base, which parallel= cannot shard yet; "
                             "load the base in floats to merge the adapter")
        try:
            attach_lora(model, adapters)
        except ValueError as e:
            raise CheckpointError(Path(str(lora)), str(e)) from e
    return model


def _load(p: Path, dtype: torch.dtype, device: torch.device | str, quantize: str | QuantConfig | None,
          dequantize: bool, progress: bool, adapters: dict[str, LoraWeights], topology: Topology | None
          ) -> tuple[Transformer, bool]:
    """`load_model` less the unmerged adapters, and whether `adapters` were merged into its weights (a
    float model: they are, as the tensors stream in)."""

    def plan(args: ModelArgs) -> ShardPlan | None:
        return None if topology is None else ShardPlan(args, topology)

    def share(args: ModelArgs) -> ModelArgs:  # what this rank holds, for the memory check
        return args if topology is None else ShardPlan(args, topology).local_args()

    fmt = checkpoint_format(p)
    wanted = QuantConfig(quantize) if isinstance(quantize, str) else quantize
    if wanted is not None and dequantize:
        raise ValueError("quantize and dequantize exclude each other: give one")
    if fmt == "native":
        args = native.read_args(p)
        saved = native.read_quantization(p, args)
        if saved is not None and wanted is not None and saved != wanted:
            raise ValueError(f"quantize: {p} is already quantized as {saved.method}; it cannot be loaded as {wanted.method}")
        check_memory(share(args), dtype, saved or wanted, device, p)
        merge = saved is None and wanted is None
        return _merged(build_model(args, _merging(native.iter_tensors(p), adapters, merge), p, dtype, device,
                                   progress, saved or wanted, shard=plan(args)), adapters, merge)
    if fmt == "hf":
        args = hf.read_args(p)
        check_memory(share(args), dtype, wanted, device, p)
        merge = wanted is None
        return _merged(build_model(args, _merging(hf.iter_tensors(p, args), adapters, merge), p, dtype, device,
                                   progress, wanted, shard=plan(args)), adapters, merge)
    from .gguf import (
        dequantized_types,
        iter_gguf_tensors,
        kept_formats,
        loaded_bytes,
    )

    file = find_gguf(p)
    header = read_gguf(file)
    args = read_gguf_args(header)
    keep = _kept_types(wanted, dequantize)
    formats = kept_formats(header, args, keep) if wanted is None else {}
    need = None if wanted else loaded_bytes(header, formats.values(), dtype) // (topology.config.world_size if topology else 1)
    check_memory(share(args), dtype, wanted, device, file, need=need)
    if not dequantize and wanted is None and (lost := dequantized_types(header, formats.values())):
        warnings.warn(f"{file}: no kernel for {', '.join(lost)}: those tensors are dequantized to {dtype}",
                      stacklevel=2)
    tensors = ((k, v, file) for k, v in iter_gguf_tensors(header, args, dtype=dtype, device=device, keep=keep))
    merge = wanted is None and not formats  # every weight arrives as floats
    return _merged(build_model(args, _merging(tensors, adapters, merge), file, dtype, device, progress, wanted,
                               formats, shard=plan(args)), adapters, merge)


def _merging(tensors: NamedTensors, adapters: dict[str, LoraWeights], merge: bool) -> NamedTensors:
    return merged_tensors(tensors, adapters) if merge and adapters else tensors


def _merged(model: Transformer, adapters: dict[str, LoraWeights], merge: bool) -> tuple[Transformer, bool]:
    return model, merge and bool(adapters)


def _kept_types(wanted: QuantConfig | None, dequantize: bool) -> tuple[str, ...]:
    """The GGUF types a load keeps as stored: all it has layers for by default; under `quantize`, only
    Q4_0 (Q4_1), which are int4 (int4_asym) with groups of 32 already, so nothing is rounded twice."""
    if dequantize:
        return ()
    if wanted is None:
        return ("Q4_0", "Q4_1", *BLOCK_FORMATS)
    return {QuantConfig("int4", 32): ("Q4_0",), QuantConfig("int4_asym", 32): ("Q4_1",)}.get(wanted, ())


def save_model(model: Transformer, folder: str | Path, to: str, dtype: torch.dtype | None = None) -> None:
    """Write `model` as a native ('native') or Hugging Face ('hf') folder; a quantized model only as native."""
    if model.parallel is not None:
        raise ValueError("model: this is one rank's share of a parallel model; load the checkpoint in one "
                         "process (without parallel=) to save it")
    quant: QuantConfig | None = getattr(model, "quantization", None)
    if quant is None and (held := block_formats(model)):
        raise ValueError(f"to: this model holds GGUF block formats ({', '.join(sorted(held))}) that only a GGUF "
                         "file stores; load it with dequantize=True (--dequantize) or quantize=... to save it")
    if quant is not None:
        if to != "native":
            raise ValueError(f"to: a {quant.method} model can only be saved as a native folder, not {to!r}")
        native.save(Path(folder), model.args, unfused_state_dict(quantized_state_dict(model), model), dtype, quant)
        return
    state = unfused_state_dict(model.state_dict(), model)
    if to == "native":
        native.save(Path(folder), model.args, state, dtype)
    elif to == "hf":
        hf.save(Path(folder), model.args, state, dtype)
    else:
        raise ValueError(f"to must be 'native' or 'hf', got {to!r}")

