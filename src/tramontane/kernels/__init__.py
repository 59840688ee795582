"""Native kernels, compiled on first use with PyTorch's extension builder and cached on disk.

`qlinear()` returns the compiled module, or None (with one warning) when it cannot be built; callers
then use plain PyTorch, which gives the same results more slowly.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

HERE = Path(__file__).parent
HUGE_PAGE = 2 << 20
SOURCES = [HERE / "qlinear.cpp", HERE / "int4.cpp", HERE / "amx.cpp", HERE / "decode.cpp"]
HEADERS = [HERE / "common.h"]
BUILD_FLAGS = "-O3 -std=c++17 -fopenmp"


@functools.lru_cache(maxsize=1)
def qlinear() -> ModuleType | None:
    """The fp32/int8/int4 CPU kernels (qlinear.cpp, int4.cpp, amx.cpp, decode.cpp), built once per source and
    torch version."""
    try:
        from torch.utils.cpp_extension import load

        text = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
        digest = hashlib.sha256(text + BUILD_FLAGS.encode() + torch.__version__.encode()).hexdigest()[:12]
        _ensure_ninja_on_path()
        # -fopenmp makes ATen's parallel_for parallel; libgomp.so.1 resolves to the copy torch already
        # loaded, so the kernels share torch's thread pool instead of starting a second one.
        return load(name=f"tramontane_qlinear_{digest}", sources=[str(p) for p in SOURCES],
                    extra_cflags=BUILD_FLAGS.split(), extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers, no ninja: fall back, loudly once
        warnings.warn(f"tramontane: could not build the quantized kernels ({type(e).__name__}: {e}); "
                      "int8/int4 layers fall back to slower PyTorch code", stacklevel=2)
        return None


def weight_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uninitialised memory for a weight: on CPU, from 2 MiB pages when it is that large and the kernels
    are built (see `settle_in_memory`), so that loading puts it where it stays and freeing it gives its
    pages straight back to the system; elsewhere `torch.empty`."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    ext = qlinear() if torch.device(device).type == "cpu" and nbytes >= HUGE_PAGE else None
    if ext is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return ext.huge_page_empty(nbytes).view(dtype).view(shape)  # [nbytes] -> shape


def _ensure_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` wheel puts it next to the interpreter."""
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        return
    bin_dir = str(ninja.BIN_DIR)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
