"""benchmarks/render_docs.py: docs/benchmarks.md is made from benchmarks/results/*.json and kept equal to it."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _renderer():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "benchmarks" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_page_names_every_results_file_and_shows_their_values(tmp_path):
    out = tmp_path / "benchmarks.md"
    assert _renderer().main(["--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    files = sorted(RESULTS.glob("*.json"))
    assert files
    for path in files:
        assert f"### {path.name}:" in page
    target = json.loads((RESULTS / "gguf_files.json").read_text())["targets"][0]
    assert f"| {target['target']} | {'PASS' if target['pass'] else 'MISS'} | {target['value']} |" in page


def test_a_new_results_file_shows_its_machine_ratios_and_verdicts(tmp_path):
    (tmp_path / "serve_made_up.json").write_text(json.dumps({
        "machine": {"cpu": "Test CPU 9000", "cores": 3, "date": "2030-01-01"},
        "rows": [{"clients": 7, "tok_s": 123.456}],
        "targets": [{"target": "made-up target", "ratio": 1.2345, "pass": False}],
    }))
    page = _renderer().render(tmp_path)
    assert "### serve_made_up.json: `benchmarks/serve.py`, Test CPU 9000" in page
    assert "| 7 | 123 |" in page
    assert "| made-up target | 1.23x | MISS |" in page
    assert "Targets: 0 PASS, 1 MISS." in page


def test_the_committed_page_equals_a_fresh_render():
    committed = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert committed == _renderer().render(), "docs/benchmarks.md is stale: run python benchmarks/render_docs.py"
