"""Task heads on the same transformer: sequence classification, token classification, question answering.

A `TaskModel` is a `Transformer` (same blocks, same parameter names, same loading) whose vocabulary
output is replaced by one linear `head` of `ModelArgs.head.n_outputs` columns, read the way
transformers' `MistralForSequenceClassification`, `...ForTokenClassification` and
`...ForQuestionAnswering` read theirs.

Example:
    >>> model = load_model("my-sentiment-model/")        # config.json: MistralForSequenceClassification
    >>> logits = model(tokens)                           # [B, num_labels], at each row's last non-pad token
    >>> model.args.head.label(int(logits[0].argmax()))
    'positive'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .args import HeadArgs, ModelArgs
from .model import Transformer

HeadOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class TaskModel(Transformer):
    """A Transformer with a task head (see `HeadArgs`) instead of the language-model output."""

    def __init__(self, args: ModelArgs) -> None:
        if args.head is None:
            raise ValueError("TaskModel needs args.head (a HeadArgs); use Transformer for a language model")
        super().__init__(args)
        self.head = nn.Linear(args.dim, args.head.n_outputs, bias=args.head.bias)

    @property
    def task(self) -> HeadArgs:
        assert self.args.head is not None  # checked in __init__
        return self.args.head

    def forward(  # type: ignore[override]  # a task model answers labels, not vocabulary logits
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> HeadOutput:
        """The head's fp32 logits for `tokens` [B, T]: [B, num_labels] ("sequence"), [B, T, num_labels]
        ("token") or (start_logits, end_logits), each [B, T] ("qa").

        `attention_mask` [B, T] (1 = token, 0 = padding), as transformers takes it: padding is then
        invisible to every token, and positions stay the indices 0..T-1. Outputs at padding positions
        are 0. Without it every token is attended to. Sequence classification pools at the last token
        that is not `pad_token_id`, whatever the mask says, as transformers does.

        Raises:
            ValueError: `attention_mask` does not match `tokens`, or a batch of several sequences for
                sequence classification without a `pad_token_id` in the config.
        """
        h = self.hidden(tokens, attention_mask)
        logits = self.head(h).float()
        if attention_mask is not None:
            logits = logits * attention_mask[..., None].to(logits.dtype)
        if self.task.kind == "token":
            return logits
        if self.task.kind == "qa":
            start, end = logits.unbind(-1)
            return start.contiguous(), end.contiguous()
        return logits[torch.arange(tokens.shape[0], device=logits.device), last_token(tokens, self.task.pad_token_id)]

    def hidden(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, dim]; rows with padding run on their own, at their tokens' positions,
        so that the model's own position rule (cache/meta.py) masks what lies between."""
        if attention_mask is None or bool(attention_mask.bool().all()):
            return self.features(tokens)
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match tokens {tuple(tokens.shape)}")
        B, T = tokens.shape
        out = torch.zeros(B, T, self.args.dim, dtype=self.dtype, device=tokens.device)
        for b in range(B):
            index = attention_mask[b].nonzero().flatten()  # [n] the row's real tokens
            if index.numel():
                out[b, index] = self.features(tokens[b, index][None], positions=index[None])[0]
        return out


@dataclass
class Prediction:
    """The most likely label, its probability, and every label's probability (softmax of the logits)."""

    label: str
    score: float
    scores: dict[str, float]


def classify(model: TaskModel, ids: Sequence[int]) -> list[Prediction]:
    """Label one tokenized text: a single Prediction for a sequence-classification head, one per token
    for token classification.

    Example:
        >>> classify(model, tokenizer.encode("What a lovely day"))[0].label
        'positive'

    Raises:
        ValueError: `model` has a question-answering head (it predicts spans, not labels), or `ids` is empty.
    """
    if model.task.kind == "qa":
        raise ValueError("model: a question-answering head predicts answer spans, not labels")
    if not ids:
        raise ValueError("ids: nothing to classify (no tokens)")
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)], device=model.device))
    assert isinstance(logits, torch.Tensor)  # not qa
    probs = torch.softmax(logits.reshape(-1, model.task.num_labels), dim=-1)  # [1 or T, num_labels]
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append(Prediction(model.task.label(best), row[best], {model.task.label(i): p for i, p in enumerate(row)}))
    return out


@dataclass
class Answer:
    """The best answer span of a context: its tokens context[start:end + 1], and the probability of that
    start times that of that end (each a softmax over the context's positions)."""

    start: int
    end: int
    score: float


def answer(model: TaskModel, question: Sequence[int], context: Sequence[int], max_answer_tokens: int = 30) -> Answer:
    """The span of `context` that answers `question`, read by a question-answering head from the tokens
    question + context, the way transformers' question-answering pipeline picks one: the start s and end
    e (s <= e < s + max_answer_tokens, both inside the context) of highest start_logit[s] + end_logit[e].

    Example:
        >>> span = answer(model, tok.encode("Who wrote it?"), tok.encode("It was written by Ada.", bos=False))
        >>> tok.decode(context[span.start:span.end + 1])

    Raises:
        ValueError: `model` has no question-answering head, the context is empty, or
            max_answer_tokens < 1.
    """
    if model.task.kind != "qa":
        raise ValueError(f"model: a {model.task.kind!r} head labels text; answering needs a question-answering head")
    if not context:
        raise ValueError("context: no tokens to find an answer in")
    if max_answer_tokens < 1:
        raise ValueError(f"max_answer_tokens: need at least 1, got {max_answer_tokens}")
    with torch.no_grad():
        out = model(torch.tensor([[*question, *context]], device=model.device))
    assert isinstance(out, tuple)  # a qa head
    offset = len(question)
    start, end = (torch.log_softmax(t[0, offset:].float(), dim=-1) for t in out)  # [C] over context positions
    scores = start[:, None] + end[None, :]  # [C, C]: span (s, e)
    C = len(context)
    s_idx, e_idx = torch.arange(C)[:, None], torch.arange(C)[None, :]
    allowed = (e_idx >= s_idx) & (e_idx < s_idx + max_answer_tokens)
    best = int(scores.masked_fill(~allowed, float("-inf")).flatten().argmax())
    s, e = divmod(best, C)
    return Answer(s, e, float(scores[s, e].exp()))


def last_token(tokens: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Index [B] of each row's rightmost token that is not `pad_token_id` (left or right padding);
    the last index without a pad id, which transformers allows for one sequence only."""
    B, T = tokens.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError("pad_token_id: the config sets none, so only one sequence at a time can be classified")
        return torch.full((1,), T - 1, dtype=torch.long, device=tokens.device)
    not_pad = (tokens != pad_token_id).long()
    return (torch.arange(T, device=tokens.device) * not_pad).argmax(-1)


def model_for(args: ModelArgs) -> Transformer:
    """The module a checkpoint of `args` fills: a TaskModel when it has a head, else a Transformer."""
    return TaskModel(args) if args.head is not None else Transformer(args)
