"""Request bodies of the OpenAI-compatible API, as pydantic models: the HTTP edge and nowhere else.

Field ranges follow OpenAI's API reference (temperature in [0, 2], penalties in [-2, 2], ...), and
types are strict as OpenAI's are (`"max_tokens": "10"`, `"n": "2"`, `"stream": "yes"` are refused, an
integer is accepted where a number is), so a value OpenAI rejects is rejected here too, with a 400
naming the field. `top_k`, `min_p` and `repetition_penalty` are extensions, as in other
OpenAI-compatible servers; `random_seed`, `safe_prompt`, `prediction` and `tool_choice: "any"` are
Mistral's. A null field is a field left out (clients that send every field send nulls), as OpenAI and
Mistral read it. Every field of Mistral's chat and FIM requests is declared: those that ask for nothing
this server cannot give are accepted (`metadata`, `prompt_cache_key`), the others are refused by name
unless they ask for nothing (`ChatCompletionRequest.unserved`). Other unknown fields are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..sampling import SamplingParams

# OpenAI's default temperature and top_p are 1: sampling, not greedy decoding.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_N = 128  # choices per request
MAX_STOP_STRINGS = 16  # OpenAI allows 4; other servers more: enough for both, and bounded
MAX_STOP_CHARS = 1024  # characters per stop string; the engine matches each against every step's text

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class GenerationFields(BaseModel):
    """What completions and chat completions share: the model, sampling, stop conditions, streaming."""

    model_config = STRICT

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    random_seed: int | None = Field(None, ge=0, lt=2**63)  # Mistral's name for seed
    min_tokens: int | None = Field(None, ge=0)  # Mistral's; only 0 is served
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    safety_identifier: str | None = None  # OpenAI's newer `user`: an end user's id, for the caller's records
    metadata: dict[str, Any] | None = None  # the caller's tags for its own records: accepted, kept nowhere
    prompt_cache_key: str | None = None  # the prefix cache needs no key: prompts that share a prefix share it
    speculative: bool | None = None  # tramontane's: false decodes this request without the server's speculation

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data: Any) -> Any:
        """`"n": null` is `n` left out (its default), as OpenAI and Mistral read it."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def sampling_params(self) -> SamplingParams:
        """The engine's sampling parameters; raises ValueError naming a field if a combination is invalid."""
        return SamplingParams(
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self._logit_bias(),
        )

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        """OpenAI's `{"token id": bias}` as (id, bias) pairs; raises ValueError naming logit_bias."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias: keys must be token ids, got {key!r}")
            pairs.append((int(key), float(bias)))
        return tuple(sorted(pairs))

    def sampling_seed(self) -> int | None:
        """`seed` or Mistral's `random_seed`; raises ValueError naming random_seed if both are given and differ."""
        if self.seed is not None and self.random_seed is not None and self.seed != self.random_seed:
            raise ValueError(f"random_seed: {self.random_seed} disagrees with seed: {self.seed}; give one of them")
        return self.seed if self.seed is not None else self.random_seed

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class Prediction(BaseModel):
    """The text an answer is expected to be close to (OpenAI's and Mistral's predicted outputs). It may only
    make an answer faster, never different: the answer here is the one without it, at the usual speed."""

    model_config = STRICT

    type: Literal["content"]
    content: str | list[dict[str, Any]]


class CompletionRequest(GenerationFields):
    """`POST /v1/completions`. `prompt` is a text, a list of texts, token ids, or a list of token-id lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None


class ChatCompletionRequest(GenerationFields):
    """`POST /v1/chat/completions`. Messages are OpenAI message dicts; the tokenizer checks them."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required", "any"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    safe_prompt: bool = False  # Mistral's: its safety prompt before the conversation
    prediction: Prediction | None = None
    # refused unless they ask for nothing (`unserved`)
    reasoning_effort: str | None = None
    prompt_mode: str | None = None  # Mistral's: "reasoning", its reasoning system prompt
    guardrails: list[dict[str, Any]] | None = None  # Mistral's: moderation of the request and the answer
    prompt_logprobs: bool | None = None  # Mistral's
    top_prompt_logprobs: int | None = Field(None, ge=0)  # Mistral's
    service_tier: str | None = None
    # OpenAI's, beyond text generation
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None  # the deprecated form of `tools`
    function_call: str | dict[str, Any] | None = None  # the deprecated form of `tool_choice`
    verbosity: str | None = None
    store: bool | None = None

    def unserved(self) -> tuple[str, str] | None:
        """(field, message naming it) of the first field that asks for what this server cannot give; None if
        none does. A value that asks for nothing is served: reasoning effort "none", no guardrails, prompt
        logprobs false, the one tier there is ("auto", OpenAI's "default", Mistral's "standard_only")."""
        refusals = [
            (self.reasoning_effort not in (None, "none"), "reasoning_effort",
             "this server's models do not reason; leave it out, null or 'none'"),
            (self.prompt_mode is not None, "prompt_mode",
             f"{self.prompt_mode!r}: this server has no reasoning mode or prompt modes; leave it out or null"),
            (bool(self.guardrails), "guardrails",
             "this server runs no moderation model, so it cannot apply guardrails; leave it out or empty"),
            (bool(self.prompt_logprobs), "prompt_logprobs",
             "log probabilities of prompt tokens are not computed; leave it out or false"),
            (bool(self.top_prompt_logprobs), "top_prompt_logprobs",
             "log probabilities of prompt tokens are not computed; leave it out, null or 0"),
            (self.service_tier not in (None, "auto", "default", "standard_only"), "service_tier",
             f"{self.service_tier!r}: this server has one tier; leave it out, 'auto', 'default' or 'standard_only'"),
            (self.modalities not in (None, ["text"]), "modalities",
             f"{self.modalities!r}: this server answers in text only; leave it out or ['text']"),
            (self.audio is not None, "audio", "this server answers in text only; leave it out"),
            (self.web_search_options is not None, "web_search_options", "this server does not search the web"),
            (self.functions is not None, "functions", "the deprecated form of tools: send `tools` instead"),
            (self.function_call is not None, "function_call",
             "the deprecated form of tool_choice: send `tool_choice` instead"),
            (self.verbosity not in (None, "medium"), "verbosity",
             f"{self.verbosity!r}: the answer's length is set by max_tokens and the prompt; leave it out or 'medium'"),
            (bool(self.store), "store", "this server keeps no completions; leave it out or false"),
        ]
        return next(((param, f"{param}: {why}") for refused, param, why in refusals if refused), None)

    @field_validator("tool_choice")
    @classmethod
    def _any_is_required(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        return "required" if choice == "any" else choice  # Mistral's word for OpenAI's "required"


class FIMCompletionRequest(GenerationFields):
    """Mistral's `POST /v1/fim/completions`: what comes between `prompt` (the code before) and `suffix`."""

    prompt: str
    suffix: str | None = None


class TokenizeRequest(BaseModel):
    """`POST /tokenize`: a text (`prompt`) or a conversation (`messages`, formatted by the chat template)."""

    model_config = STRICT

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    """`POST /detokenize`: token ids back to text."""

    model_config = STRICT

    model: str | None = None
    tokens: list[int]
