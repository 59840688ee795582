"""Property-based fuzzing of every file a checkpoint is read from (hypothesis).

Each example damages one small, valid checkpoint (tests/damaged.py) and loads it the ways a user does
(`read_model_args`, `load_model`, `load_tokenizer`): it must either succeed or raise the project's own
error, within a few seconds and without a large allocation. The suite runs a few dozen examples per
target (about a minute in all); `make fuzz` runs many more (FUZZ_EXAMPLES), and `fuzz/atheris_checkpoints.py`
a coverage-guided search.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tramontane import TokenizerError, load_model
from tramontane.formats.gguf_file import read_gguf
from tramontane.tokenizer import load_tokenizer

from damaged import GGUF_TOKENIZER, gguf_file, hf_folder, load_all_ways, native_folder

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
SECONDS = 5.0  # per example: far beyond what a small file takes, far below a hang
MAX_GROWTH_MIB = 300  # peak RSS over a whole test: a count taken at its word would pass this at once

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One good checkpoint per format, loaded once (so the native kernels are built before timing)."""
    root = tmp_path_factory.mktemp("pristine")
    made = {"gguf": gguf_file(root / "m.gguf"), "native": native_folder(root / "native"), "hf": hf_folder(root / "hf")}
    shutil.copy(made["gguf"], made["native"] / "tokenizer.gguf")  # a tokenizer for the folders too
    shutil.copy(made["gguf"], made["hf"] / "tokenizer.gguf")
    for path in made.values():
        load_model(path)
    return made


@pytest.fixture(scope="module")
def rss_budget():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown < MAX_GROWTH_MIB, f"peak RSS grew by {grown:.0f} MiB while fuzzing"


def _header_end(path: Path) -> int:
    """Where a GGUF file's tensor data starts: the header before it is what the fuzzers damage."""
    return min(t.start for t in read_gguf(path).tensors)


# ---------------------------------------------------------------------------------------------- GGUF

edits = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(edits=edits, cut=st.one_of(st.none(), st.floats(0, 1)))
def test_gguf_header_bytes(pristine, rss_budget, tmp_path_factory, edits, cut) -> None:
    data = bytearray(pristine["gguf"].read_bytes())
    end = _header_end(pristine["gguf"])
    for where, byte in edits:
        data[int(where * end)] = byte
    if cut is not None:
        del data[int(cut * len(data)):]
    path = tmp_path_factory.mktemp("g") / "m.gguf"
    path.write_bytes(bytes(data))
    load_all_ways(path, seconds=SECONDS)


INTERESTING = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2, 3, 7, 8, 2**31 - 1, 2**31, 2**32 - 1,
                                                                    2**40, 2**63, 2**64 - 1]))


@FUZZ
@given(which=st.integers(0, 10**6), value=INTERESTING, as_float=st.floats(allow_nan=True, allow_infinity=True))
def test_gguf_metadata_values(pristine, rss_budget, tmp_path_factory, which, value, as_float) -> None:
    """Any numeric metadata value (model and tokenizer: counts, ids, lengths of arrays) set to anything."""
    from gguf import GGUFReader

    path = tmp_path_factory.mktemp("g") / "m.gguf"
    shutil.copy(pristine["gguf"], path)
    reader = GGUFReader(path, "r+")
    slots = [(f, i) for f in reader.fields.values() if not f.name.startswith("GGUF.")
             for i in range(len(f.parts)) if f.parts[i].dtype.kind in "uif" and f.parts[i].size == 1 and i != 0]
    field, i = slots[which % len(slots)]
    part = field.parts[i]
    if part.dtype.kind == "f":
        part[0] = as_float
    else:
        info = struct.calcsize(part.dtype.char)
        part[0] = value % (1 << (8 * info)) if part.dtype.kind == "u" else value % (1 << (8 * info - 1))
    reader.data.flush()
    del reader, part, field, slots
    load_all_ways(path, seconds=SECONDS)


# ---------------------------------------------------------------------------------------------- safetensors


@FUZZ
@given(edits=edits, header_json=st.booleans(), data=st.data())
def test_safetensors_header(pristine, rss_budget, tmp_path_factory, edits, header_json, data) -> None:
    folder = tmp_path_factory.mktemp("n") / "native"
    shutil.copytree(pristine["native"], folder)
    file = folder / "consolidated.safetensors"
    raw = bytearray(file.read_bytes())
    (size,) = struct.unpack_from("<Q", raw)
    if header_json:  # a well-formed header with one entry's dtype, shape or offsets changed
        header = json.loads(raw[8:8 + size])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][key] = data.draw(st.one_of(
            st.sampled_from(["F16", "BF16", "I64", "U8", "F64", "BOOL", "XX"]),
            st.lists(st.integers(-1, 2**40), max_size=4), st.integers(), st.none()))
        text = json.dumps(header).encode()
        raw = bytearray(struct.pack("<Q", len(text)) + text + raw[8 + size:])
    else:
        for where, byte in edits:
            raw[int(where * (8 + size))] = byte
    file.write_bytes(bytes(raw))
    load_all_ways(folder, tokenizer=False, seconds=SECONDS)


# ---------------------------------------------------------------------------------------------- JSON files

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _mutate_json(path: Path, data: st.DataObject) -> None:
    """Replace, drop or add top-level keys of a JSON file (and sometimes the whole file)."""
    if data.draw(st.integers(0, 9)) == 0:
        path.write_text(json.dumps(data.draw(json_values)))
        return
    content: dict[str, Any] = json.loads(path.read_text())
    keys = sorted(content)
    for _ in range(data.draw(st.integers(1, 4))):
        key = data.draw(st.sampled_from(keys) | st.text(max_size=8))
        if data.draw(st.booleans()) and key in content:
            del content[key]
        else:
            content[key] = data.draw(json_values)
    path.write_text(json.dumps(content))


@FUZZ
@given(data=st.data())
def test_params_json(pristine, rss_budget, tmp_path_factory, data) -> None:
    folder = tmp_path_factory.mktemp("n") / "native"
    shutil.copytree(pristine["native"], folder)
    _mutate_json(folder / "params.json", data)
    load_all_ways(folder, tokenizer=False, seconds=SECONDS)


@FUZZ
@given(data=st.data())
def test_config_json(pristine, rss_budget, tmp_path_factory, data) -> None:
    folder = tmp_path_factory.mktemp("h") / "hf"
    shutil.copytree(pristine["hf"], folder)
    _mutate_json(folder / "config.json", data)
    load_all_ways(folder, tokenizer=False, seconds=SECONDS)


@FUZZ
@given(weight_map=json_values | st.dictionaries(st.text(max_size=30), st.text(max_size=30) | json_values, max_size=4))
def test_index_json(pristine, rss_budget, tmp_path_factory, weight_map) -> None:
    folder = tmp_path_factory.mktemp("h") / "hf"
    shutil.copytree(pristine["hf"], folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    load_all_ways(folder, tokenizer=False, seconds=SECONDS)


@FUZZ
@given(data=st.data())
def test_tokenizer_files(pristine, rss_budget, tmp_path_factory, data) -> None:
    """tokenizer_config.json beside a tokenizer.json, and tekken.json, with any structure."""
    from tokenizers import Tokenizer, models

    folder = tmp_path_factory.mktemp("t")
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}", "bos_token": "a"}))
    _mutate_json(folder / "tokenizer_config.json", data)
    for path in (folder, _tekken(folder.parent / f"{folder.name}-tekken", data)):
        try:
            load_tokenizer(path)
        except TokenizerError as e:
            assert e.path


def _tekken(folder: Path, data: st.DataObject) -> Path:
    folder.mkdir()
    base = {"config": {"pattern": ".", "num_vocab_tokens": 300, "default_vocab_size": 300, "version": "v7",
                       "default_num_special_tokens": 10},
            "vocab": [{"rank": i, "token_bytes": "YQ==", "token_str": "a"} for i in range(3)], "special_tokens": []}
    (folder / "tekken.json").write_text(json.dumps(base))
    _mutate_json(folder / "tekken.json", data)
    return folder


def test_pristine_files_load(pristine) -> None:
    """The fuzzers start from files that load: otherwise every example would only test one error."""
    for path in pristine.values():
        load_all_ways(path, tokenizer=True)
    assert GGUF_TOKENIZER["tokenizer.ggml.model"] == "llama"
