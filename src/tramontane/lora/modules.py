"""LoRA adapters: a low-rank update beside a frozen linear, y = base(x) + B(A(dropout(x))) * alpha / rank.

`apply_lora` swaps the target projections of a model for `LoraLinear` modules, in place. The base can be
any linear the model holds (float, int8, int4, a GGUF block format): it stays frozen, so a quantized base
with full-precision adapters is QLoRA. Parameter names are those of PEFT and mistral-finetune under the
projection's own name: `layers.0.attention.wq.lora_A.weight` [rank, in], `...lora_B.weight` [out, rank].
As in PEFT, A starts Kaiming-uniform and B at zero, so a fresh adapter leaves the model's outputs unchanged.

Example:
    >>> model = apply_lora(load_model(path), LoraConfig(rank=16, alpha=32))
    >>> trainable = [p for p in model.parameters() if p.requires_grad]  # the adapters only
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..fuse import unfuse_projections
from ..layers import Attention, FeedForward
from ..model import Transformer

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoraConfig:
    """Which projections get adapters and their shape. `alpha / rank` scales the update (PEFT's
    `lora_alpha / r`)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank: need at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout: need 0 <= dropout < 1, got {self.dropout}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"lora targets: {unknown or 'none given'}; choose from {', '.join(TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen `base` linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        in_features, out_features = cast(int, base.in_features), cast(int, base.out_features)
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.scaling = config.scaling
        where = next(iter([*base.parameters(), *base.buffers()])).device
        self.lora_A = nn.Linear(in_features, config.rank, bias=False, device=where)
        self.lora_B = nn.Linear(config.rank, out_features, bias=False, device=where)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # [..., rank]
        y = self.base(x)
        if y.dtype == low.dtype:  # one addmm: B's product, the scaling and the sum in a single pass
            flat = torch.addmm(y.reshape(-1, self.out_features), low.reshape(-1, low.shape[-1]),
                               self.lora_B.weight.t(), alpha=self.scaling)
            return flat.view(y.shape)
        return y + (self.lora_B(low) * self.scaling).to(x.dtype)


class FrozenLinear(nn.Linear):
    """A frozen linear stored, and multiplied, in its own dtype (bf16) that hands back its input's dtype
    (fp32): the adapters, norms and residual stream around it keep full precision."""

    @classmethod
    def of(cls, weight: torch.Tensor, dtype: torch.dtype) -> FrozenLinear:
        layer = cls(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def lower_frozen(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Store the big frozen products of a LoRA model in `dtype`, in place: every adapter's float base and
    the output head (a tied head gets its own copy; the embedding lookup keeps the table as it is).
    Their weights and inputs are rounded to `dtype`; everything that trains, and the sums, stay in
    the model's dtype. This is how the trainer uses fast bf16 products (AMX, Zen 4) where the kernel
    policy measured them faster than fp32; benchmarks/finetune.py compares the speed and the loss curve
    with fp32's.
    """
    for module in model.modules():
        if isinstance(module, LoraLinear) and isinstance(module.base, nn.Linear):  # FastLinear too
            module.base = FrozenLinear.of(module.base.weight, dtype)
    head = frozen_head(model)
    if head is not None:
        model.output = FrozenLinear.of(head, dtype)
    return model


def frozen_head(model: Transformer) -> torch.Tensor | None:
    """The language-model head's weight [vocab, dim] when it is a frozen float matrix: a bias-free
    `nn.Linear` (FrozenLinear and FastLinear too) or the tied embedding table; else None (a head that
    trains, a quantized head, a task head)."""
    if model.args.head is not None:
        return None
    head = model.output
    if head is None:
        weight = model.tok_embeddings.weight
    elif isinstance(head, nn.Linear) and head.bias is None:
        weight = head.weight
    else:
        return None
    return weight if weight.is_floating_point() and not weight.requires_grad else None


def merge_update(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """weight + b @ a * scaling ([out, in] + [out, rank] @ [rank, in]), computed in fp32 and stored in the
    weight's dtype and device."""
    delta = (b.float() @ a.float()) * scaling  # [out, in]
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def lora_slots(model: Transformer, targets: tuple[str, ...] = TARGETS) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every target projection in the blocks (experts
    included), in the model's order."""
    slots: list[tuple[str, nn.Module, str]] = []
    for qualified, module in model.named_modules():
        if isinstance(module, Attention | FeedForward):
            for name in targets:
                if module._modules.get(name) is not None:
                    slots.append((f"{qualified}.{name}", module, name))
    return slots


def apply_lora(model: Transformer, config: LoraConfig) -> Transformer:
    """Freeze every weight of `model` and give each target projection an adapter, in place.

    Fused projections (wqkv, w13) are split back first: each projection has its own adapter.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    unfuse_projections(model)
    for _, parent, name in lora_slots(model, config.targets):
        setattr(parent, name, LoraLinear(getattr(parent, name), config))
    return model


@dataclass(frozen=True)
class LoraWeights:
    """One projection's adapter as a file holds it, in native row order: the update is `b @ a * scaling`."""

    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank]
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def attach_lora(model: Transformer, adapters: Mapping[str, LoraWeights]) -> Transformer:
    """Freeze `model` and give each projection named in `adapters` (`layers.0.attention.wq`) a LoraLinear
    holding those weights (each with its own rank and scaling), in place.

    Raises:
        ValueError: a name is not a projection of the model, or its weights do not fit it.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    unfuse_projections(model)
    slots = {qualified: (parent, name) for qualified, parent, name in lora_slots(model)}
    for qualified, w in adapters.items():
        if qualified not in slots:
            raise ValueError(f"{qualified}: not a projection of this model (choose a layer's {', '.join(TARGETS)})")
        parent, name = slots[qualified]
        base = getattr(parent, name)
        if isinstance(base, LoraLinear):
            raise ValueError(f"{qualified}: already has an adapter")
        want_a, want_b = (w.rank, base.in_features), (base.out_features, w.rank)
        if tuple(w.a.shape) != want_a or tuple(w.b.shape) != want_b:
            raise ValueError(f"{qualified}: adapter shapes {tuple(w.a.shape)} and {tuple(w.b.shape)}, the model "
                             f"wants {want_a} and {want_b}")
        # alpha chosen so that alpha / rank is the file's scaling (PEFT's rsLoRA included)
        lora = LoraLinear(base, LoraConfig(rank=w.rank, alpha=w.scaling * w.rank))
        lora.scaling = w.scaling
        with torch.no_grad():
            lora.lora_A.weight.copy_(w.a)
            lora.lora_B.weight.copy_(w.b)
        setattr(parent, name, lora)
    return model


def lora_weights(model: Transformer) -> dict[str, LoraWeights]:
    """Every adapter of `model` by projection name (`layers.0.attention.wq`): what the adapter files hold."""
    return {qualified: LoraWeights(m.lora_A.weight.detach(), m.lora_B.weight.detach(), m.scaling)
            for qualified, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapters' weights under their native names (`layers.0.attention.wq.lora_A.weight`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its float base weight and drop the LoraLinear wrappers, in place.

    Raises:
        ValueError: a base is quantized (its weight cannot hold the update without requantizing).
    """
    for qualified, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, LoraLinear):
                continue
            base = child.base
            if not isinstance(base, nn.Linear):
                raise ValueError(f"{qualified}.{name}: cannot merge an adapter into a {type(base).__name__} "
                                 "base; load the base model in floats (dequantize) to merge")
            with torch.no_grad():
                merged = merge_update(base.weight, child.lora_A.weight, child.lora_B.weight, child.scaling)
            base.weight = nn.Parameter(merged, requires_grad=False)
            setattr(module, name, base)
    return model
