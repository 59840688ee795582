"""Native kernels: built at install time (`setup.py`), or else once on first use and cached on disk.

`load_kernels()` returns the compiled module, typed as `Kernels` (its functions as the C++ declares them,
kernels/bindings.cpp), or None (with one warning) when it cannot be had; callers then use plain
PyTorch, which gives the same results more slowly.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Protocol, cast

import torch

from .sources import CFLAGS, LDFLAGS, SOURCES, build_name, digest

HUGE_PAGE = 2 << 20


class ProjectionKinds(Protocol):
    """How a native projection's weights are stored (kernels/decode.cpp's `ProjectionKind`, bound as an enum)."""

    FLOAT: ProjectionKind  # fp32 [out, in]
    INT8: ProjectionKind  # int8 per output channel
    INT4: ProjectionKind  # int4 in groups, with or without minimums
    INT4_INTERLEAVED: ProjectionKind  # the same, rows interleaved by eights (Int4Linear.interleave)
    GGUF: ProjectionKind  # a GGUF quantization format, `group` holding its ggml type number
    GGUF_INTERLEAVED: ProjectionKind  # Q5_0, Q5_1 or Q8_0 rows interleaved by eights (BlockLinear.interleave)


class ProjectionKind(Protocol):
    """One value of the bound enum."""


class Projection(Protocol):
    """One projection of a native decode block (kernels/decode.cpp): its weights in one stored format."""


class ProjectionType(Protocol):
    def __call__(self, kind: ProjectionKind, weight: torch.Tensor, scale: torch.Tensor, group: int,
                 mins: torch.Tensor | None = None) -> Projection: ...

    def side_by_side(self, parts: list[Projection]) -> Projection: ...


class DecodeStack(Protocol):
    """Every transformer block of a decode step in one native call (kernels/decode.cpp)."""

    def add_block(self, attention_norm: torch.Tensor, ffn_norm: torch.Tensor, wqkv: Projection, wo: Projection,
                  w13: Projection, w2: Projection) -> None: ...

    def forward(self, h: torch.Tensor, rot: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor,
                kscale: torch.Tensor | None, vscale: torch.Tensor | None, tables: torch.Tensor,
                key_pos: torch.Tensor, write: torch.Tensor, q_pos: torch.Tensor, window: int,
                scan: int) -> torch.Tensor: ...

    def __len__(self) -> int: ...


class DecodeStackType(Protocol):
    def __call__(self, eps: float, n_heads: int, n_kv_heads: int) -> DecodeStack: ...


class Kernels(Protocol):
    """The compiled kernels, as kernels/bindings.cpp binds them (x: float32 [M, K] on CPU)."""

    DIGEST: str
    AMX_MIN_ROWS_INT4: int
    AMX_MIN_ROWS_INT8: int
    ProjectionKind: ProjectionKinds
    Projection: ProjectionType
    DecodeStack: DecodeStackType

    def f32_linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...
    def int8_linear(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor: ...
    def int4_linear(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None,
                    group: int, interleaved: bool = False) -> torch.Tensor: ...
    def int4_dequantize(self, w: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None,
                        group: int, interleaved: bool = False, bf16: bool = False) -> torch.Tensor: ...
    def block_unit(self, kind: int) -> tuple[int, int]: ...
    def block_amx_min_rows(self, kind: int) -> int: ...
    def block_linear(self, x: torch.Tensor, w: torch.Tensor, kind: int, interleaved: bool = False) -> torch.Tensor: ...
    def block_dequantize(self, w: torch.Tensor, kind: int, bf16: bool = False, interleaved: bool = False) -> torch.Tensor: ...
    def decode_attention(self, qkv: torch.Tensor, rot: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor,
                         kscale: torch.Tensor | None, vscale: torch.Tensor | None, tables: torch.Tensor,
                         key_pos: torch.Tensor, write: torch.Tensor, q_pos: torch.Tensor, window: int, scan: int,
                         n_heads: int, n_kv_heads: int) -> torch.Tensor: ...
    def mapped_empty(self, nbytes: int, huge_pages: bool) -> torch.Tensor: ...
    def trim_heap(self) -> None: ...
    def keep_heap(self, mmap_below: int, trim_above: int) -> None: ...
    def release_pages(self, address: int, nbytes: int) -> None: ...
    def release_threads(self) -> None: ...
    def isa(self) -> str: ...
    def isas(self) -> list[str]: ...
    def set_isa(self, name: str) -> None: ...
    def activation_parts(self) -> int: ...
    def set_activation_parts(self, parts: int) -> None: ...


@functools.lru_cache(maxsize=1)
def load_kernels() -> Kernels | None:
    """The CPU kernels (fp32/int8/int4 products, GGUF block formats, the decode stack): the build made at
    install time when it was built from these sources, else a build of its own (once per sources, torch
    and environment, cached under ~/.cache/torch_extensions)."""
    want = digest(torch.__version__)
    try:
        from . import _native  # type: ignore[attr-defined]

        if getattr(_native, "DIGEST", None) == want:
            return cast(Kernels, _native)
    except ImportError:
        pass
    try:
        return cast(Kernels, _build(want))
    except Exception as e:  # no compiler, no headers, no ninja: fall back, loudly once
        warnings.warn(f"tramontane: could not build the native kernels ({type(e).__name__}: {e}); "
                      "quantized layers fall back to slower PyTorch code", stacklevel=2)
        return None


def _build(want: str) -> ModuleType:
    """Compile the kernels with PyTorch's extension builder, saying so first (it takes a minute)."""
    from torch.utils.cpp_extension import _get_build_directory, load

    name = f"tramontane_kernels_{build_name(torch.__version__)}"
    folder = Path(_get_build_directory(name, verbose=False))
    _ensure_ninja_on_path()
    with _exclusive(folder):
        if not any(folder.glob(f"{name}*.so")):
            sys.stderr.write("tramontane: building the native kernels, once (about a minute)...\n")
            sys.stderr.flush()
        return load(name=name, sources=[str(p) for p in SOURCES], build_directory=str(folder),
                    extra_cflags=[*CFLAGS, f"-DTRAMONTANE_DIGEST={want}"], extra_ldflags=LDFLAGS, verbose=False)


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold an OS lock on the build folder, which the system drops with its process however that ends,
    and clear the lock file torch's builder leaves behind when a build is interrupted (torch waits on it
    forever): while we hold ours, no other build of this folder can be running."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tramontane.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            (folder / "lock").unlink()
        yield


def release_threads() -> None:
    """End the calling thread's OpenMP workers, before handing the computing to another thread: with
    two threads' teams alive on few cores, libgomp stops spinning between parallel regions, and every
    step pays for waking its workers (see `release_threads` in memory.cpp). Without the kernels, nothing."""
    ext = load_kernels()
    if ext is not None:
        ext.release_threads()


def weight_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu", *,
                 huge_pages: bool = True) -> torch.Tensor:
    """Uninitialised memory for a weight: on CPU, when it is 2 MiB or more and the kernels are built, a
    mapping of its own, so that loading puts it where it stays and freeing it gives its pages straight back
    to the system, in 2 MiB pages if `huge_pages` (see `mapped_empty` in memory.cpp for when they pay;
    `settle_in_memory` moves the other weights there); elsewhere `torch.empty`."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    ext = load_kernels() if torch.device(device).type == "cpu" and nbytes >= HUGE_PAGE else None
    if ext is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return ext.mapped_empty(nbytes, huge_pages).view(dtype).view(shape)  # [nbytes] -> shape


def _ensure_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` wheel puts it next to the interpreter."""
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        return
    bin_dir = str(ninja.BIN_DIR)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
