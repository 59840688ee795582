"""Builds the native kernels at install time (the rest of the metadata is in pyproject.toml).

torch must already be installed, and the build must see it: `pip install --no-build-isolation -e .`
(what `make setup` runs). Without torch at build time the package installs without the compiled
kernels, and the first command that needs them builds them once, saying so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup

spec = importlib.util.spec_from_file_location("sources", Path(__file__).parent / "src/tramontane/kernels/sources.py")
assert spec is not None and spec.loader is not None
sources = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sources)

ext_modules: list = []
cmdclass: dict = {}
try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    pass
else:
    root = Path(__file__).parent
    ext_modules = [CppExtension(
        "tramontane.kernels._native",
        sources=[str(p.relative_to(root)) for p in sources.SOURCES],
        extra_compile_args=[*sources.CFLAGS, f"-DTRAMONTANE_DIGEST={sources.digest(torch.__version__)}"],
        extra_link_args=sources.LDFLAGS,
    )]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
