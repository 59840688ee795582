"""LoRA adapter folders: which format a folder holds, and mistral-finetune's `lora.safetensors`.

mistral-finetune writes `lora.safetensors` (native names, `layers.0.attention.wq.lora_A.weight` [rank, in],
`...lora_B.weight` [out, rank]) beside a `params.json` holding the model's parameters and
`"lora": {"enable", "rank", "dropout", "scaling"}`; mistral-inference merges `B @ A * scaling`, its
`load_lora` taking `scaling=2.0` when told nothing. The rank is the tensors' own. PEFT folders
(`adapter_config.json` + `adapter_model.safetensors`) go through `peft`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..args import ModelArgs
from ..errors import CheckpointError
from ..loading.common import NamedTensors
from . import peft
from .modules import LoraConfig, LoraWeights, merge_update

MISTRAL_FILE = "lora.safetensors"
MISTRAL_PARAMS = "params.json"
MISTRAL_DEFAULT_SCALING = 2.0  # mistral-inference's `load_lora(path, scaling=2.0)`
FORMATS = ("peft", "mistral")
_NATIVE_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")


def adapter_format(folder: Path) -> str:
    """'peft' or 'mistral', by the files `folder` holds; CheckpointError when it holds neither."""
    if not folder.is_dir():
        raise CheckpointError(folder, "no such adapter folder")
    if (folder / peft.CONFIG).is_file():
        return "peft"
    if (folder / MISTRAL_FILE).is_file():
        return "mistral"
    raise CheckpointError(folder, f"no adapter here (want {peft.CONFIG} + {peft.WEIGHTS} from PEFT, or "
                                  f"{MISTRAL_FILE} from mistral-finetune)")


def read_adapter(folder: str | Path, args: ModelArgs) -> dict[str, LoraWeights]:
    """The adapter in `folder` (either format) by native projection name (`layers.0.attention.wq`), in
    native row order, each checked against the projection shapes of `args`.

    Raises:
        CheckpointError: no adapter there, or its config or tensors are bad; the message names the file.
    """
    src = Path(folder)
    if adapter_format(src) == "peft":
        config_file = src / peft.CONFIG
        weights_file = src / peft.WEIGHTS
        if not weights_file.is_file():
            pickle = " (only pickle adapter_model.bin found: save it with safetensors)" \
                if (src / "adapter_model.bin").is_file() else ""
            raise CheckpointError(weights_file, f"missing{pickle}")
        config = read_json(config_file)
        adapters = peft.to_native(config, read_tensors(weights_file), args, config_file, weights_file)
        check_shapes(adapters, args, weights_file)
        return adapters
    file = src / MISTRAL_FILE
    scaling = _mistral_scaling(src / MISTRAL_PARAMS)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(file).items():
        m = _NATIVE_KEY.fullmatch(key)
        if m is None:
            raise CheckpointError(file, f"unexpected tensor {key!r} (want NAME.lora_A.weight and NAME.lora_B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    adapters = {name: LoraWeights(*_pair(ab, name, file), scaling) for name, ab in pairs.items()}
    check_shapes(adapters, args, file)
    return adapters


def write_adapter(folder: str | Path, adapters: Mapping[str, LoraWeights], args: ModelArgs, config: LoraConfig,
                  fmt: str = "peft", base_model: str | None = None) -> Path:
    """Write `adapters` (native names and rows) to `folder` in `fmt`: 'peft' (PeftModel.from_pretrained
    reads it) or 'mistral' (mistral-finetune's files). Returns the folder."""
    if fmt not in FORMATS:
        raise ValueError(f"adapter format: {fmt!r} is not one of: {', '.join(FORMATS)}")
    if not adapters:
        raise ValueError("adapters: the model holds no LoRA adapter to save")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "peft":
        peft_config, tensors = peft.from_native(adapters, args, config, base_model)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / peft.WEIGHTS), metadata={"format": "pt"})
        (out / peft.CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        return out
    scalings = {w.scaling for w in adapters.values()}
    if len(scalings) != 1:
        raise ValueError("adapters: mistral format has one scaling for all projections; these have "
                         f"{sorted(scalings)} (save as peft)")
    state: dict[str, torch.Tensor] = {}
    for name, w in adapters.items():
        state[f"{name}.lora_A.weight"] = w.a.contiguous()
        state[f"{name}.lora_B.weight"] = w.b.contiguous()
    save_file(state, str(out / MISTRAL_FILE))
    params = args.to_params()
    params["lora"] = {"enable": True, "rank": config.rank, "dropout": config.dropout, "scaling": scalings.pop()}
    (out / MISTRAL_PARAMS).write_text(json.dumps(params, indent=4) + "\n")
    return out


def merged_tensors(tensors: NamedTensors, adapters: Mapping[str, LoraWeights]) -> NamedTensors:
    """`tensors` (native names, float) with each adapted weight replaced by W + B @ A * scaling, computed in
    fp32 and stored in the weight's dtype: merging as a checkpoint streams in, one weight at a time."""
    for name, tensor, source in tensors:
        w = adapters.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if w is not None:
            assert tensor.dtype.is_floating_point  # callers merge only into float checkpoints
            tensor = merge_update(tensor, w.a, w.b, w.scaling)
        yield name, tensor, source


def projection_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(out, in) of every projection an adapter may target, by native name."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    ffn = {"w1": (args.hidden_dim, args.dim), "w2": (args.dim, args.hidden_dim), "w3": (args.hidden_dim, args.dim)}
    experts = [f"experts.{e}." for e in range(args.moe.num_experts)] if args.moe else [""]
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(args.n_layers):
        for name, shape in {"wq": (q, args.dim), "wk": (kv, args.dim), "wv": (kv, args.dim), "wo": (args.dim, q)}.items():
            shapes[f"layers.{layer}.attention.{name}"] = shape
        for expert in experts:
            for name, shape in ffn.items():
                shapes[f"layers.{layer}.feed_forward.{expert}{name}"] = shape
    return shapes


def check_shapes(adapters: Mapping[str, LoraWeights], args: ModelArgs, file: Path) -> None:
    """CheckpointError naming `file` unless every adapter targets a projection of `args` with fitting shapes."""
    shapes = projection_shapes(args)
    if not adapters:
        raise CheckpointError(file, "holds no adapter tensors")
    for name, w in adapters.items():
        if name not in shapes:
            raise CheckpointError(file, f"adapter for {name!r}, which is not a projection of this model")
        out, inp = shapes[name]
        if w.a.dim() != 2 or w.b.dim() != 2 or w.a.shape[1] != inp or w.b.shape[0] != out or w.a.shape[0] != w.b.shape[1]:
            raise CheckpointError(file, f"{name}: lora_A {list(w.a.shape)} and lora_B {list(w.b.shape)} do not fit "
                                        f"a [{out}, {inp}] projection (want [rank, {inp}] and [{out}, rank])")
        if not w.a.dtype.is_floating_point or not w.b.dtype.is_floating_point:
            raise CheckpointError(file, f"{name}: adapter tensors must be floats, got {w.a.dtype}")


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(file, f"invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(file, f"want a JSON object, got {type(data).__name__}")
    return data


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(file, "missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(file, f"not a readable safetensors file ({e})") from e


def _pair(ab: dict[str, torch.Tensor], name: str, file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if set(ab) != {"A", "B"}:
        raise CheckpointError(file, f"{name}: has lora_{''.join(ab)} only (want lora_A and lora_B)")
    return ab["A"], ab["B"]


def _mistral_scaling(params: Path) -> float:
    if not params.is_file():
        return MISTRAL_DEFAULT_SCALING
    lora = read_json(params).get("lora")
    scaling = lora.get("scaling") if isinstance(lora, dict) else None
    if isinstance(scaling, bool) or not isinstance(scaling, int | float) or not scaling > 0:
        raise CheckpointError(params, f"lora.scaling: want a number > 0 (mistral-finetune's LoraArgs), got {scaling!r}")
    return float(scaling)
