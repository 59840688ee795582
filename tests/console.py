"""`tramontane ARGS` run in this process: the CLI's `main` with stdin, stdout and stderr swapped for
strings, answering what `subprocess.run(..., capture_output=True, text=True)` would, without starting
Python and importing torch again for every command (about 2 s each on 2 cores, some fifty times a run).

    r = tramontane("info", str(folder), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["format"] == "hf"

The console script itself, a real process, is tested in test_cli.py."""

from __future__ import annotations

import io
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

import torch

from tramontane.cli import main


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def tramontane(*args: str, stdin: str = "") -> Ran:
    out, err = io.StringIO(), io.StringIO()
    threads, saved_stdin = torch.get_num_threads(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse: --help, or a bad option
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except Exception:  # --debug lets the error through: Python prints it and exits with 1
                traceback.print_exc()
                code = 1
    finally:
        sys.stdin = saved_stdin
        torch.set_num_threads(threads)  # `--threads N` sets this process's, as it would the command's
    return Ran(code, out.getvalue(), err.getvalue())
