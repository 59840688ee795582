"""Print the requirements of the package with the given extras (`python tools/requirements.py dev`), one
per line, extras of extras included: what `make setup` installs beside the package itself, so that pip
can fetch them while the package's kernels compile."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from setuptools.config.pyprojecttoml import read_configuration  # (tomllib is Python 3.11's, we support 3.10)

project = read_configuration(Path(__file__).resolve().parents[1] / "pyproject.toml")["project"]
name = project["name"]
extras: dict[str, list[str]] = project.get("optional-dependencies", {})


def requirements(wanted: list[str], seen: set[str]) -> list[str]:
    out: list[str] = []
    for extra in wanted:
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in extras:
            raise SystemExit(f"tools/requirements.py: pyproject.toml has no extra {extra!r}")
        for req in extras[extra]:
            own = re.fullmatch(rf"{name}\[([\w,\s-]+)\]", req)
            out += requirements([e.strip() for e in own.group(1).split(",")], seen) if own else [req]
    return out


print("\n".join(dict.fromkeys(project["dependencies"] + requirements(sys.argv[1:], set()))))
