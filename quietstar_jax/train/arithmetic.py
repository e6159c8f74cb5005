"""Arithmetic word problems with worked answers, generated from a seed.

Document `i` of seed `s` is always the same text (its generator is seeded by
`(s, i)`), so a generated corpus needs no storage and supports random access.
"""

from __future__ import annotations

import numpy as np

_NAMES = ("Ana", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kim", "Leo")
_ITEMS = ("apples", "pens", "coins", "books", "shells", "stamps", "cards", "eggs", "cups")


def _problem(rng: np.random.Generator) -> str:
    name = _NAMES[rng.integers(len(_NAMES))]
    item = _ITEMS[rng.integers(len(_ITEMS))]
    kind = int(rng.integers(4))
    a, b, c = (int(x) for x in rng.integers(2, 50, size=3))
    if kind == 0:
        total = a + b
        steps = f"{a} + {b} = {total}."
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have?"
    elif kind == 1:
        a = a + b
        total = a - b
        steps = f"{a} - {b} = {total}."
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
    elif kind == 2:
        a, b = a % 12 + 2, b % 9 + 2
        total = a * b
        steps = f"{a} * {b} = {total}."
        q = f"{name} buys {a} bags with {b} {item} in each. How many {item} is that?"
    else:
        mid = a + b
        total = mid - min(c, mid - 1)
        c = mid - total
        steps = f"{a} + {b} = {mid}. {mid} - {c} = {total}."
        q = (f"{name} has {a} {item}, finds {b} more and then loses {c}. "
             f"How many {item} does {name} have now?")
    return f"Q: {q}\nA: {steps} The answer is {total}.\n"


def arithmetic_document(seed: int, index: int, problems: int = 1) -> str:
    """Document `index` of the corpus `seed`: `problems` worked problems."""
    rng = np.random.default_rng([seed, index])
    return "".join(_problem(rng) for _ in range(problems))
