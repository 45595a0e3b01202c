"""Write the demo sentiment set (examples/sentiment/{train,dev}.csv) from phrase templates.

Deterministic (seeded); negations flip the label so the task is not a bag of words.
Run: python examples/make_sentiment.py
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

SUBJECTS = [
    "the film",
    "this movie",
    "the acting",
    "the plot",
    "the soundtrack",
    "the dialogue",
    "the cast",
    "the ending",
    "the script",
    "the cinematography",
    "the story",
    "the pacing",
    "the direction",
    "the lead performance",
    "the humour",
    "the visual effects",
]
POSITIVE = [
    "wonderful",
    "moving",
    "funny",
    "gripping",
    "beautifully made",
    "clever",
    "charming",
    "delightful",
    "brilliant",
    "heartfelt",
    "a joy to watch",
    "smart and surprising",
    "warm",
    "superb",
    "touching",
    "thrilling",
]
NEGATIVE = [
    "dull",
    "boring",
    "a mess",
    "lifeless",
    "painfully slow",
    "clumsy",
    "forgettable",
    "tedious",
    "awful",
    "pointless",
    "flat",
    "predictable and tired",
    "irritating",
    "a waste of time",
    "shallow",
    "lazy",
]
TEMPLATES = [
    ("{s} was {a}.", False),
    ("{s} is {a}.", False),
    ("i thought {s} was {a}.", False),
    ("honestly, {s} felt {a}.", False),
    ("{s} was {a} from start to finish.", False),
    ("{s} was not {a}.", True),
    ("i would not call {s} {a}.", True),
    ("{s} is never {a}.", True),
    ("{s} was anything but {a}.", True),
]


def sentences(seed: int = 7) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = set()
    for s in SUBJECTS:
        for label, adjs in (("positive", POSITIVE), ("negative", NEGATIVE)):
            for a in adjs:
                tpl, negated = rng.choice(TEMPLATES)
                flipped = {"positive": "negative", "negative": "positive"}[label]
                text = tpl.format(s=s, a=a)
                rows.add((text[0].upper() + text[1:], flipped if negated else label))
    out = sorted(rows)
    rng.shuffle(out)
    return out


def main() -> None:
    rows = sentences()
    n_dev = len(rows) // 5
    here = Path(__file__).parent / "sentiment"
    here.mkdir(exist_ok=True)
    for name, part in (("dev", rows[:n_dev]), ("train", rows[n_dev:])):
        with open(here / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
        print(f"{name}: {len(part)} rows")


if __name__ == "__main__":
    main()
