"""Sampling: pure functions over logits, with an explicit `torch.Generator` for reproducibility.

Order of operations for one sequence: logit bias, repetition/presence/frequency penalties,
temperature, top-k, top-p, min-p, then a draw. Temperature 0 is greedy (argmax of the penalised logits).
A batch is sampled in one pass (`sample_rows`): the filters are tensor operations over all its rows, and
each row draws with one uniform of its own generator, so what a seeded row draws does not depend on
the rows beside it.

Example:
    >>> params = SamplingParams(temperature=0.7, top_p=0.9)
    >>> token = sample_one(logits, params, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), OpenAI's range

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for token, bias in self.logit_bias:
            if token < 0:
                raise ValueError(f"logit_bias: token ids must be >= 0, got {token}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: the bias of token {token} must lie in [-100, 100], got {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy on the model's logits as they are: no penalty, no bias."""
        return self.greedy and not self.penalised and not self.logit_bias


def apply_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """logits [V] with each (token, value) of `bias` added to the token's logit."""
    tokens = torch.tensor([t for t, _ in bias], device=logits.device)
    values = torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, tokens, values)


def apply_penalties(
    logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """Penalise logits [V] given `seen` [V] (bool: in the prompt or output) and output `counts` [V].

    Repetition penalty (CTRL-style) applies to every token seen, prompt included: positive logits are
    divided by it, negative ones multiplied. Presence and frequency penalties (OpenAI-style) apply to
    generated tokens only: minus `presence` once, minus `frequency` per occurrence.
    """
    out = logits
    if params.repetition_penalty != 1:
        penalised = torch.where(out > 0, out / params.repetition_penalty, out * params.repetition_penalty)
        out = torch.where(seen, penalised, out)
    if params.presence_penalty or params.frequency_penalty:
        c = counts.to(out.dtype)
        out = out - params.presence_penalty * (c > 0).to(out.dtype) - params.frequency_penalty * c
    return out


# Top-p looks for each row's nucleus among its this many most likely tokens first (a partial sort, much
# cheaper than sorting a whole vocabulary); a row whose nucleus holds more is sorted whole.
CANDIDATES = 256


def sampling_weights(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, row by row of logits [S, V] (every row sampled, none
    greedy), in one pass over the batch: each row's probabilities [S, V], 0 where a filter drops the
    token, not renormalised (`draw` takes them as they are)."""
    V = logits.shape[1]
    column = functools.partial(torch.tensor, dtype=logits.dtype, device=logits.device)
    out = logits / column([p.temperature for p in params])[:, None]
    probs = torch.softmax(out, dim=-1)
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    if min(ks) < V:
        values = torch.topk(out, max(k for k in ks if k < V)).values  # [S, kmax], best first
        kth = values.gather(1, torch.tensor([min(k, values.shape[1]) - 1 for k in ks], device=out.device)[:, None])
        active = torch.tensor([k < V for k in ks], device=out.device)[:, None]
        probs.masked_fill_(active & (out < kth), 0.0)
    top_p = column([p.top_p for p in params])
    if bool((top_p < 1).any()):
        mass = top_p[:, None] * probs.sum(-1, keepdim=True)  # of what top-k kept
        values = torch.topk(probs, min(CANDIDATES, V)).values  # best first
        before = torch.cumsum(values, -1) - values  # the mass of the tokens more likely than each
        # keep the smallest prefix whose mass reaches top_p (a token stays if the mass before it is < top_p):
        # every token down to the prefix's last one (tokens tied with it stay too)
        wider = (before[:, -1:] + values[:, -1:] < mass) & (top_p < 1)[:, None]  # nuclei past the candidates
        cut = values.gather(1, (before < mass).sum(-1, keepdim=True) - 1)
        probs.masked_fill_(probs < cut.masked_fill((top_p >= 1)[:, None] | wider, 0.0), 0.0)
        for row in wider[:, 0].nonzero()[:, 0].tolist():
            probs[row] = _nucleus_sorted(probs[row], float(mass[row]))
    min_p = column([p.min_p for p in params])
    if bool((min_p > 0).any()):
        probs.masked_fill_(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, 0.0)
    return probs


def _nucleus_sorted(probs: torch.Tensor, mass: float) -> torch.Tensor:
    """Top-p of one row's probabilities [V] through a full sort: a row whose nucleus holds more than
    CANDIDATES tokens."""
    values, order = torch.sort(probs, descending=True)
    drop = torch.zeros_like(values, dtype=torch.bool).scatter(0, order, torch.cumsum(values, 0) - values >= mass)
    return probs.masked_fill(drop, 0.0)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits [V] after temperature, with -inf where `sampling_weights` drops the token."""
    weights = sampling_weights(logits[None], [params])[0]
    return (logits / params.temperature).masked_fill(weights == 0, -math.inf)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of probabilities [S, V] (rows may not sum to 1), each row from one uniform of its
    own generator (None: torch's default one): the first token whose cumulative mass passes it. A seeded
    request draws the same tokens in any batch."""
    cdf = torch.cumsum(probs, -1)
    u = torch.stack([torch.rand((), generator=g, device=probs.device) for g in generators])
    out = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].tolist()
    for row, token in enumerate(out):  # u * total rounded up to the total: the last token with any mass
        if token >= probs.shape[1]:
            out[row] = int(probs[row].nonzero()[-1])
    return out


@dataclass
class Penalties:
    """One sequence's state for the penalties: `seen` [V] (prompt or output), output `counts` [V]."""

    seen: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def for_prompt(cls, prompt: Sequence[int], vocab_size: int, device: torch.device | str = "cpu") -> Penalties:
        seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(list(prompt), device=device)] = True
        return cls(seen, torch.zeros(vocab_size, dtype=torch.long, device=device))

    def record(self, token: int) -> None:
        self.seen[token] = True
        self.counts[token] += 1


def sample_one(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    penalties: Penalties | None = None,
) -> int:
    """Draw one token id from logits [V] (fp32)."""
    return sample_rows(logits[None], [params], [generator], [penalties])[0]


def greedy(logits: torch.Tensor) -> list[int]:
    """The first index of each row's largest value, [B, V] -> B ids. (`max` finds it faster than
    `argmax` on CPU, with the same tie rule.)"""
    return logits.max(-1).indices.tolist()


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    penalties: Sequence[Penalties | None],
) -> list[int]:
    """One token per row of logits [B, V] (fp32), each row with its own parameters and state: logit bias
    and penalties row by row where a row has them, then one argmax over the greedy rows and one pass of
    `sampling_weights` and `draw` over the sampled ones."""
    if all(p.plain_greedy for p in params):
        return greedy(logits)
    changed = [i for i, p in enumerate(params) if p.logit_bias or p.penalised]
    if changed:
        logits = logits.clone()
        for i in changed:
            logits[i] = adjusted(logits[i], params[i], penalties[i])
    chosen = [0] * len(params)
    picked = [i for i, p in enumerate(params) if p.greedy]
    if picked:
        for i, token in zip(picked, greedy(logits[picked])):
            chosen[i] = token
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = logits if len(sampled) == len(params) else logits[sampled]
        weights = sampling_weights(rows, [params[i] for i in sampled])
        for i, token in zip(sampled, draw(weights, [generators[i] for i in sampled])):
            chosen[i] = token
    return chosen


def adjusted(logits: torch.Tensor, params: SamplingParams, penalties: Penalties | None) -> torch.Tensor:
    """One row of logits [V] after its logit bias and penalties (the first steps of sampling)."""
    if params.logit_bias:
        logits = apply_logit_bias(logits, params.logit_bias)
    if params.penalised:
        if penalties is None:
            raise ValueError("penalties need the seen tokens and output counts")
        logits = apply_penalties(logits, penalties.seen, penalties.counts, params)
    return logits


def verify_draft(
    logits: torch.Tensor,
    draft: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    penalties: Penalties | None = None,
) -> tuple[int, bool]:
    """Speculative decoding's check of one drafted token against the target's logits [V] (fp32) at its
    position: the token to emit there, and whether it is the draft.

    Drafts are proposed with certainty (n-gram lookup, a greedy draft model: q is one-hot), so the standard
    rejection rule, accept with probability min(1, p(x)/q(x)) and otherwise draw from max(0, p - q)
    renormalised, becomes: keep the draft with probability p(draft), else draw from p without the draft.
    Every emitted token then follows p, the distribution plain sampling draws from. Greedy: the target's
    own choice, which is the draft or not.

    Example:
        >>> verify_draft(torch.tensor([0.0, 5.0, 1.0]), draft=1, params=SamplingParams())
        (1, True)
    """
    if params.greedy:
        token = sample_one(logits, params, generator, penalties)
        return token, token == draft
    weights = sampling_weights(adjusted(logits, params, penalties)[None], [params])[0]
    u = torch.rand((), generator=generator, device=weights.device)
    if float(u * weights.sum()) < float(weights[draft]):
        return draft, True
    weights[draft] = 0.0
    return draw(weights[None], [generator])[0], False


def top_token_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int
                       ) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities under the model (before any sampling transform) of `tokens[i]` in row i of
    logits [B, V], and each row's `k` most likely (token, logprob), best first: one log-softmax."""
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, torch.tensor(list(tokens), device=logits.device)[:, None])[:, 0].tolist()
    if k <= 0:
        return picked, [[] for _ in tokens]
    values, ids = logp.topk(k, dim=-1)  # [B, k], best first
    return picked, [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int]) -> list[float]:
    """Log-probability under the model (before any sampling transform) of `tokens[i]` in row i of [B, V]."""
    return top_token_logprobs(logits, tokens, 0)[0]
