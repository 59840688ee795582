"""Coverage-guided fuzzing of the checkpoint loaders with atheris (libFuzzer): `make fuzz`.

The first input byte picks the file to replace in a small, valid checkpoint (a GGUF file, params.json,
config.json, consolidated.safetensors, a model.safetensors.index.json, tokenizer_config.json); the rest
is that file's new content. The seed corpus is the valid files themselves, so libFuzzer starts from
inputs that load and mutates outward. Loading must succeed or raise CheckpointError/TokenizerError:
any other exception is a crash, a hang past -timeout or memory past -rss_limit_mb a finding.

    .venv/bin/python fuzz/atheris_checkpoints.py -max_total_time=600 -timeout=10 -rss_limit_mb=3072
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import gguf  # noqa: E402, F401 - imported (uninstrumented) first: coverage is wanted in tramontane only
import safetensors  # noqa: E402, F401
import tokenizers  # noqa: E402, F401
import torch  # noqa: E402, F401

with atheris.instrument_imports(include=["tramontane"]):
    import tramontane.loading  # noqa: F401
    import tramontane.tokenizer  # noqa: F401

from damaged import gguf_file, hf_folder, load_all_ways, native_folder  # noqa: E402

ROOT = Path(tempfile.mkdtemp(prefix="tramontane-atheris-"))
PRISTINE = {"gguf": gguf_file(ROOT / "m.gguf"), "native": native_folder(ROOT / "native"), "hf": hf_folder(ROOT / "hf")}
# target byte -> (checkpoint to copy, file inside it to replace)
TARGETS = [("gguf", ""), ("native", "params.json"), ("hf", "config.json"), ("native", "consolidated.safetensors"),
           ("hf", "model.safetensors.index.json"), ("hf", "tokenizer_config.json")]


def seed_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (kind, name) in enumerate(TARGETS):
        source = PRISTINE[kind] / name if name else PRISTINE[kind]
        body = source.read_bytes() if source.is_file() else b'{"weight_map": {}}'
        (folder / f"seed-{i}").write_bytes(bytes([i]) + body)


def one_input(data: bytes) -> None:
    if not data:
        return
    kind, name = TARGETS[data[0] % len(TARGETS)]
    work = ROOT / "work"
    shutil.rmtree(work, ignore_errors=True)
    if name:
        shutil.copytree(PRISTINE[kind], work)
        (work / name).write_bytes(data[1:])
    else:
        work.mkdir()
        (work / "m.gguf").write_bytes(data[1:])
        work = work / "m.gguf"
    load_all_ways(work, tokenizer=kind == "gguf" or name == "tokenizer_config.json", seconds=10.0)


if __name__ == "__main__":
    corpus = ROOT / "corpus"
    seed_corpus(corpus)
    for path in PRISTINE.values():  # builds the native kernels now, not inside the first timed input
        load_all_ways(path, tokenizer=False, seconds=float("inf"))
    atheris.Setup([*sys.argv, str(corpus)], one_input)
    atheris.Fuzz()
