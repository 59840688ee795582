"""The shape of the source tree: no import circles among the package's modules (every import counted:
module level, TYPE_CHECKING and inside functions), so each module can be read after those it uses."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, whether it is a package's __init__)."""
    found = {}
    for path in (SRC / "tramontane").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (`from . import x` counts as x, not as the package)."""
    mods = modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, package) in mods.items():
        here = name if package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    base = f"{up}.{node.module}" if node.module else up
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                if target.startswith("tramontane") and (found := owner(target)) not in (None, name):
                    graph[name].add(found)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_circles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "tramontane.step_backends" in graph["tramontane.generate"]  # module level, relative
    assert "tramontane.loading" in graph["tramontane.loading.options"]  # inside a function: `from . import`
    assert "tramontane.parallel.topology" in graph["tramontane.model"]  # under TYPE_CHECKING
    assert "tramontane.cli.serve" in graph["tramontane.cli.main"]  # `from . import serve` is the module


def test_the_package_has_no_import_circles() -> None:
    assert circles(import_graph()) == []


KERNELS = SRC / "tramontane" / "kernels"
DECLARATION = re.compile(r"^(?![#\s])(?!return\b|using\b|typedef\b)[\w:<>,*& ]+?\b(\w+)\(([^;{}()]|\([^;{}()]*\))*\);",
                         re.M)


def includes(path: Path) -> set[str]:
    return set(re.findall(r'^#include "([\w.]+)"', path.read_text(), re.M))


def declared(header: str) -> set[str]:
    """The functions a header declares without defining them."""
    return {m.group(1) for m in DECLARATION.finditer(header)}


def test_declarations_are_read() -> None:
    text = ("torch::Tensor f(torch::Tensor x,\n    c10::optional<torch::Tensor> m);\nbool g();\n"
            "inline bool& h() {\n  return x;\n}\nconstexpr int64_t k = 5;\n#define D(x) y(x);\n")
    assert declared(text) == {"f", "g"}


def test_each_kernel_header_declares_only_what_its_own_source_defines() -> None:
    """A header X.h declares what X.cpp defines and nothing else, so no header names what a file that
    includes it defines (common.h once declared amx.cpp's functions while amx.cpp included it)."""
    for header in sorted(KERNELS.glob("*.h")):
        names = declared(header.read_text())
        if not names:
            continue
        source = header.with_suffix(".cpp")
        assert source.exists(), f"{header.name} declares {sorted(names)} but there is no {source.name}"
        defined = set(re.findall(r"\b(\w+)\((?:[^;{}()]|\([^;{}()]*\))*\)\s*(?:const\s*)?\{", source.read_text()))
        assert names <= defined, f"{header.name} declares {sorted(names - defined)}, which {source.name} does not define"


def test_kernel_includes_have_no_circle() -> None:
    graph = {p.name: includes(p) for p in [*KERNELS.glob("*.h"), *KERNELS.glob("*.cpp")]}
    assert circles(graph) == []
    assert "amx.h" in graph["dense.cpp"] and "common.h" in graph["amx.h"]  # the graph is read
