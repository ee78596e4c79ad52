"""Regenerate ``sentiment.jsonl``: short review-like sentences with a learnable rule.

    python examples/data/make_sentiment.py     # rewrites examples/data/sentiment.jsonl (deterministic)

Each sentence says a thing was (very/quite/...) good or bad; a "not" before the adjective flips
it. The label is 1 for a positive sentence, 0 for a negative one. About a third of the sentences
are negated, so counting positive and negative words alone tops out near 67% accuracy: a model
has to read word order to do better.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["good", "great", "excellent", "lovely", "pleasant", "superb", "fun", "wonderful"]
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible", "poor", "bland", "horrible"]
SUBJECTS = ["the movie", "the food", "this book", "the service", "our trip", "the show", "that song",
            "the hotel", "the game", "my lunch", "the play", "the concert"]
INTENSIFIERS = ["", "", "very", "quite", "really", "truly", "rather"]
ENDINGS = ["", "", "overall", "today", "to be honest", "i think", "again"]
NUM_SENTENCES = 400
PATH = Path(__file__).with_name("sentiment.jsonl")


def make_rows(n: int = NUM_SENTENCES, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive_word = rng.random() < 0.5
        negated = rng.random() < 1 / 3
        adjective = rng.choice(POSITIVE if positive_word else NEGATIVE)
        words = [rng.choice(SUBJECTS), "was", "not" if negated else "", rng.choice(INTENSIFIERS), adjective,
                 rng.choice(ENDINGS)]
        rows.append({"text": " ".join(w for w in words if w), "label": int(positive_word != negated)})
    return rows


def write(path: Path = PATH) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows()), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write())
