"""`tramontane download NAME_OR_URL`: a model card's files (or a URL) into the cache, checksum verified."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import CliError


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    dl = sub.add_parser("download", parents=[common],
                        help="download a model by card name (or URL) into the cache, checksum verified")
    dl.add_argument("model", metavar="NAME_OR_URL", help="a model card's name (`tramontane models`) or an http(s) URL")
    dl.add_argument("--md5", default=None, help="with a URL: its md5 sum")
    dl.add_argument("--sha256", default=None, help="with a URL: its sha256 sum")
    dl.add_argument("--name", default=None, help="with a URL: the model's name in the cache (default: the file name)")
    dl.add_argument("--file", action="store_true", help="with a URL: a single file (a .gguf), not a tar archive")
    dl.add_argument("--offline", action="store_true", help="never download: print the cached folder or fail")
    dl.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..cards import find_card
    from ..download import cached, download_card, fetch

    if "://" in a.model:
        name = a.name or Path(a.model.split("?")[0]).name.removesuffix(".tar")
        if a.offline:
            folder = cached(name)
        else:
            if a.md5 is None and a.sha256 is None:
                raise CliError("a URL needs --md5 or --sha256: downloads are verified before use")
            folder = fetch(a.model, name, md5=a.md5, sha256=a.sha256, archive=not a.file)
    else:
        try:
            card = find_card(a.model)
        except KeyError as e:
            raise CliError(str(e.args[0])) from e
        folder = cached(card.name) if a.offline else download_card(card)
    if folder is None:
        raise CliError(f"{a.model}: not in the cache and --offline forbids downloading it")
    print(folder)
    return 0
