"""A GGUF file's header read once, with every count and offset checked, and its tensors memory-mapped.

No torch here: the torch loader (`loading/gguf.py`), the tokenizer and the JAX loader share this reader.
It replaces `gguf.GGUFReader`, which trusts every count in the file (an array that claims 2^40
entries makes it loop 2^40 times), never compares tensor offsets with the file's size or with each
other (a tensor whose type changed reads into the next one's bytes), and takes seconds to walk a
real vocabulary field by field. Here each length is checked against the bytes left before it is
used, arrays of numbers are read in one piece, and every tensor's data must lie inside the file
without overlapping another's.

Shapes are given in torch order (outermost first): ggml stores them innermost first ("ne"), so a
`[vocab, dim]` embedding is stored as `ne = [dim, vocab]`.

Example:
    >>> file = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> file.metadata["general.architecture"], file.tensors[0].name, file.tensors[0].shape  # doctest: +SKIP
    ('llama', 'token_embd.weight', (49152, 576))
    >>> read_gguf("damaged.gguf")  # doctest: +SKIP
    Traceback (most recent call last):
    tramontane.errors.CheckpointError: damaged.gguf: truncated or corrupt GGUF file (1234 bytes): ...
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import CheckpointError

MAGIC = b"GGUF"
# metadata value type -> (struct format, numpy dtype); 8 is a string, 9 an array
_SCALARS = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16), 4: ("I", np.uint32),
            5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_), 10: ("Q", np.uint64), 11: ("q", np.int64),
            12: ("d", np.float64)}
_STRING, _ARRAY = 8, 9
_UINT32 = 4
_U64 = struct.Struct("<Q")
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4
_DEFAULT_ALIGNMENT = 32
# tensor types numpy holds as numbers; every other type is rows of blocks (uint8)
_NUMPY_TYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the table: its type, its shape in torch order, and where its data lies in the file
    ([start, end) in bytes from the file's start)."""

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def n_bytes(self) -> int:
        return self.end - self.start

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFFile:
    """What `read_gguf` found: `metadata` as plain Python values (str, int, float, bool, lists of them),
    `tensors` in the order of the file's table."""

    path: Path
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    _map: np.memmap | None = field(default=None, repr=False)

    def get(self, key: str) -> Any:
        """The value of metadata field `key`, None when the file lacks it."""
        return self.metadata.get(key)

    def array(self, tensor: GGUFTensor) -> np.ndarray:
        """A read-only view of `tensor`'s bytes in the memory map: numbers of its shape for the float and
        integer types, else uint8 rows of blocks, `[*shape[:-1], bytes per row]`."""
        if self._map is None:
            self._map = np.memmap(self.path, mode="r")
        raw = self._map[tensor.start:tensor.end]
        numeric = _NUMPY_TYPES.get(tensor.type)
        if numeric is not None:
            return raw.view(numeric).reshape(tensor.shape)
        return raw.reshape(*tensor.shape[:-1], -1)


def read_gguf(source: GGUFFile | str | Path) -> GGUFFile:
    """Read the header of the GGUF file at `source` (metadata and tensor table); the data stays on disk.
    A `GGUFFile` already read is returned as it is, so that callers take either.

    Raises:
        CheckpointError: not a GGUF file, or a count or length runs past the end of the file, a value
            has an unknown type or is not UTF-8, a tensor has a bad shape, type or offset, its data
            leaves the file, or two tensors' data overlap (the message names them).
    """
    if isinstance(source, GGUFFile):
        return source
    path = Path(source)
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                raise CheckpointError(path, "not a GGUF file (it is empty)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _walk(_Cursor(data, path))
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from e


def find_gguf(path: Path) -> Path:
    """The GGUF file a path names: itself, or the first `.gguf` file of a folder (by name)."""
    return path if path.is_file() else sorted(path.glob("*.gguf"))[0]


class _Cursor:
    """Reads little-endian values from a memory map, refusing any read that would pass the end."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.path, self.pos, self.size = data, path, 0, len(data)

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(self.path, f"truncated or corrupt GGUF file ({self.size} bytes): {problem}")

    def left(self) -> int:
        return self.size - self.pos

    def take(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        if n > self.left():
            raise self.fail(f"the file ends inside {what} (at byte {self.pos})")
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += n
        return value

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count of items, each at least `min_item_bytes` long, that must fit in what is left."""
        n = int(self.take("Q", what))
        if n * min_item_bytes > self.left():
            raise self.fail(f"{what} is {n}, but only {self.left()} bytes are left in the file")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"the length of {what}", 1)
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e})") from e

    def strings(self, n: int, what: str) -> list[str]:
        """`n` strings in a row (a vocabulary: the one loop over the header that must be quick)."""
        data, pos, size, length = self.data, self.pos, self.size, _U64.unpack_from
        raw = []
        for i in range(n):
            if pos + 8 > size or (k := length(data, pos)[0]) > size - pos - 8:
                self.pos = pos
                raise self.fail(f"item {i} of {what} runs past the end of the file")
            raw.append(data[pos + 8:pos + 8 + k])
            pos += 8 + k
        self.pos = pos
        try:
            return [b.decode("utf-8") for b in raw]
        except UnicodeDecodeError as e:
            raise self.fail(f"an item of {what} is not UTF-8 ({e})") from e

    def numbers(self, kind: int, what: str) -> list[Any]:
        """A u64 count, then that many numbers of metadata type `kind`, read in one piece."""
        fmt, dtype = _SCALARS[kind]
        size = struct.calcsize(fmt)
        n = self.count(f"the length of {what}", size)
        values = np.frombuffer(self.data, dtype=np.dtype(dtype).newbyteorder("<"), count=n, offset=self.pos)
        self.pos += n * size
        return values.tolist()


def _walk(c: _Cursor) -> GGUFFile:
    if c.take("4s", "the magic") != MAGIC:
        raise CheckpointError(c.path, f"not a GGUF file (starts with {bytes(c.data[:4])!r}, expected {MAGIC!r})")
    version = c.take("I", "the version")
    if version & 0xFFFF == 0:
        raise CheckpointError(c.path, "GGUF file has the opposite byte order to this machine; not supported")
    if version not in (2, 3):
        raise CheckpointError(c.path, f"GGUF version {version} is not supported (2 or 3)")
    n_tensors = int(c.take("Q", "the tensor count"))
    # key (8 + 1) + type (4) + smallest value (1) per field; name (8 + 1) + n_dims, dim, type, offset per tensor
    n_fields = c.count("the metadata field count", 13)
    if n_tensors * 32 > c.left():
        raise c.fail(f"the tensor count is {n_tensors}, but only {c.left()} bytes are left in the file")
    metadata: dict[str, Any] = {}
    for _ in range(n_fields):
        key = c.string("a metadata key")
        if key in metadata:
            raise c.fail(f"metadata field {key} appears twice")
        kind = int(c.take("I", f"the type of metadata field {key}"))
        metadata[key] = value = _value(c, kind, key, 0)
        if key == "general.alignment" and (kind != _UINT32 or value < 1 or value & (value - 1)):
            raise c.fail(f"general.alignment must be a power of two (uint32), got {value!r}")
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    infos = []
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        n_dims = int(c.take("I", f"the dimension count of tensor {name}"))
        if not 1 <= n_dims <= _MAX_DIMS:
            raise c.fail(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        ne = [int(c.take("Q", f"the shape of tensor {name}")) for _ in range(n_dims)]
        type_id = int(c.take("I", f"the type of tensor {name}"))
        offset = int(c.take("Q", f"the offset of tensor {name}"))
        infos.append((name, ne, type_id, offset))
    data_start = -(-c.pos // alignment) * alignment
    tensors = [_tensor(c, name, ne, type_id, offset, data_start, alignment) for name, ne, type_id, offset in infos]
    _check_regions(c, tensors)
    return GGUFFile(c.path, metadata, tensors)


def _value(c: _Cursor, kind: int, key: str, depth: int) -> Any:
    if kind in _SCALARS:
        return c.take(_SCALARS[kind][0], f"the value of metadata field {key}")
    if kind == _STRING:
        return c.string(f"metadata field {key}")
    if kind == _ARRAY:
        if depth >= _MAX_NESTING:
            raise c.fail(f"metadata field {key} nests arrays more than {_MAX_NESTING} deep")
        item = int(c.take("I", f"the item type of metadata array {key}"))
        if item in _SCALARS:
            return c.numbers(item, f"metadata array {key}")
        if item not in (_STRING, _ARRAY):
            raise c.fail(f"metadata array {key} has unknown item type {item}")
        n = c.count(f"the length of metadata array {key}", 8 if item == _STRING else 12)
        if item == _STRING:
            return c.strings(n, f"metadata array {key}")
        return [_value(c, item, key, depth + 1) for _ in range(n)]
    raise c.fail(f"metadata field {key} has unknown type {kind}")


def _tensor(c: _Cursor, name: str, ne: list[int], type_id: int, offset: int, data_start: int,
            alignment: int) -> GGUFTensor:
    try:
        kind = GGMLQuantizationType(type_id)
    except ValueError:
        raise CheckpointError(c.path, f"tensor {name}: unsupported tensor type {type_id} (unknown GGMLQuantizationType)") from None
    if kind not in GGML_QUANT_SIZES:
        raise CheckpointError(c.path, f"tensor {name}: unsupported tensor type {kind.name}")
    block, block_bytes = GGML_QUANT_SIZES[kind]
    if any(d < 1 for d in ne) or ne[0] % block:
        raise c.fail(f"tensor {name} has shape {ne} (ggml order), which {kind.name} blocks of {block} cannot hold")
    if offset % alignment:
        raise c.fail(f"tensor {name} starts at offset {offset}, not a multiple of the alignment {alignment}")
    n = 1
    for d in ne:
        n *= d
    start = data_start + offset
    end = start + n // block * block_bytes
    if end > c.size:
        raise c.fail(f"tensor {name}'s data [{start}, {end}) runs past the end of the file")
    return GGUFTensor(name, kind, tuple(reversed(ne)), start, end)


def _check_regions(c: _Cursor, tensors: list[GGUFTensor]) -> None:
    names: set[str] = set()
    for t in tensors:
        if t.name in names:
            raise c.fail(f"tensor {t.name} appears twice")
        names.add(t.name)
    ordered = sorted(tensors, key=lambda t: t.start)
    for before, after in zip(ordered, ordered[1:]):
        if after.start < before.end:
            raise CheckpointError(
                c.path,
                f"tensors {before.name} ({before.type.name}, bytes [{before.start}, {before.end})) and {after.name} "
                f"({after.type.name}, bytes [{after.start}, {after.end})) overlap: one of them has a wrong type, "
                "shape or offset",
            )
