"""The package's top level: every public name resolves, and importing it costs no torch import."""

from __future__ import annotations

import subprocess
import sys

import tramontane


def test_every_public_name_resolves() -> None:
    assert sorted(tramontane.__all__) == sorted(tramontane._MODULE_OF)
    for name in tramontane.__all__:
        assert getattr(tramontane, name) is not None


def test_import_does_not_load_torch() -> None:
    code = "import sys, tramontane, tramontane.args; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_names_are_not_shadowed_by_submodules() -> None:
    """`generate` is the function even after the submodule of that name has loaded, whichever way it did."""
    for code in ("from tramontane import compile_decode, generate",  # resolving one name loads the module
                 "import tramontane.cli; from tramontane import generate",  # loaded without the package's help
                 "import tramontane; tramontane.compile_decode; generate = tramontane.generate"):
        check = code + "; print(callable(generate) and generate.__module__)"
        out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.strip() == "tramontane.generate", code
