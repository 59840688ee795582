"""PEFT's LoRA files (`adapter_config.json` + `adapter_model.safetensors`) <-> adapters in native names.

PEFT names a tensor after the Hugging Face module it adapts, under `base_model.model.`:
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Its scaling is `lora_alpha / r`
(`/ sqrt(r)` with rsLoRA), per module through `rank_pattern` / `alpha_pattern` (regexes matched against
the end of the module's name, the first that matches winning). Hugging Face permutes the rows of q_proj
and k_proj for rotate-half rotary embeddings, so their lora_B rows are permuted the same way (lora_A, which
acts on the input, is not).

Mixtral's experts: transformers 4 had a linear per expert (`block_sparse_moe.experts.3.w1`); transformers 5
holds each layer's experts as two 3-D parameters, `mlp.experts.gate_up_proj` [E, 2 * hidden, dim] and
`mlp.experts.down_proj` [E, dim, hidden], which PEFT adapts through `target_parameters`: one wrapper per
parameter, nested on the `experts` module in its parameter order (the inner one's names gain
`base_layer.`), lora_A [E * r, in] expert-major, lora_B [out, r * E] expert-minor. Both are read; files
are written the transformers 5 way. w1 and w3 share gate_up_proj's lora_A there, so two adapters of rank r
are written as one of rank 2r with a block-diagonal lora_B (the same update).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..args import ModelArgs
from ..errors import CheckpointError
from ..formats.layout import permute_hf_to_native, permute_native_to_hf
from .modules import LoraConfig, LoraWeights

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_MODULE = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
           "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
           "feed_forward.w2": "mlp.down_proj"}
_NATIVE = {hf: native for native, hf in _MODULE.items()}
_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OLD_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])")
_FUSED = re.compile(r"mlp\.experts((?:\.base_layer)*)")
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # MixtralExperts' parameter order: the nesting order
# config fields whose other values change what the update is; we refuse them rather than misread them
_REFUSED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none"}


def to_native(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], args: ModelArgs,
              config_file: Path, weights_file: Path) -> dict[str, LoraWeights]:
    """The adapters of a PEFT folder by native projection name, in native row order."""
    r, alpha, rslora = _read_config(config, config_file)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key.removeprefix(PREFIX)) if key.startswith(PREFIX) else None
        if m is None:
            raise CheckpointError(weights_file, f"unexpected tensor {key!r} (want {PREFIX}MODULE.lora_A.weight and "
                                                "...lora_B.weight; DoRA, biases and embedding adapters are not supported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    fused_order = _fused_targets(config.get("target_parameters") or [])
    out: dict[str, LoraWeights] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(weights_file, f"{module}: has lora_{''.join(ab)} only (want lora_A and lora_B)")
        a, b = ab["A"], ab["B"]
        layer_match = _LAYER.fullmatch(module)
        if layer_match is None:
            raise CheckpointError(weights_file, f"{module}: not a projection of a layer (tramontane adapts "
                                                f"{', '.join(_NATIVE)})")
        layer, rest = layer_match.groups()
        if (fused := _FUSED.fullmatch(rest)) is not None:
            depth = fused.group(1).count(".base_layer")
            if depth >= len(fused_order):
                raise CheckpointError(config_file, f"target_parameters: {module} has an adapter for the experts that "
                                                   "no target_parameters entry (gate_up_proj, down_proj) explains")
            param = fused_order[len(fused_order) - 1 - depth]
            name = f"model.layers.{layer}.mlp.experts.{param}"
            scaling = _scaling(name, a.shape[0] // _experts(args, weights_file, module), r, alpha, rslora,
                               rank_pattern, alpha_pattern)
            out.update(_split_experts(int(layer), param, a, b, scaling, args, weights_file, module))
            continue
        if (old := _OLD_EXPERT.fullmatch(rest)) is not None:
            native = f"layers.{layer}.feed_forward.experts.{old.group(1)}.{old.group(2)}"
        elif rest in _NATIVE:
            native = f"layers.{layer}.{_NATIVE[rest]}"
        else:
            raise CheckpointError(weights_file, f"{module}: not a projection tramontane adapts "
                                                f"({', '.join(_NATIVE)}, Mixtral's experts)")
        if rest in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = args.n_heads if rest == "self_attn.q_proj" else args.n_kv_heads
            if b.dim() != 2 or b.shape[0] != heads * args.head_dim:
                raise CheckpointError(weights_file, f"{module}.lora_B has shape {list(b.shape)}, want "
                                                    f"[{heads * args.head_dim}, rank]")
            b = permute_hf_to_native(b, heads)
        out[native] = LoraWeights(a, b, _scaling(module, a.shape[0], r, alpha, rslora, rank_pattern, alpha_pattern))
    return out


def from_native(adapters: Mapping[str, LoraWeights], args: ModelArgs, config: LoraConfig,
                base_model: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`adapter_config.json`'s content and the tensors of `adapter_model.safetensors` for `adapters`."""
    modules: dict[str, LoraWeights] = {}  # HF module (or fused parameter) name -> its adapter, HF rows
    experts: dict[tuple[int, str], dict[int, dict[str, LoraWeights]]] = {}
    for native, w in adapters.items():
        _, layer, rest = native.split(".", 2)
        if rest.startswith("feed_forward.experts."):
            _, _, expert, proj = rest.split(".")
            param = "down_proj" if proj == "w2" else "gate_up_proj"
            experts.setdefault((int(layer), param), {}).setdefault(int(expert), {})[proj] = w
            continue
        b = w.b
        if rest in ("attention.wq", "attention.wk"):
            b = permute_native_to_hf(b, args.n_heads if rest == "attention.wq" else args.n_kv_heads)
        modules[f"model.layers.{layer}.{_MODULE[rest]}"] = LoraWeights(w.a, b, w.scaling)
    params: set[str] = set()
    for (layer_no, param), by_expert in sorted(experts.items()):
        modules[f"model.layers.{layer_no}.mlp.experts.{param}"] = _join_experts(param, by_expert, args, config.scaling)
        params.add(param)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, w in modules.items():
        rank = w.rank // args.moe.num_experts if args.moe and name.rpartition(".")[2] in params else w.rank
        if rank != config.rank or not math.isclose(w.scaling, config.scaling, rel_tol=1e-7):
            rank_pattern[re.escape(name)] = rank
            alpha_pattern[re.escape(name)] = w.scaling * rank
    tensors: dict[str, torch.Tensor] = {}
    nested = [p for p in _EXPERT_PARAMS if p in params]
    for name, w in modules.items():
        where = name
        if (param := name.rpartition(".")[2]) in nested:  # the wrapper of the first parameter sits innermost
            where = name.removesuffix("." + param) + ".base_layer" * (len(nested) - 1 - nested.index(param))
        tensors[f"{PREFIX}{where}.lora_A.weight"] = w.a
        tensors[f"{PREFIX}{where}.lora_B.weight"] = w.b
    targets = sorted({_MODULE[n.split(".", 2)[2]].rpartition(".")[2] for n in adapters if ".experts." not in n})
    peft_config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": targets,
        "target_parameters": [f"mlp.experts.{p}" for p in nested] or None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "lora_bias": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }
    return peft_config, tensors


def _read_config(config: Mapping[str, Any], file: Path) -> tuple[int, float, bool]:
    if config.get("peft_type") != "LORA":
        raise CheckpointError(file, f"peft_type: {config.get('peft_type')!r} is not LORA")
    for field, fine in _REFUSED.items():
        if config.get(field, fine) not in (fine, None):
            raise CheckpointError(file, f"{field}: {config[field]!r} is not supported (want {fine!r})")
    if config.get("modules_to_save"):
        raise CheckpointError(file, f"modules_to_save: {config['modules_to_save']!r} is not supported (an adapter "
                                    "that replaces whole modules)")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CheckpointError(file, f"r: want an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise CheckpointError(file, f"lora_alpha: want a number, got {alpha!r}")
    return r, float(alpha), bool(config.get("use_rslora", False))


def _pattern(patterns: Mapping[str, Any], name: str) -> Any | None:
    """PEFT's `get_pattern_key`: the value of the first pattern matching the end of `name`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _scaling(name: str, rank: int, r: int, alpha: float, rslora: bool, rank_pattern: Mapping[str, Any],
             alpha_pattern: Mapping[str, Any]) -> float:
    """PEFT's scaling for module `name`, whose tensors have rank `rank`."""
    del r  # the tensors' own rank is what `rank_pattern` or `r` gave them
    a = _pattern(alpha_pattern, name)
    a = alpha if a is None else float(a)
    return a / (math.sqrt(rank) if rslora else rank)


def _fused_targets(target_parameters: list[str]) -> list[str]:
    """The experts' parameters targeted, in nesting order (innermost first)."""
    named = {str(t).rpartition(".")[2] for t in target_parameters}
    return [p for p in _EXPERT_PARAMS if p in named]


def _experts(args: ModelArgs, file: Path, module: str) -> int:
    if args.moe is None:
        raise CheckpointError(file, f"{module}: an adapter for experts, but the model has none")
    return args.moe.num_experts


def _split_experts(layer: int, param: str, a: torch.Tensor, b: torch.Tensor, scaling: float, args: ModelArgs,
                   file: Path, module: str) -> dict[str, LoraWeights]:
    """Per-expert adapters from one of PEFT's 3-D parameter wrappers."""
    n = _experts(args, file, module)
    inp, out = (args.dim, 2 * args.hidden_dim) if param == "gate_up_proj" else (args.hidden_dim, args.dim)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != inp or b.shape[0] != out or a.shape[0] % n \
            or b.shape[1] != a.shape[0]:
        raise CheckpointError(file, f"{module} (experts.{param}): lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                                    f"want [{n} x rank, {inp}] and [{out}, rank x {n}]")
    rank = a.shape[0] // n
    a_e = a.view(n, rank, inp)  # expert-major rows
    b_e = b.view(out, rank, n).permute(2, 0, 1)  # expert-minor columns -> [n, out, rank]
    prefix = f"layers.{layer}.feed_forward.experts"
    got: dict[str, LoraWeights] = {}
    for e in range(n):
        if param == "down_proj":
            got[f"{prefix}.{e}.w2"] = LoraWeights(a_e[e].clone(), b_e[e].contiguous(), scaling)
        else:  # gate rows first: w1, then w3 (both read the shared lora_A)
            got[f"{prefix}.{e}.w1"] = LoraWeights(a_e[e].clone(), b_e[e, : args.hidden_dim].contiguous(), scaling)
            got[f"{prefix}.{e}.w3"] = LoraWeights(a_e[e].clone(), b_e[e, args.hidden_dim :].contiguous(), scaling)
    return got


def _join_experts(param: str, by_expert: Mapping[int, Mapping[str, LoraWeights]], args: ModelArgs,
                  scaling: float) -> LoraWeights:
    """One 3-D wrapper's adapter (lora_A [E * r, in], lora_B [out, r * E]) from per-expert ones, written with
    `scaling` (each expert's own folded into its lora_B)."""
    assert args.moe is not None  # experts exist
    n, hidden = args.moe.num_experts, args.hidden_dim
    parts = ("w2",) if param == "down_proj" else ("w1", "w3")
    held = {frozenset(ws) for ws in by_expert.values()}
    present = [p for p in parts if p in next(iter(held))]
    ranks = {p: {ws[p].rank for ws in by_expert.values()} for p in present}
    if len(by_expert) != n or len(held) != 1 or any(len(r) != 1 for r in ranks.values()):
        raise ValueError(f"adapters: PEFT adapts all experts of a layer alike ({param}); these differ per expert")
    rank = sum(r.pop() for r in ranks.values())
    inp, out = (args.dim, 2 * hidden) if param == "gate_up_proj" else (hidden, args.dim)
    a = torch.zeros(n, rank, inp)
    b = torch.zeros(n, out, rank)
    for e, ws in by_expert.items():
        col = 0
        for proj in present:
            w = ws[proj]
            rows = slice(0, hidden) if proj == "w1" else slice(hidden, 2 * hidden) if proj == "w3" else slice(0, out)
            a[e, col : col + w.rank] = w.a.float()
            b[e, rows, col : col + w.rank] = w.b.float() * (w.scaling / scaling)
            col += w.rank
    dtype = next(iter(next(iter(by_expert.values())).values())).a.dtype
    # lora_A expert-major [E * r, in]; lora_B [out, r, E] flattened expert-minor
    return LoraWeights(a.reshape(n * rank, inp).to(dtype), b.permute(1, 2, 0).reshape(out, rank * n).to(dtype), scaling)
