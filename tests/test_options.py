"""ModelOptions and open_model: the one way the CLI, the server and Python callers open a model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tramontane import CheckpointError, ModelOptions, open_model
from tramontane.loading import options
from tramontane.server import load_engine


def test_options_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="dtype: 'float8'"):
        ModelOptions(dtype="float8")
    with pytest.raises(ValueError, match="threads: must be >= 0"):
        ModelOptions(threads=-1)
    with pytest.raises(ValueError, match="quantize: 'int3'"):
        ModelOptions(quantize="int3")
    with pytest.raises(ValueError, match="pp: must be >= 1"):
        ModelOptions(pp=0)


def test_a_torch_dtype_is_kept_by_name() -> None:
    assert ModelOptions(dtype=torch.bfloat16).dtype == "bfloat16"
    assert ModelOptions(dtype="float16").torch_dtype is torch.float16


def test_a_missing_model_names_the_path() -> None:
    with pytest.raises(CheckpointError, match="/no/such/model: no such file or folder"):
        open_model(ModelOptions(model="/no/such/model"))


def test_open_model_loads_the_model_and_sets_threads(tiny_hf, monkeypatch: pytest.MonkeyPatch) -> None:
    _, folder = tiny_hf("mistral-nowindow")
    monkeypatch.setattr(options, "load_tokenizer", lambda path: SimpleNamespace(vocab_size=10))
    threads = torch.get_num_threads()
    try:
        opened = open_model(ModelOptions(model=folder, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert opened.path == folder and opened.tokenizer.vocab_size == 10
    assert opened.model.args.vocab_size >= 10


def test_a_tokenizer_larger_than_the_model_is_refused_by_the_server_too(tiny_hf, monkeypatch) -> None:
    _, folder = tiny_hf("mistral-nowindow")
    monkeypatch.setattr(options, "load_tokenizer", lambda path: SimpleNamespace(vocab_size=10**6))
    with pytest.raises(CheckpointError, match="tokenizer has 1000000 ids but the model only"):
        load_engine(folder, max_batch=1)


def test_serving_adapters_on_a_split_model_is_refused_before_loading(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="lora: serving adapters is not supported on a parallel model"):
        load_engine(ModelOptions(model=tmp_path / "never-read"), lora=[tmp_path])


def test_serve_takes_the_shared_model_options() -> None:
    from tramontane.cli import build_parser
    from tramontane.cli.common import model_options

    a = build_parser().parse_args(["serve", "--threads", "2", "--dtype", "bfloat16", "--lora", "fr=/tmp/fr"])
    assert model_options(a) == ModelOptions(dtype="bfloat16", threads=2)  # serve's --lora is served, not merged
    assert a.lora == [("fr", Path("/tmp/fr"))]


def test_compile_asks_for_the_compiled_decode_step(tiny_hf, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compile` (ModelOptions.compile) routes decode steps through compile_decode; whether compiled
    steps give the eager tokens is test_compile.py's."""
    import tramontane.step_backends as step_backends

    _, folder = tiny_hf("mistral-nowindow")
    monkeypatch.setattr(options, "load_tokenizer", lambda path: SimpleNamespace(vocab_size=10))
    compiled: list[object] = []
    monkeypatch.setattr(step_backends, "compile_decode", compiled.append)
    opened = open_model(ModelOptions(model=folder, compile=True))
    assert compiled == [opened.model]
    assert open_model(ModelOptions(model=folder)) and len(compiled) == 1

