"""The compiled kernels' Python face: `Kernels` types exactly what kernels/bindings.cpp binds, and the
instruction sets listed are the ones the kernels can be switched to."""

from __future__ import annotations

import pytest

from tramontane.kernels import Kernels, load_kernels


def test_the_protocol_names_every_binding_and_nothing_else():
    ext = load_kernels()
    assert ext is not None, "the kernel extension must build here"
    declared = {n for n in dir(Kernels) if not n.startswith("_")} | set(Kernels.__annotations__)
    bound = {n for n in dir(ext) if not n.startswith("_")}
    assert declared == bound, f"only declared: {declared - bound}; only bound: {bound - declared}"


def test_every_listed_instruction_set_can_be_switched_to_and_others_cannot():
    ext = load_kernels()
    assert ext is not None
    best, have = ext.isa(), ext.isas()
    assert have[0] == "portable" and have[-1] == best  # best last, and in use unless a test switched
    try:
        for name in have:
            ext.set_isa(name)
            assert ext.isa() == name
        for name in {"portable", "avx2", "avx_vnni", "avx512", "amx"} - set(have):
            with pytest.raises(RuntimeError, match=f"instruction set {name} is not available"):
                ext.set_isa(name)
        with pytest.raises(RuntimeError, match="not available"):
            ext.set_isa("sse9")
    finally:
        ext.set_isa(best)


def test_the_build_digest_covers_every_kernel_file():
    """A changed header must change the digest, or an installed build of stale sources would be used."""
    from tramontane.kernels.sources import HEADERS, HERE, SOURCES

    on_disk = {p.name for p in HERE.iterdir() if p.suffix in (".cpp", ".h")}
    assert on_disk == {p.name for p in SOURCES + HEADERS}
