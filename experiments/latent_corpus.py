"""Two-step problems whose documents either write out or skip the intermediate value.

Fixed functions (F, G, H, K, ...), each a random permutation of 36 one-byte entities
(a-z, 0-9), are the arithmetic of this world. A problem asks for `outer(inner(x))`:

    explicit:  F(G(k))=;m;q      the intermediate m = G(k) between delimiters, then q = F(m)
    skipped:   F(G(k))=q         the answer directly

A document holds several problems in one form, one per line. Each step alone is a
fact the explicit documents teach (every function at every entity); the skipped form
asks for their composition in one forward pass, which shallow transformers are known
to learn only by memorising each composite (no latent two-hop composition for unseen
pairs).

Tasks (`TASKS`; `task=` everywhere, default `DEFAULT_TASK`):
- "semi6" (default): 6 functions, 6 * 6 * 36 = 1296 problems, worked step delimited by
  ";". No document contains "-", the byte the thought embeddings start from (the
  authors' "---"), so the initialisation cannot write the worked step: a thought that
  holds the intermediate has to be learnt. Five times the compositions of "dash4", so
  the held-out composites cannot be looked up among memorised ones.
- "dash4": the first task (4 functions, 576 problems, delimiter "-", the thought
  init's own byte, so "start-of-thought, m, end-of-thought" reads like a worked step
  before any training: docs/EXPERIMENTS.md, status).

The problems are split by a fixed hash of their question into train, tune and eval:
held-out documents ask for compositions never seen in training, while every single
step they need was seen (each `inner(x)` and `outer(m)` occurs in training problems;
the tests check it).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import numpy as np

ENTITIES = "abcdefghijklmnopqrstuvwxyz0123456789"
ALL_FUNCTIONS = "FGHKLM"  # TABLES covers every task's functions
SPLITS = ("train", "tune", "eval")
_SPLIT_BOUNDS = (0.8, 0.9)  # train < 0.8 <= tune < 0.9 <= eval
_TABLE_SEED = 2024


@dataclasses.dataclass(frozen=True)
class Task:
    """A corpus: its functions and the byte that opens and closes a worked step."""

    name: str
    functions: str
    delim: str


TASKS = {"semi6": Task("semi6", "FGHKLM", ";"), "dash4": Task("dash4", "FGHK", "-")}
DEFAULT_TASK = "semi6"
FUNCTIONS = TASKS[DEFAULT_TASK].functions


def get_task(task: str | Task | None) -> Task:
    if isinstance(task, Task):
        return task
    name = DEFAULT_TASK if task is None else task
    if name not in TASKS:
        raise ValueError(f"task={name!r} must be one of {sorted(TASKS)}")
    return TASKS[name]


def _tables() -> dict[str, dict[str, str]]:
    # Seeded by the function's index, so the first task's tables (F, G, H, K) are unchanged.
    out = {}
    for i, f in enumerate(ALL_FUNCTIONS):
        perm = np.random.default_rng([_TABLE_SEED, i]).permutation(len(ENTITIES))
        out[f] = {x: ENTITIES[int(j)] for x, j in zip(ENTITIES, perm, strict=True)}
    return out


TABLES = _tables()  # TABLES[f][x] = f(x)


def apply(f: str, x: str) -> str:
    """`f(x)` for a function name of ALL_FUNCTIONS and an entity of ENTITIES."""
    if f not in TABLES:
        raise ValueError(f"unknown function {f!r}; expected one of {ALL_FUNCTIONS!r}")
    return TABLES[f][x]


@dataclasses.dataclass(frozen=True)
class Problem:
    """`outer(inner(x))`; `delim` opens and closes its worked step."""

    outer: str
    inner: str
    x: str
    # Not part of the problem's identity: the same composition in either task is equal.
    delim: str = dataclasses.field(default=TASKS[DEFAULT_TASK].delim, compare=False)

    @property
    def intermediate(self) -> str:
        return apply(self.inner, self.x)

    @property
    def answer(self) -> str:
        return apply(self.outer, self.intermediate)

    @property
    def question(self) -> str:
        """The text both forms share, up to and including "="."""
        return f"{self.outer}({self.inner}({self.x}))="

    def text(self, explicit: bool) -> str:
        """One line: the question, then ";m;q" (explicit; `delim`) or "q" (skipped), newline."""
        d = self.delim
        body = f"{d}{self.intermediate}{d}{self.answer}" if explicit else self.answer
        return f"{self.question}{body}\n"


def split_of(p: Problem) -> str:
    """The split a problem belongs to (a fixed hash of its question; the same everywhere)."""
    h = int.from_bytes(hashlib.sha256(p.question.encode()).digest()[:8], "little")
    u = h / 2.0**64
    return SPLITS[int(u >= _SPLIT_BOUNDS[0]) + int(u >= _SPLIT_BOUNDS[1])]


def all_problems(task: str | Task | None = None) -> list[Problem]:
    t = get_task(task)
    fs = t.functions
    return [Problem(o, i, x, t.delim) for o in fs for i in fs for x in ENTITIES]


def problems_of(split: str, task: str | Task | None = None) -> list[Problem]:
    """Every problem of `split`, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    return [p for p in all_problems(task) if split_of(p) == split]


@dataclasses.dataclass(frozen=True)
class Document:
    """`problems` written in one form; `text` is their lines joined."""

    problems: tuple[Problem, ...]
    explicit: bool

    @property
    def text(self) -> str:
        return "".join(p.text(self.explicit) for p in self.problems)


def make_document(split: str, seed: int, index: int, *, explicit_frac: float = 0.5,
                  max_chars: int = 60, pool: list[Problem] | None = None,
                  task: str | Task | None = None) -> Document:
    """Document `index` of (`split`, `seed`): always the same. Its form is explicit with
    probability `explicit_frac`; it holds as many problems as fit in `max_chars`."""
    pool = problems_of(split, task) if pool is None else pool
    rng = np.random.default_rng([seed, index, SPLITS.index(split)])
    explicit = bool(rng.random() < explicit_frac)
    per = len(pool[0].text(explicit))
    n = max(1, max_chars // per)
    picks = rng.integers(len(pool), size=n)
    return Document(tuple(pool[int(i)] for i in picks), explicit)


def documents(split: str, seed: int, count: int, *, explicit_frac: float = 0.5,
              max_chars: int = 60, task: str | Task | None = None) -> Iterator[Document]:
    """The first `count` documents of (`split`, `seed`)."""
    pool = problems_of(split, task)
    for i in range(count):
        yield make_document(split, seed, i, explicit_frac=explicit_frac, max_chars=max_chars,
                            pool=pool)


def answer_offsets(doc: Document) -> list[tuple[int, Problem]]:
    """(character offset of each problem's answer in `doc.text`, problem)."""
    out, start = [], 0
    for p in doc.problems:
        line = p.text(doc.explicit)
        out.append((start + len(line) - 2, p))  # the answer is the last char before "\n"
        start += len(line)
    return out


def parse_line(line: str) -> tuple[Problem, str | None, str]:
    """Read one line back: (problem, written intermediate or None, written answer)."""
    q, body = line.rstrip("\n").split("=", 1)
    if len(body) > 1:  # explicit: delim, m, delim, answer
        d = body[0]
        _, m, a = body.split(d)
        return Problem(q[0], q[2], q[4], d), m, a
    return Problem(q[0], q[2], q[4]), None, body
