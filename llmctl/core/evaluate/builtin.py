"""Small built-in datasets, generated deterministically at run time (no data files).

Each generator takes `(n, rng)` and returns `n` documents (dicts). Tasks select one with
`dataset: {builtin: NAME, size: N, seed: S}`; the few-shot split uses a different seed.
"""

from __future__ import annotations

import random
from typing import Callable

from llmctl.core.registry import Registry

BUILTIN_DATA: Registry[Callable[[int, random.Random], list[dict]]] = Registry("built-in dataset")

DETERMINERS = ["the", "a", "every", "no", "one"]
ADJECTIVES = ["big", "small", "red", "old", "young", "happy", "quiet", "clever"]
NOUNS = ["cat", "dog", "bird", "farmer", "child", "teacher", "horse", "robot"]
VERBS = ["sees", "likes", "follows", "helps", "finds", "calls", "watches", "feeds"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def sentence(rng: random.Random) -> list[str]:
    """A grammatical 'det adj noun verb det noun' sentence as words."""
    return [rng.choice(DETERMINERS), rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS),
            rng.choice(DETERMINERS), rng.choice(NOUNS)]


@BUILTIN_DATA.register("arithmetic")
def arithmetic(n: int, rng: random.Random) -> list[dict]:
    """Two-digit addition and subtraction: {'a', 'op', 'b', 'answer'}."""
    docs = []
    for _ in range(n):
        a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-")
        docs.append({"a": a, "op": op, "b": b, "answer": str(a + b if op == "+" else a - b)})
    return docs


@BUILTIN_DATA.register("word_order")
def word_order(n: int, rng: random.Random) -> list[dict]:
    """Pick the well-ordered sentence among 4 shuffles: {'choices', 'gold'} (chance = 25%)."""
    docs = []
    for _ in range(n):
        words = sentence(rng)
        choices = {" ".join(words)}
        while len(choices) < 4:
            choices.add(" ".join(rng.sample(words, len(words))))
        correct = " ".join(words)
        distractors = sorted(choices - {correct})
        rng.shuffle(distractors)
        gold = rng.randrange(4)
        docs.append({"choices": distractors[:gold] + [correct] + distractors[gold:], "gold": gold})
    return docs


def _letters(rng: random.Random) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(3, 8))]


@BUILTIN_DATA.register("copy")
def copy(n: int, rng: random.Random) -> list[dict]:
    """Repeat a sequence of letters: {'input', 'target'}."""
    return [{"input": " ".join(s), "target": " ".join(s)} for s in (_letters(rng) for _ in range(n))]


@BUILTIN_DATA.register("reverse")
def reverse(n: int, rng: random.Random) -> list[dict]:
    """Reverse a sequence of letters: {'input', 'target'}."""
    return [{"input": " ".join(s), "target": " ".join(reversed(s))} for s in (_letters(rng) for _ in range(n))]


def generate(name: str, n: int, seed: int) -> list[dict]:
    """`n` documents of the built-in dataset `name`, the same for the same seed."""
    return BUILTIN_DATA.get(name)(n, random.Random(f"{name}:{seed}"))
