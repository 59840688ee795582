"""What every generated sequence goes through, in `generate.stream` and the server alike (both run the
`Engine`): the checks of a request before it runs, and `TokenLoop`, which decides per sampled token."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from ..model import Transformer
from ..sampling import Penalties


def check_language_model(model: Transformer) -> None:
    """Generating needs next-token logits, which a model with a task head does not give.

    Raises:
        ValueError: `model` has a classification or question-answering head, or none at all (a bare
            embedding model).
    """
    if model.args.bare:
        raise ValueError("model: it is a bare transformer (an embedding model) without a language-model head, so it "
                         "cannot generate text (use tramontane.embed, or serve it for /v1/embeddings)")
    if model.args.head is not None:
        raise ValueError(f"model: it has a {model.args.head.kind!r} task head instead of a language-model "
                         "output, so it cannot generate text (use `tramontane classify` or `tramontane answer`)")


def check_prompt(prompt: Sequence[int], name: str, vocab_size: int, max_tokens: int, context: int | None) -> None:
    """Raise ValueError, naming `name` or max_tokens first, when `prompt` plus `max_tokens` new tokens
    cannot be generated: an empty prompt, ids outside the vocabulary, or more than `context` positions
    (None: no limit, e.g. a model whose sliding window rolls). The one check of `stream` and the engine."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if len(prompt) == 0:
        raise ValueError(f"{name} is empty: a prompt needs at least one token (e.g. BOS)")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise ValueError(f"{name} holds token ids outside [0, {vocab_size})")
    if context is not None and len(prompt) + max_tokens > context:
        raise ValueError(f"max_tokens: a prompt of {len(prompt)} tokens plus max_tokens={max_tokens} exceeds "
                         f"the context of {context} tokens")


class TokenLoop:
    """What each sampled token of one sequence does in the engine: the one place where stop ids, penalties
    and the length limit end a sequence. (Stop strings are the consumer's, which sees the text: it cancels
    the request, as `generate.stream` and the server do.)

    Per token, `accept(token)` first (False: a stop id, which ends the sequence with 'stop' and is not
    output); then, once the token is out, `finish_reason(token)`: 'length' at `max_tokens`, else None.

    Example:
        >>> loop = TokenLoop(max_tokens=2, stop_ids={2})
        >>> loop.accept(7), loop.finish_reason(7), loop.accept(9), loop.finish_reason(9)
        (True, None, True, 'length')
    """

    def __init__(
        self,
        max_tokens: int,
        stop_ids: Collection[int] = (),
        penalties: Penalties | None = None,
    ) -> None:
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids
        self.penalties = penalties
        self.produced = 0

    def accept(self, token: int) -> bool:
        self.produced += 1
        return token not in self.stop_ids

    def finish_reason(self, token: int) -> str | None:
        if self.penalties is not None:
            self.penalties.record(token)
        return "length" if self.produced >= self.max_tokens else None
