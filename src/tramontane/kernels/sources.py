"""What the native kernels are built from: their sources, flags, and the digest that names a build.

Shared by `setup.py` (which compiles them at install time) and `kernels/__init__.py` (which uses that
build when its digest matches the sources beside it, and otherwise builds them itself, once). Imports
nothing but the standard library, so `setup.py` can read it before the package is installed.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = [HERE / name for name in (
    "cpu.cpp", "dense.cpp", "int4.cpp", "blocks.cpp", "amx.cpp", "attention.cpp", "decode.cpp", "memory.cpp",
    "bindings.cpp",
)]
HEADERS = [HERE / name for name in (
    "common.h", "simd.h", "per_isa.h", "amx.h", "dense.h", "int4.h", "attention.h", "blocks.h", "dense_tiles.h", "int4_tiles.h", "blocks_tiles.h",
    "split_tiles.h", "attention_tiles.h", "block_format.h", "q8_0.h", "q5.h", "qk45.h", "q6_k.h",
)]
# -fopenmp makes ATen's parallel_for parallel; libgomp.so.1 resolves to the copy torch already loaded, so
# the kernels share torch's thread pool instead of starting a second one.
CFLAGS = ["-O3", "-std=c++17", "-fopenmp", "-g0"]
LDFLAGS = ["-fopenmp"]


def digest(torch_version: str) -> str:
    """What a build is made of: sources, flags and torch. The build made at install time records it, so a
    changed source is noticed."""
    h = hashlib.sha256()
    for p in SOURCES + HEADERS:
        h.update(p.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch_version.encode())
    return h.hexdigest()[:12]


def build_name(torch_version: str) -> str:
    """A name for a build made at run time: its digest, the interpreter and the folder of the sources,
    which its build files embed, so two checkouts or virtualenvs never rebuild each other's kernels."""
    where = hashlib.sha256(f"{sys.prefix}\0{HERE.resolve()}".encode()).hexdigest()[:8]
    return f"{digest(torch_version)}_{where}"
