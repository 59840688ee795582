"""Draw which tokens each token may attend to, from the mask the model's attention uses (cache/).

The mask comes from `step_meta`, the function every forward call builds its attention metadata with:
full causal attention, or a sliding window of W keys counting the query itself. Several prompts are
several batch rows (each prefilled into its own cache row from position 0), so each gets its own grid.

Example (`tramontane mask --window 3 "Do you have mayonnaise recipes?"` prints the same):
    >>> print(visualize_mask(demo_model_path(), "Do you have mayonnaise recipes?", window=3))
    'Do you have mayonnaise recipes?'
    sliding window 3: each token sees itself and the 2 before it
               0 1 2 3 4 5 6 7
    0 Do       ■ · · · · · · ·
    1 Ġyou     ■ ■ · · · · · ·
    2 Ġhave    ■ ■ ■ · · · · ·
    3 Ġmay     ░ ■ ■ ■ · · · ·
    ...
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .args import ModelArgs
from .cache import step_meta
from .tokenizer import Tokenizer

VISIBLE, OUTSIDE_WINDOW, FUTURE = "■", "░", "·"


def attention_grid(n_tokens: int, window: int | None) -> torch.Tensor:
    """[T, T] bool, True where query t (row) may attend to key s (column), for one prompt at positions
    0..T-1: the mask `Transformer.forward` gives the attention (SDPA's causal mask when it passes none)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive integer or None, got {window!r}")
    meta = step_meta(torch.arange(n_tokens)[None], window)
    mask = meta.attention_mask()
    if mask is None:
        assert meta.is_causal  # step_meta leaves the mask to SDPA only for plain causal attention
        return torch.ones(n_tokens, n_tokens, dtype=torch.bool).tril()
    return mask[0, 0]


def render_grid(mask: torch.Tensor, labels: Sequence[str]) -> str:
    """The grid as text: one row per query token, `■` where it attends, `░` for an earlier token that
    the window hides, `·` for a later one."""
    T = mask.shape[0]
    if mask.shape != (T, T) or len(labels) != T:
        raise ValueError(f"mask {tuple(mask.shape)} must be square with one label per row ({len(labels)} labels)")
    shown = [_short(label) for label in labels]
    width = max(len(s) for s in shown)
    digits = len(str(T - 1))
    lines = [" " * (digits + width + 2) + " ".join(str(s % 10) for s in range(T))]
    for t in range(T):
        cells = [VISIBLE if mask[t, s] else OUTSIDE_WINDOW if s < t else FUTURE for s in range(T)]
        lines.append(f"{t:>{digits}} {shown[t]:<{width}} " + " ".join(cells))
    return "\n".join(lines)


def parse_grid(text: str) -> torch.Tensor:
    """The [T, T] mask back from `render_grid`'s text (for tests and scripts)."""
    lines = text.splitlines()[1:]  # after the column header
    cells = [line.split()[-len(lines):] for line in lines]  # the last T fields of each row
    return torch.tensor([[c == VISIBLE for c in row] for row in cells], dtype=torch.bool)


def describe(window: int | None, n_tokens: int) -> str:
    if window is None:
        return "causal: each token sees itself and every token before it"
    note = " (longer than the text: the same as causal)" if window >= n_tokens else ""
    return f"sliding window {window}: each token sees itself and the {window - 1} before it{note}"


def visualize_mask(
    model: str | Path | ModelArgs,
    texts: str | Sequence[str],
    *,
    window: int | None = None,
    tokenizer: Tokenizer | None = None,
    png: str | Path | None = None,
) -> str:
    """The attention masks of `texts` (one grid per prompt) as terminal text; also a picture with `png`.

    `model` is a checkpoint path (its config and tokenizer are read; no weights are loaded) or a
    ModelArgs with `tokenizer`. `window` overrides the model's sliding window, to see its effect on
    a short text.

    Example:
        >>> print(visualize_mask("SmolLM2.gguf", "Do you have mayonnaise recipes?", window=4))

    Raises:
        ValueError: no tokenizer for a ModelArgs, an empty text, or a bad window.
        ImportError: `png` without matplotlib installed (pip install 'tramontane[viz]').
    """
    if isinstance(model, ModelArgs):
        args = model
        if tokenizer is None:
            raise ValueError("tokenizer: required when model is a ModelArgs")
    else:
        from .loading import read_model_args
        from .tokenizer import load_tokenizer

        args = read_model_args(model)
        tokenizer = tokenizer or load_tokenizer(model)
    if window is None:
        window = args.sliding_window
    prompts = [texts] if isinstance(texts, str) else list(texts)
    grids = []
    for text in prompts:
        ids = tokenizer.encode(text, bos=True)
        if not ids:
            raise ValueError(f"texts: {text!r} has no tokens")
        labels = [tokenizer.id_to_piece(i) for i in ids]
        grids.append((text, labels, attention_grid(len(ids), window)))
    out = []
    for i, (text, labels, mask) in enumerate(grids):
        title = f"prompt {i} (batch row {i}): {text!r}" if len(grids) > 1 else repr(text)
        out.append(f"{title}\n{describe(window, len(labels))}\n{render_grid(mask, labels)}")
    if png is not None:
        save_png(grids, window, Path(png))
    return "\n\n".join(out)


def save_png(grids: Sequence[tuple[str, Sequence[str], torch.Tensor]], window: int | None, path: Path) -> None:
    """One heat map per prompt, token labels on both axes, into `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # a file, never a window
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("png: drawing a picture needs matplotlib: pip install 'tramontane[viz]'") from e
    fig, axes = plt.subplots(1, len(grids), figsize=(max(4.0, 0.45 * max(len(g[1]) for g in grids)) * len(grids),
                                                     max(4.0, 0.45 * max(len(g[1]) for g in grids))), squeeze=False)
    for ax, (text, labels, mask) in zip(axes[0], grids):
        ax.imshow(mask.numpy(), cmap="Blues", vmin=0, vmax=1)
        ticks = range(len(labels))
        ax.set_xticks(ticks, [_short(s) for s in labels], rotation=90)
        ax.set_yticks(ticks, [_short(s) for s in labels])
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
        ax.set_title(describe(window, len(labels)).split(":")[0] + f"\n{text[:40]!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _short(label: str, most: int = 12) -> str:
    text = label.replace("\n", "\\n") or "''"
    return text if len(text) <= most else text[: most - 1] + "…"
