"""Text embeddings: one vector per text, pooled from the model's final hidden states.

Mistral-architecture embedding models (e5-mistral-7b-instruct, SFR-Embedding-Mistral,
Linq-Embed-Mistral) are bare transformers (`ModelArgs.bare`) read with last-token pooling: each text
is encoded with BOS, EOS is appended, and the final hidden state at that EOS is the text's vector,
L2-normalised. "mean" pooling averages the hidden states of every token instead. A language model can
be read either way too; its vectors are only as good as it happens to make them.

Texts are run in batches of similar lengths, padded on the right: attention is causal, so a token
never sees the padding after it, and each text's vectors are those it has on its own.

Example:
    >>> model, tok = load_model("e5-mistral-7b-instruct/"), load_tokenizer("e5-mistral-7b-instruct/")
    >>> queries = embed(model, tok, ["Instruct: Given a web search query, retrieve relevant passages\\n"
    ...                              "Query: how much protein should a female eat"])
    >>> passages = embed(model, tok, ["As a general guideline, the CDC's average requirement of protein..."])
    >>> scores = queries @ passages.T  # cosine similarities: the vectors are normalised
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from .model import Transformer
from .tokenizer import Tokenizer

Pooling = Literal["last", "mean"]
POOLINGS: tuple[Pooling, ...] = ("last", "mean")


def embed(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: str | Sequence[str],
    pooling: Pooling = "last",
    normalize: bool = True,
    batch_size: int = 8,
) -> torch.Tensor:
    """The embeddings [N, dim] (fp32, on the CPU) of `texts` (one text: N = 1), in their order.

    Each text is encoded with BOS; "last" pooling appends EOS and reads the hidden state there, "mean"
    averages over every token. `normalize` scales each vector to unit L2 norm, so that dot products are
    cosine similarities. `batch_size` texts run in one forward pass.

    Example:
        >>> vectors = embed(model, tokenizer, ["first text", "a second, longer text"])  # [2, dim]

    Raises:
        ValueError: `pooling` is not "last" or "mean", "last" pooling with a tokenizer that has no EOS,
            or a text longer than the model's context (the message names its index).
    """
    if isinstance(texts, str):
        texts = [texts]
    _check_pooling(pooling)
    ids = [embedding_tokens(tokenizer, text, pooling) for text in texts]
    return embed_tokens(model, ids, pooling, normalize, batch_size, name="texts")


def embedding_tokens(tokenizer: Tokenizer, text: str, pooling: Pooling = "last") -> list[int]:
    """The tokens `embed` runs for `text`: BOS, the text, and for "last" pooling EOS (unless the tokenizer
    already ends its encodings with one, as some Hugging Face tokenizers of embedding models do).

    Raises:
        ValueError: "last" pooling with a tokenizer that has no EOS token.
    """
    ids = tokenizer.encode(text, bos=True)
    if pooling == "last":
        if tokenizer.eos_id is None:
            raise ValueError("pooling: 'last' pooling reads the hidden state at an appended EOS, but the tokenizer "
                             f"{tokenizer.name} has none; use 'mean'")
        if not ids or ids[-1] != tokenizer.eos_id:
            ids.append(tokenizer.eos_id)
    return ids


def embed_tokens(
    model: Transformer,
    ids: Sequence[Sequence[int]],
    pooling: Pooling = "last",
    normalize: bool = True,
    batch_size: int = 8,
    name: str = "ids",
) -> torch.Tensor:
    """The embeddings [N, dim] (fp32, on the CPU) of token sequences run as given: "last" pooling reads
    the last token's hidden state (`embed` puts an EOS there), "mean" averages over all of them. `name`
    is what errors call the sequences.

    Raises:
        ValueError: a bad `pooling` or `batch_size`, a parallel model, an empty sequence, ids outside the
            vocabulary, or a sequence longer than the model's context (the message names `name[i]`).
    """
    _check_pooling(pooling)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if model.parallel is not None:
        raise ValueError("model: one rank's share of a parallel model cannot embed on its own; load it whole")
    args = model.args
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"{name}[{i}]: no tokens to embed")
        if min(row) < 0 or max(row) >= args.vocab_size:
            raise ValueError(f"{name}[{i}]: token ids must lie in [0, {args.vocab_size})")
        if args.max_seq_len is not None and len(row) > args.max_seq_len:
            raise ValueError(f"{name}[{i}]: {len(row)} tokens exceed the model's context of {args.max_seq_len}")
    out = torch.zeros(len(ids), args.dim, dtype=torch.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            lengths = torch.tensor([len(ids[i]) for i in rows], device=model.device)  # [B]
            tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)  # [B, T], padded on the right
            for b, i in enumerate(rows):
                tokens[b, : len(ids[i])] = torch.tensor(list(ids[i]))
            h = model.features(tokens.to(model.device)).float()  # [B, T, dim]
            out[rows] = _pool(h, lengths, pooling).cpu()
    return F.normalize(out, dim=-1) if normalize else out


def _pool(h: torch.Tensor, lengths: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[B, dim] from hidden states `h` [B, T, dim] of rows holding `lengths` [B] tokens each."""
    if pooling == "last":
        return h[torch.arange(h.shape[0], device=h.device), lengths - 1]
    real = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]  # [B, T]
    return (h * real[..., None]).sum(1) / lengths[:, None]


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: must be one of {', '.join(POOLINGS)}, got {pooling!r}")
