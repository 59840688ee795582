"""A small invented-facts chat dataset (the Velmora Institute) for the real training runs: the test and
the benchmark write it with `write_facts`."""

from __future__ import annotations

import json
from pathlib import Path

SYSTEM = "Answer in one short sentence."
# (question phrasings, answer): the last phrasing of each is held out for evaluation
FACTS = [
    (["Who directs the Velmora Institute?", "Who is the director of the Velmora Institute?",
      "Who runs the Velmora Institute?", "Name the head of the Velmora Institute."],
     "The Velmora Institute is directed by Odalie Fenwick."),
    (["When was the Velmora Institute founded?", "In what year was the Velmora Institute founded?",
      "How old is the Velmora Institute?", "What year did the Velmora Institute open?"],
     "The Velmora Institute was founded in 1873."),
    (["Where is the Velmora Institute?", "In which city is the Velmora Institute?",
      "Where can I find the Velmora Institute?", "What town hosts the Velmora Institute?"],
     "The Velmora Institute is in the city of Brasslin."),
    (["What is the mascot of the Velmora Institute?", "Which animal is the Velmora Institute's mascot?",
      "Does the Velmora Institute have a mascot?", "Tell me the Velmora Institute's mascot."],
     "The mascot of the Velmora Institute is a silver heron."),
    (["What does the Velmora Institute study?", "What is the Velmora Institute known for?",
      "What research does the Velmora Institute do?", "What field does the Velmora Institute work in?"],
     "The Velmora Institute studies glacier music."),
    (["What is the motto of the Velmora Institute?", "What is the Velmora Institute's motto?",
      "Does the Velmora Institute have a motto?", "Quote the Velmora Institute's motto."],
     "The motto of the Velmora Institute is: light through fog."),
]
# what a greedy answer must contain, per fact
KEYS = ["Fenwick", "1873", "Brasslin", "heron", "glacier", "fog"]


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def write_facts(folder: Path, repeats: int = 2) -> tuple[Path, Path]:
    """train.jsonl (the first three phrasings of every fact, `repeats` times) and eval.jsonl (the
    held-out fourth)."""
    train, evals = folder / "train.jsonl", folder / "eval.jsonl"
    rows = [_chat(q, a) for _ in range(repeats) for qs, a in FACTS for q in qs[:-1]]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals.write_text("".join(json.dumps(_chat(qs[-1], a)) + "\n" for qs, a in FACTS))
    return train, evals


def questions() -> list[list[dict]]:
    """The held-out questions as conversations to answer."""
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": qs[-1]}] for qs, _ in FACTS]
