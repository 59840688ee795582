"""`tramontane classify TEXT...`: labels from a sequence or token classification model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import CliError, model_parents, open_for


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    cl = sub.add_parser("classify", parents=[common, model_parents()],
                        help="label texts (or each of their tokens) with a classification model")
    cl.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify, one result each")
    cl.add_argument("--json", action="store_true", help="print a JSON list with every label's probability")
    cl.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..heads import TaskModel, classify

    opened = open_for(a)
    model, tokenizer = opened.model, opened.tokenizer
    if not isinstance(model, TaskModel) or model.task.kind == "qa":
        raise CliError(f"--model {opened.path}: not a classification model (its config.json must name a "
                       "*ForSequenceClassification or *ForTokenClassification architecture)")
    results = []
    for text in a.texts:
        ids = tokenizer.encode(text, bos=True)
        predictions = classify(model, ids)
        if model.task.kind == "sequence":
            p = predictions[0]
            results.append({"text": text, "label": p.label, "score": round(p.score, 6),
                            "scores": {k: round(v, 6) for k, v in p.scores.items()}})
            if not a.json:
                print(f"{p.label}\t{p.score:.4f}\t{text}")
            continue
        pieces = [tokenizer.id_to_piece(i) for i in ids]
        results.append({"text": text, "tokens": [{"token": t, "label": p.label, "score": round(p.score, 6)}
                                                 for t, p in zip(pieces, predictions)]})
        if not a.json:
            print(text)
            for t, p in zip(pieces, predictions):
                print(f"  {t!r:<20} {p.label}\t{p.score:.4f}")
    if a.json:
        print(json.dumps(results, indent=2))
    return 0
