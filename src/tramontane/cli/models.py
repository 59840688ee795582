"""`tramontane models`: the model cards, and which of them the cache holds."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    ms = sub.add_parser("models", parents=[common], help="list model cards and what the cache holds")
    ms.add_argument("--json", action="store_true", help="print a JSON list with every card's fields")
    ms.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..cards import load_cards
    from ..download import cache_home, cached

    rows: list[dict[str, Any]] = []
    for card in load_cards().values():
        folder = cached(card.name)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder else None
        rows.append({"name": card.name, "preset": card.preset, "format": card.format, "url": card.url,
                     "md5": card.md5, "sha256": card.sha256, "tokenizer": card.tokenizer, "hf_repo": card.hf_repo,
                     "card": card.source, "cached": str(folder) if folder else None, "size_bytes": size})
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"cards: built-in and user ({cache_home() / 'models'} holds the downloads)")
    for r in rows:
        where = f"cached, {r['size_bytes'] / 2**30:.2f} GiB" if r["cached"] else "not downloaded"
        print(f"{r['name']:<{width}}  {r['preset'] or '-':<16} {where}")
    return 0
