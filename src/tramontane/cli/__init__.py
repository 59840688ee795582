"""The `tramontane` command line: one module per command (`tramontane COMMAND --help`), the options they
share in `common`, the parser and error handling in `main`."""

from ..loading.options import demo_model_path
from .main import build_parser, main

__all__ = ["build_parser", "demo_model_path", "main"]
