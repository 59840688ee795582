"""Exceptions raised when a checkpoint, tokenizer or config cannot be used."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(Exception):
    """A checkpoint (folder, weight file, config or GGUF) is missing, malformed or inconsistent.

    The message always names the file (and the tensor or field, where there is one).
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(CheckpointError):
    """A `params.json`, `config.json` or GGUF metadata block is missing a field or holds a bad value."""


class TensorMismatchError(CheckpointError):
    """A weight file lacks a tensor, has one too many, or has one of the wrong shape."""


class TokenizerError(Exception):
    """A tokenizer file cannot be found, recognised or read; the message names the file."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
