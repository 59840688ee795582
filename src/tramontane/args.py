"""Model hyper-parameters: one dataclass, filled from `params.json`, `config.json` or GGUF metadata.

Example:
    >>> args = ModelArgs.from_params({"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128,
    ...     "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5, "vocab_size": 100})
    >>> args.rope_theta  # a params.json without rope_theta is an original v0.1 file
    10000.0
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Keys of a Hugging Face config.json that say nothing about the weights' shapes or maths.
_HF_IGNORED = {
    "architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "initializer_range", "attention_dropout", "output_router_logits",
    "router_aux_loss_coef", "router_jitter_noise", "pretraining_tp", "_name_or_path", "max_window_layers",
    "use_sliding_window", "is_llama_config", "rope_interleaved", "auto_map", "quantization_config",
    "hidden_act", "attention_bias", "mlp_bias", "rope_scaling", "rope_parameters", "rope_theta",
    "hidden_size", "num_hidden_layers", "head_dim", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "vocab_size", "sliding_window", "max_position_embeddings",
    "tie_word_embeddings", "num_local_experts", "num_experts_per_tok", "layer_types", "id2label", "label2id",
    "return_dict", "output_hidden_states", "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder",
    "tokenizer_class", "problem_type", "bad_words_ids", "num_beams", "temperature", "top_p", "top_k",
    "token_classification_bias", "classifier_dropout", "num_labels",
}
_HF_ARCHITECTURES = {"MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral", "LlamaForCausalLM": "llama"}
# transformers' task classes: family prefix + one of these suffixes, e.g. MistralForSequenceClassification
HEAD_KINDS = {"ForSequenceClassification": "sequence", "ForTokenClassification": "token",
              "ForQuestionAnswering": "qa"}
_PARAMS_IGNORED = {"max_batch_size", "model_type", "quantization", "lora", "vision_encoder", "_sliding_window"}


@dataclass
class MoeArgs:
    """Sparse mixture-of-experts shape: each token goes to `num_experts_per_tok` of `num_experts`."""

    num_experts: int
    num_experts_per_tok: int

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"moe: need 1 <= num_experts_per_tok <= num_experts, got "
                f"num_experts={self.num_experts}, num_experts_per_tok={self.num_experts_per_tok}"
            )


@dataclass
class HeadArgs:
    """A task head in place of the language-model output (transformers' `*For{Sequence,Token}Classification`
    and `*ForQuestionAnswering`): `kind` is "sequence", "token" or "qa".

    Sequence classification pools at the last token that is not `pad_token_id`; question answering has
    two outputs (start, end) whatever `num_labels` says. `bias` is whether the head's linear has one
    (transformers: no for sequence, yes for token classification and question answering).
    """

    kind: str
    num_labels: int
    id2label: dict[int, str] = field(default_factory=dict)
    pad_token_id: int | None = None
    bias: bool = False

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS.values():
            raise ValueError(f"head.kind must be one of {', '.join(HEAD_KINDS.values())}, got {self.kind!r}")
        if not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 1:
            raise ValueError(f"head.num_labels must be a positive integer, got {self.num_labels!r}")
        try:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        except (ValueError, AttributeError) as e:
            raise ValueError(f"head.id2label must map integer ids to names, got {self.id2label!r}") from e
        if self.kind != "qa" and self.id2label and sorted(self.id2label) != list(range(self.num_labels)):
            raise ValueError(f"head.id2label must name labels 0..{self.num_labels - 1}, got ids {sorted(self.id2label)}")
        if self.pad_token_id is not None and (not isinstance(self.pad_token_id, int) or self.pad_token_id < 0):
            raise ValueError(f"head.pad_token_id must be a non-negative integer or None, got {self.pad_token_id!r}")

    @property
    def n_outputs(self) -> int:
        """Width of the head's linear: 2 (start, end) for question answering, else num_labels."""
        return 2 if self.kind == "qa" else self.num_labels

    def label(self, index: int) -> str:
        return self.id2label.get(index, f"LABEL_{index}")


@dataclass
class ModelArgs:
    """Shape and maths of a Llama-shaped transformer (Mistral, Mixtral, Llama, SmolLM2, ...).

    `sliding_window=None` means full causal attention; `max_seq_len=None` means no context limit
    is known (a sliding-window model then serves any length). A `bare` model is the transformer alone,
    as transformers calls its `MistralModel` ("the bare Mistral Model outputting raw hidden-states"),
    which is how embedding models ship (e5-mistral-7b-instruct, SFR-Embedding-Mistral): it has no output
    layer, so it gives final hidden states (`Transformer.features`) and no logits.
    """

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    max_seq_len: int | None = None
    tied_embeddings: bool = False
    moe: MoeArgs | None = None
    head: HeadArgs | None = None  # a task head instead of the vocabulary output (see heads.py)
    bare: bool = False  # no output layer at all: hidden states only (embedding models)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive integer or None, got {self.max_seq_len!r}")
        if isinstance(self.moe, dict):
            self.moe = MoeArgs(**self.moe)
        if isinstance(self.head, dict):
            self.head = HeadArgs(**self.head)
        if self.head is not None and self.head.pad_token_id is not None and self.head.pad_token_id >= self.vocab_size:
            raise ValueError(f"head.pad_token_id {self.head.pad_token_id} is not below vocab_size {self.vocab_size}")
        if self.bare and (self.head is not None or self.tied_embeddings):
            raise ValueError("bare: a bare model has no output layer, so neither a task head nor tied_embeddings")

    # ------------------------------------------------------------------ native params.json
    @classmethod
    def from_params(cls, params: dict[str, Any], source: str | Path = "params.json") -> ModelArgs:
        """Build from the dict of a Mistral-native `params.json`."""
        required = ("dim", "n_layers", "hidden_dim", "n_heads", "norm_eps", "vocab_size")
        missing = [k for k in required if k not in params]
        if missing:
            raise ConfigError(source, f"missing required field(s) {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(params) - known - _PARAMS_IGNORED)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown field(s) {', '.join(unknown)}", stacklevel=2)
        dim, n_heads = _int(params, "dim", source), _int(params, "n_heads", source)
        head_dim = _opt_int(params, "head_dim", source)
        if head_dim is None:
            if dim % n_heads:
                raise ConfigError(source, f"dim ({dim}) is not a multiple of n_heads ({n_heads}) and no head_dim is given")
            head_dim = dim // n_heads
        moe = params.get("moe")
        try:
            return cls(
                dim=dim,
                n_layers=_int(params, "n_layers", source),
                head_dim=head_dim,
                hidden_dim=_int(params, "hidden_dim", source),
                n_heads=n_heads,
                n_kv_heads=_opt_int(params, "n_kv_heads", source) or n_heads,
                norm_eps=_float(params, "norm_eps", source),
                vocab_size=_int(params, "vocab_size", source),
                # The original Mistral 7B v0.1 params.json has no rope_theta: it means 1e4, not 1e6.
                rope_theta=_opt_float(params, "rope_theta", source) or 10000.0,
                sliding_window=_opt_int(params, "sliding_window", source),
                max_seq_len=_opt_int(params, "max_seq_len", source),
                tied_embeddings=_bool(params, "tied_embeddings", source),
                moe=MoeArgs(**_moe_fields(moe, source)) if moe else None,
                head=_head_fields(params["head"], source) if params.get("head") else None,
                bare=_bool(params, "bare", source),
                extra={k: params[k] for k in _PARAMS_IGNORED if k in params},
            )
        except (ValueError, TypeError) as e:
            raise ConfigError(source, str(e)) from e

    @classmethod
    def from_params_json(cls, path: str | Path) -> ModelArgs:
        return cls.from_params(_read_json(path), path)

    def to_params(self) -> dict[str, Any]:
        """The dict to write as a native `params.json`."""
        out: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim, "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
        }
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        if self.max_seq_len is not None:
            out["max_seq_len"] = self.max_seq_len
        if self.tied_embeddings:
            out["tied_embeddings"] = True
        if self.moe is not None:
            out["moe"] = dataclasses.asdict(self.moe)
        if self.head is not None:
            out["head"] = dataclasses.asdict(self.head)
        if self.bare:
            out["bare"] = True
        return out

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str | Path = "config.json") -> ModelArgs:
        """Build from the dict of a Hugging Face `config.json` (Mistral, Mixtral or Llama)."""
        archs = config.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(source, f"architectures must be a list of class names, got {archs!r}")
        head = _hf_head(config, source)
        if head is not None:  # the same families as their causal-LM classes
            archs = [a.replace(suffix, "ForCausalLM") for a in archs for suffix in HEAD_KINDS if a.endswith(suffix)]
        # transformers' bare classes (MistralModel, ...): the body of a causal LM, without its lm_head
        bare = head is None and any(a.endswith("Model") and _causal_of(a) in _HF_ARCHITECTURES for a in archs)
        if bare:
            archs = [_causal_of(a) for a in archs]
        family = next((_HF_ARCHITECTURES[a] for a in archs if a in _HF_ARCHITECTURES), None)
        if family is None and isinstance(config.get("model_type"), str) and config["model_type"] in _HF_ARCHITECTURES.values():
            family = config["model_type"]
        if family is None:
            raise ConfigError(
                source,
                f"unsupported architecture {archs or config.get('model_type')!r}; "
                f"supported: {', '.join(_HF_ARCHITECTURES)}",
            )
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"):
            if key not in config:
                raise ConfigError(source, f"missing required field {key}")
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(source, f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
        for key in ("attention_bias", "mlp_bias"):
            if config.get(key):
                raise ConfigError(source, f"{key}=true is not supported (Llama-shaped models have no biases)")
        rope = _dict(config, "rope_parameters", source)
        scaling = _dict(config, "rope_scaling", source) or rope
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(source, f"rope scaling {rope_type!r} is not supported")
        theta = _opt_float(config, "rope_theta", source) or _opt_float(
            rope, "rope_theta", source, where="rope_parameters.") or 10000.0
        unknown = sorted(set(config) - _HF_IGNORED)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown field(s) {', '.join(unknown)}", stacklevel=2)
        dim, n_heads = _int(config, "hidden_size", source), _int(config, "num_attention_heads", source)
        head_dim = _opt_int(config, "head_dim", source)
        if head_dim is None:
            if dim % n_heads:
                raise ConfigError(
                    source, f"hidden_size ({dim}) is not a multiple of num_attention_heads ({n_heads}) and no "
                    "head_dim is given"
                )
            head_dim = dim // n_heads
        window = _opt_int(config, "sliding_window", source) if family != "llama" else None
        if config.get("use_sliding_window") is False and family != "mistral":
            window = None
        moe = None
        experts = _opt_int(config, "num_local_experts", source)
        if family == "mixtral" or experts is not None:
            used = _opt_int(config, "num_experts_per_tok", source)
            moe = (8 if experts is None else experts, 2 if used is None else used)
        try:
            return cls(
                dim=dim,
                n_layers=_int(config, "num_hidden_layers", source),
                head_dim=head_dim,
                hidden_dim=_int(config, "intermediate_size", source),
                n_heads=n_heads,
                n_kv_heads=_opt_int(config, "num_key_value_heads", source) or n_heads,
                norm_eps=_opt_float(config, "rms_norm_eps", source) or 1e-6,
                vocab_size=_int(config, "vocab_size", source),
                rope_theta=theta,
                sliding_window=window,
                max_seq_len=_opt_int(config, "max_position_embeddings", source),
                # a bare model has no head to tie (transformers' configs may still say true)
                tied_embeddings=_bool(config, "tie_word_embeddings", source) and not bare,
                moe=MoeArgs(*moe) if moe else None,
                head=head,
                bare=bare,
            )
        except (ValueError, TypeError) as e:
            raise ConfigError(source, str(e)) from e

    @classmethod
    def from_hf_config_json(cls, path: str | Path) -> ModelArgs:
        return cls.from_hf_config(_read_json(path), path)

    def to_hf_config(self) -> dict[str, Any]:
        """The dict to write as a Hugging Face `config.json` that transformers loads unchanged."""
        if self.moe is not None:
            arch, model_type = "MixtralForCausalLM", "mixtral"
        elif self.tied_embeddings and self.sliding_window is None:
            arch, model_type = "LlamaForCausalLM", "llama"
        else:
            arch, model_type = "MistralForCausalLM", "mistral"
        out: dict[str, Any] = {
            "architectures": [arch], "model_type": model_type, "hidden_act": "silu",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "rms_norm_eps": self.norm_eps, "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_seq_len or 32768,
            "tie_word_embeddings": self.tied_embeddings,
        }
        if model_type != "llama":
            out["sliding_window"] = self.sliding_window
        if self.moe is not None:
            out["num_local_experts"] = self.moe.num_experts
            out["num_experts_per_tok"] = self.moe.num_experts_per_tok
        if self.bare:
            out["architectures"] = [arch.removesuffix("ForCausalLM") + "Model"]
        if self.head is not None:
            suffix = next(s for s, kind in HEAD_KINDS.items() if kind == self.head.kind)
            out["architectures"] = [arch.replace("ForCausalLM", suffix)]
            labels = {i: self.head.label(i) for i in range(self.head.num_labels)}
            out.update(id2label=labels, label2id={v: k for k, v in labels.items()}, pad_token_id=self.head.pad_token_id)
            if self.head.kind == "token":
                out["token_classification_bias"] = self.head.bias
        return out

    @property
    def n_params(self) -> int:
        """Number of weights (embeddings counted once when tied)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        if self.moe is not None:
            ffn = ffn * self.moe.num_experts + self.dim * self.moe.num_experts
        per_layer = attn + ffn + 2 * self.dim
        heads = self.vocab_size * self.dim * (1 if self.tied_embeddings or self.head or self.bare else 2)
        if self.head is not None:
            heads += self.head.n_outputs * (self.dim + self.head.bias)
        return self.n_layers * per_layer + heads + self.dim


def _causal_of(arch: str) -> str:
    """The causal-LM class of transformers' bare class `arch` (MistralModel -> MistralForCausalLM)."""
    return arch.removesuffix("Model") + "ForCausalLM" if arch.endswith("Model") else arch


def _moe_fields(moe: Any, source: str | Path) -> dict[str, int]:
    if not isinstance(moe, dict) or "num_experts" not in moe or "num_experts_per_tok" not in moe:
        raise ConfigError(source, f"moe must hold num_experts and num_experts_per_tok, got {moe!r}")
    return {key: _int(moe, key, source, where="moe.") for key in ("num_experts", "num_experts_per_tok")}


# Field readers for params.json / config.json: each value's type and sign checked before any arithmetic,
# the error naming the field (`where` is the path of the dict inside the file, e.g. "moe.").
def _int(data: dict[str, Any], key: str, source: str | Path, where: str = "") -> int:
    value = _opt_int(data, key, source, where)
    if value is None:
        raise ConfigError(source, f"missing required field {where}{key}")
    return value


def _opt_int(data: dict[str, Any], key: str, source: str | Path, where: str = "") -> int | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(source, f"{where}{key} must be a positive integer, got {value!r}")
    return value


def _float(data: dict[str, Any], key: str, source: str | Path, where: str = "") -> float:
    value = _opt_float(data, key, source, where)
    if value is None:
        raise ConfigError(source, f"missing required field {where}{key}")
    return value


def _opt_float(data: dict[str, Any], key: str, source: str | Path, where: str = "") -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise ConfigError(source, f"{where}{key} must be a positive number, got {value!r}")
    return float(value)


def _bool(data: dict[str, Any], key: str, source: str | Path) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(source, f"{key} must be true or false, got {value!r}")
    return value


def _dict(data: dict[str, Any], key: str, source: str | Path) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(source, f"{key} must be a JSON object, got {value!r}")
    return value


def _head_fields(head: Any, source: str | Path) -> HeadArgs:
    if not isinstance(head, dict) or "kind" not in head or "num_labels" not in head:
        raise ConfigError(source, f"head must hold kind and num_labels, got {head!r}")
    unknown = sorted(set(head) - {f.name for f in dataclasses.fields(HeadArgs)})
    if unknown:
        raise ConfigError(source, f"head: unknown field(s) {', '.join(unknown)}")
    return HeadArgs(**head)


def _hf_head(config: dict[str, Any], source: str | Path) -> HeadArgs | None:
    """The task head a transformers config.json names in `architectures`, or None for a causal LM."""
    kinds = [kind for a in config.get("architectures") or [] for suffix, kind in HEAD_KINDS.items()
             if a.endswith(suffix)]
    if not kinds:
        return None
    id2label = config.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise ConfigError(source, f"id2label must be an object, got {id2label!r}")
    # transformers writes num_labels only through id2label (2 labels when it has none)
    num_labels = len(id2label) if id2label else int(config.get("num_labels", 2))
    bias = {"sequence": False, "qa": True}.get(kinds[0], bool(config.get("token_classification_bias", True)))
    try:
        return HeadArgs(kinds[0], num_labels, id2label, config.get("pad_token_id"), bias)
    except ValueError as e:
        raise ConfigError(source, str(e)) from e


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(path, f"invalid JSON: not UTF-8 ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(path, f"invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(path, "expected a JSON object at the top level")
    return data


def _mistral_7b(**changes: Any) -> ModelArgs:
    base = ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                     norm_eps=1e-5, vocab_size=32000, rope_theta=1e4, sliding_window=4096, max_seq_len=32768)
    return dataclasses.replace(base, **changes)


def _mistral_22b(**changes: Any) -> ModelArgs:
    base = ModelArgs(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8,
                     norm_eps=1e-5, vocab_size=32768, rope_theta=1e6, max_seq_len=32768)
    return dataclasses.replace(base, **changes)


PRESETS: dict[str, ModelArgs] = {
    "mistral-7b-v0.1": _mistral_7b(),
    "mistral-7b-v0.2": _mistral_7b(rope_theta=1e6, sliding_window=None),
    "mistral-7b-v0.3": _mistral_7b(rope_theta=1e6, sliding_window=None, vocab_size=32768),
    "mixtral-8x7b": _mistral_7b(rope_theta=1e6, sliding_window=None, moe=MoeArgs(8, 2)),
    "mixtral-8x22b": _mistral_22b(max_seq_len=65536, moe=MoeArgs(8, 2)),
    "codestral-22b": _mistral_22b(),
}


def preset(name: str) -> ModelArgs:
    """The published shape called `name` (see `PRESETS`); a fresh copy each call."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
