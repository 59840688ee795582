"""`tramontane COMMAND`: the parser (each command's options live in its own module) and the one place
errors become a line on stderr and an exit status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ..errors import CheckpointError, TokenizerError
from . import (
    answer,
    chat,
    classify,
    complete,
    convert,
    demo,
    download,
    embed,
    info,
    mask,
    merge,
    models,
    quantize,
    serve,
)
from .common import CliError, bounded

COMMANDS = [demo, chat, complete, classify, answer, embed, mask, serve, convert, merge, quantize, download, models, info]
DESCRIPTION = ("Run Mistral and Llama-shaped models: demo, chat, complete, classify, answer, embed, mask, serve, convert, "
               "merge, quantize, download, models, finetune, info.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tramontane", description=DESCRIPTION)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub, common)
    from ..finetune.cli import add_parser as add_finetune_parser

    add_finetune_parser(sub, common, bounded)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = a.func
    if getattr(a, "temperature", 0) is None:
        a.temperature = a.temperature_default
    try:
        return func(a)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:
        if a.debug:
            raise
        print(f"tramontane: error: {error_line(e)}", file=sys.stderr)
        return 1
    finally:
        from ..parallel.topology import shutdown

        shutdown()  # leave a torchrun job cleanly (nothing in one process)


def error_line(e: BaseException) -> str:
    """One line for the terminal: our own errors as they are; anything else (a bug, or a check we lack)
    with its type and a pointer to --debug, never a traceback."""
    text = " ".join(str(e).split())
    from ..parallel import ParallelError

    if isinstance(e, (CliError, CheckpointError, TokenizerError, ValueError, OSError, ParallelError)):
        return text
    return f"{type(e).__name__}: {text} (run with --debug for the traceback)"
