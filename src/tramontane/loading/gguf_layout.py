"""A bounds-checked walk over a GGUF file's header, run before `gguf.GGUFReader` touches it.

The reader trusts every count in the file: an array that claims 2^40 entries makes it loop 2^40 times
(growing its lists past any memory), and tensor offsets are never compared with the file's size or
with each other, so one tensor whose type changed reads into the next tensor's bytes. This walk reads
only the header (a few MiB for a real vocabulary), checks each length against the bytes that are left
before using it, and checks that every tensor's data lies inside the file and that no two overlap.

Example:
    >>> check_gguf_layout("model.gguf")  # doctest: +SKIP
    >>> check_gguf_layout("damaged.gguf")  # doctest: +SKIP
    Traceback (most recent call last):
    tramontane.errors.CheckpointError: damaged.gguf: truncated or corrupt GGUF file (1234 bytes): ...
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import CheckpointError

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorRegion:
    """Where one tensor's data lies in the file: [start, end) in bytes from the file's start."""

    name: str
    kind: str
    start: int
    end: int


class _Cursor:
    """Reads little-endian values from a memory map, refusing any read that would pass the end."""

    def __init__(self, data: mmap.mmap | bytes, path: Path) -> None:
        self.data, self.path, self.pos, self.size = data, path, 0, len(data)

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(self.path, f"truncated or corrupt GGUF file ({self.size} bytes): {problem}")

    def left(self) -> int:
        return self.size - self.pos

    def take(self, fmt: str, what: str) -> int | float | bool:
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
        raw = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e})") from e


def check_gguf_layout(path: str | Path) -> list[TensorRegion]:
    """Walk the header of the GGUF file at `path`; the data region of each tensor, sorted by offset.

    Raises:
        CheckpointError: a count or length runs past the end of the file, a value has an unknown type,
            a tensor has a bad shape, type or offset, its data leaves the file, or two tensors' data
            overlap (the message names them).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                raise CheckpointError(path, "not a GGUF file (it is empty)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _walk(_Cursor(data, path))
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from e


def _walk(c: _Cursor) -> list[TensorRegion]:
    if c.take("I", "the magic") != int.from_bytes(b"GGUF", "little"):
        raise CheckpointError(c.path, "not a GGUF file (bad magic)")
    version = c.take("I", "the version")
    if isinstance(version, int) and version & 0xFFFF == 0:
        raise CheckpointError(c.path, "GGUF file has the opposite byte order to this machine; not supported")
    if version not in (2, 3):
        raise CheckpointError(c.path, f"GGUF version {version} is not supported (2 or 3)")
    n_tensors = int(c.take("Q", "the tensor count"))
    # key (8 + 1) + type (4) + smallest value (1) per field; name (8 + 1) + n_dims, dim, type, offset per tensor
    n_fields = c.count("the metadata field count", 13)
    if n_tensors * 32 > c.left():
        raise c.fail(f"the tensor count is {n_tensors}, but only {c.left()} bytes are left in the file")
    alignment = _DEFAULT_ALIGNMENT
    for _ in range(n_fields):
        key = c.string("a metadata key")
        kind = int(c.take("I", f"the type of metadata field {key}"))
        value = _skip_value(c, kind, key, 0)
        if key == "general.alignment":
            if kind != 4 or not isinstance(value, int) or value < 1 or value & (value - 1):
                raise c.fail(f"general.alignment must be a power of two (uint32), got {value!r}")
            alignment = value
    infos = []
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        n_dims = int(c.take("I", f"the dimension count of tensor {name}"))
        if not 1 <= n_dims <= _MAX_DIMS:
            raise c.fail(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        dims = [int(c.take("Q", f"the shape of tensor {name}")) for _ in range(n_dims)]
        type_id = int(c.take("I", f"the type of tensor {name}"))
        offset = int(c.take("Q", f"the offset of tensor {name}"))
        infos.append((name, dims, type_id, offset))
    data_start = -(-c.pos // alignment) * alignment
    regions = [_region(c, name, dims, type_id, offset, data_start, alignment) for name, dims, type_id, offset in infos]
    _check_regions(c, regions)
    return regions


def _skip_value(c: _Cursor, kind: int, key: str, depth: int) -> object:
    """Step over one metadata value; scalars are returned (for general.alignment), the rest skipped."""
    if kind in _SCALARS:
        return c.take(_SCALARS[kind], f"the value of metadata field {key}")
    if kind == _STRING:
        n = c.count(f"the length of metadata field {key}", 1)
        c.pos += n
        return None
    if kind == _ARRAY:
        if depth >= _MAX_NESTING:
            raise c.fail(f"metadata field {key} nests arrays more than {_MAX_NESTING} deep")
        item = int(c.take("I", f"the item type of metadata array {key}"))
        if item in _SCALARS:
            size = struct.calcsize(_SCALARS[item])
            n = c.count(f"the length of metadata array {key}", size)
            c.pos += n * size
            return None
        if item not in (_STRING, _ARRAY):
            raise c.fail(f"metadata array {key} has unknown item type {item}")
        n = c.count(f"the length of metadata array {key}", 8 if item == _STRING else 12)
        for _ in range(n):
            _skip_value(c, item, key, depth + 1)
        return None
    raise c.fail(f"metadata field {key} has unknown type {kind}")


def _region(c: _Cursor, name: str, dims: list[int], type_id: int, offset: int, data_start: int,
            alignment: int) -> TensorRegion:
    try:
        kind = GGMLQuantizationType(type_id)
    except ValueError:
        raise CheckpointError(c.path, f"tensor {name}: unsupported tensor type {type_id} (unknown GGMLQuantizationType)") from None
    if kind not in GGML_QUANT_SIZES:
        raise CheckpointError(c.path, f"tensor {name}: unsupported tensor type {kind.name}")
    block, block_bytes = GGML_QUANT_SIZES[kind]
    if any(d < 1 for d in dims) or dims[0] % block:
        raise c.fail(f"tensor {name} has shape {dims} (ggml order), which {kind.name} blocks of {block} cannot hold")
    if offset % alignment:
        raise c.fail(f"tensor {name} starts at offset {offset}, not a multiple of the alignment {alignment}")
    n = 1
    for d in dims:
        n *= d
    start = data_start + offset
    end = start + n // block * block_bytes
    if end > c.size:
        raise c.fail(f"tensor {name}'s data [{start}, {end}) runs past the end of the file")
    return TensorRegion(name, kind.name, start, end)


def _check_regions(c: _Cursor, regions: list[TensorRegion]) -> None:
    names: set[str] = set()
    for r in regions:
        if r.name in names:
            raise c.fail(f"tensor {r.name} appears twice")
        names.add(r.name)
    regions.sort(key=lambda r: r.start)
    for before, after in zip(regions, regions[1:]):
        if after.start < before.end:
            raise CheckpointError(
                c.path,
                f"tensors {before.name} ({before.kind}, bytes [{before.start}, {before.end})) and {after.name} "
                f"({after.kind}, bytes [{after.start}, {after.end})) overlap: one of them has a wrong type, "
                "shape or offset",
            )
