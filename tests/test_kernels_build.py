"""The native kernels are built at install time, and a run-time build can never wait on a dead one."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tramontane import kernels
from tramontane.kernels.sources import build_name, digest


def test_installed_build_is_used_and_nothing_compiles(tmp_path):
    """After `make setup` the first command finds the build made at install time: it compiles nothing
    and says nothing (an empty extensions folder stays empty)."""
    code = "from tramontane.kernels import load_kernels; print(load_kernels().__name__, load_kernels().DIGEST)"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert r.stdout.split() == ["tramontane.kernels._native", digest(torch.__version__)]
    assert "building" not in r.stderr
    assert not any(tmp_path.iterdir())


def test_digest_follows_the_sources_and_build_names_the_checkout(monkeypatch, tmp_path):
    from tramontane.kernels import sources

    before, name = digest(torch.__version__), build_name(torch.__version__)
    assert name.startswith(before)
    assert digest("0.0.0") != before
    changed = tmp_path / "extra.h"
    changed.write_text("// another header\n")
    monkeypatch.setattr(sources, "HEADERS", [*sources.HEADERS, changed])
    assert digest(torch.__version__) != before
    monkeypatch.setattr(sources, "HERE", tmp_path)
    assert build_name(torch.__version__).split("_")[1] != name.split("_")[1]


def test_stale_torch_lock_is_cleared_under_our_lock(tmp_path):
    (tmp_path / "lock").write_text("")  # what an interrupted torch build leaves behind
    with kernels._exclusive(tmp_path):
        assert not (tmp_path / "lock").exists()
        # another process cannot take the folder while we hold it...
        with open(tmp_path / "tramontane.lock") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # ...and can once we are done
    with open(tmp_path / "tramontane.lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(60)"), str(tmp_path / "tramontane.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    Path(tmp_path / "lock").write_text("")
    with kernels._exclusive(tmp_path):  # returns at once: the dead process's lock went with it
        assert not (tmp_path / "lock").exists()
