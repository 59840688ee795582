"""`tramontane answer QUESTION --context TEXT`: the answer span from a question-answering model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import CliError, bounded, model_parents, open_for


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    qa = sub.add_parser("answer", parents=[common, model_parents()],
                        help="find the answer to a question in a context with a question-answering model")
    qa.add_argument("question", help="the question")
    qa.add_argument("--context", required=True, help="the text the answer is taken from")
    qa.add_argument("--max-answer-tokens", type=bounded(int, 1), default=30, help="longest answer span (default 30)")
    qa.add_argument("--json", action="store_true", help="print a JSON object with the answer, score and span")
    qa.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..heads import TaskModel, answer

    opened = open_for(a)
    model, tokenizer = opened.model, opened.tokenizer
    if not isinstance(model, TaskModel) or model.task.kind != "qa":
        raise CliError(f"--model {opened.path}: not a question-answering model (its config.json must name a "
                       "*ForQuestionAnswering architecture)")
    context = tokenizer.encode(a.context, bos=False)
    try:
        span = answer(model, tokenizer.encode(a.question, bos=True), context, a.max_answer_tokens)
    except ValueError as e:
        raise CliError(str(e)) from e
    text = tokenizer.decode(context[span.start:span.end + 1]).strip()
    if a.json:
        print(json.dumps({"answer": text, "score": round(span.score, 6), "start_token": span.start,
                          "end_token": span.end}))
    else:
        print(f"{text}\t{span.score:.4f}")
    return 0
