"""Evaluation data: dataset readers, the authors' prompt formats, valid answer tokens.

Datasets come from a local file (jsonl; GSM8K `{"question", "answer"}`, CommonsenseQA
in the Hugging Face flat schema or the original nested one) or, when reachable, from
Hugging Face `datasets` (`hf:<name>`) or TensorFlow Datasets (`tfds:<name>`).

Direct-answer prompts (docs/ALGORITHM.md, section 11: Evaluation with thoughts; the
authors' `eval_helpers.py`):

* GSM8K: `"Q: " + question + "\\nA:" + answer.split("####")[-1] + "\\n"`, i.e.
  `"Q: ...\\nA: 72\\n"`; scored tokens are those after the first answer token (the
  space piece) that are valid: digits and newline.
* CommonsenseQA: `"Q: " + question + "\\n(A) ...\\n(B) ...\\n...(E) ..." + "\\nA:" +
  " " + answerKey + "\\n"`; scored tokens are the answer's valid tokens: the five
  choice letters and newline.

Valid token ids are derived from the tokenizer, not hard-coded (the authors used
Mistral's): the id of character c is the LAST id of `tokenizer.encode(c)` for digits
and newline, and of `tokenizer.encode(" " + c)` for the letters, without special
tokens (so a SentencePiece dummy-prefix piece "▁" in front is dropped), and it must
decode to c alone. Digits must be single tokens (checked on "0123456789"): the
metric is per digit. For stories260K: digits are the pieces "0".."9", newline is the
byte-fallback piece <0x0A> (id 13), B is the merged piece "▁B" while A, C, D, E are
bare letter pieces that follow a separate "▁" piece in the prompt (that "▁" is not a
valid token, so it is skipped, as the authors skip every non-valid answer token).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quietstar_jax.protocols import Tokenizer

ANSWER_MARKER = "\nA:"
LETTERS = "ABCDE"
DIGITS = "0123456789"
COT_PROMPT = "\nA: Let's think step by step."
COT_FINAL_ANSWER = "\nTherefore, the answer (arabic numerals) is"
HF_NAMES = {"gsm8k": ("openai/gsm8k", "main"), "csqa": ("tau/commonsense_qa", None)}
DEFAULT_SPLITS = {"gsm8k": "test", "csqa": "validation"}
_LOCAL_FILES = {"gsm8k": ("test.jsonl",), "csqa": ("dev_rand_split.hf.jsonl",
                                                    "dev_rand_split.jsonl", "validation.jsonl")}


# --------------------------------------------------------------------------- readers


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """One JSON object per non-empty line; a bad line is an error naming it."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def _from_hf(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {name!r} from the Hugging Face hub needs the `datasets` "
                          "package (pip install datasets); or pass a local jsonl file") from None
    ds = datasets.load_dataset(name, config, split=split)
    return [dict(r) for r in ds]


def _decode(x: Any) -> Any:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, dict):
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_decode(v) for v in x]
    if hasattr(x, "tolist"):
        return _decode(x.tolist())
    return x


def _from_tfds(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(f"reading {name!r} from TensorFlow Datasets needs the "
                          "`tensorflow-datasets` package; or pass a local jsonl file") from None
    ds = tfds.data_source(name, split=split)
    return [_decode(dict(r)) for r in ds]


def load_rows(task: str, source: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Raw rows of `task` ("gsm8k" or "csqa") from `source`.

    source: a jsonl file, a directory holding the task's usual file name (GSM8K
    `test.jsonl`, CommonsenseQA `dev_rand_split.hf.jsonl`), `hf:<name>` (Hugging Face
    datasets, e.g. `hf:openai/gsm8k`; `hf` alone: the task's default) or
    `tfds:<name>` (TensorFlow Datasets). split defaults to test / validation.
    """
    if task not in DEFAULT_SPLITS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(DEFAULT_SPLITS)}")
    split = split or DEFAULT_SPLITS[task]
    src = str(source)
    if src == "hf" or src.startswith("hf:"):
        name, config = HF_NAMES[task] if src == "hf" else (src[3:], HF_NAMES[task][1])
        return _from_hf(name, config, split)
    if src.startswith("tfds:"):
        return _from_tfds(src[5:], split)
    path = Path(src)
    if path.is_dir():
        found = [path / f for f in _LOCAL_FILES[task] if (path / f).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no {' or '.join(_LOCAL_FILES[task])} for {task}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{task} data {src!r} is not a file, a directory, hf:<name> "
                                "or tfds:<name>")
    return read_jsonl(path)


def gsm8k_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Validate GSM8K rows: each needs string `question` and `answer` (with `####`)."""
    out = []
    for n, r in enumerate(rows):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise ValueError(f"GSM8K row {n} lacks string fields 'question' and 'answer'")
        if "####" not in r["answer"]:
            raise ValueError(f"GSM8K row {n}: answer has no '####' final-answer marker")
        out.append({"question": r["question"], "answer": r["answer"]})
    return out


def csqa_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """CommonsenseQA rows as `{"question", "labels", "texts", "answerKey"}`, from the
    Hugging Face flat schema (`question`, `choices: {label, text}`) or the original
    one (`question: {stem, choices: [{label, text}]}`)."""
    out = []
    for n, r in enumerate(rows):
        q, ch = r.get("question"), r.get("choices")
        if isinstance(q, dict):
            ch = q.get("choices")
            q = q.get("stem")
            ch = {"label": [c["label"] for c in ch], "text": [c["text"] for c in ch]}
        if not isinstance(q, str) or not isinstance(ch, dict) or "answerKey" not in r:
            raise ValueError(f"CommonsenseQA row {n}: expected question, choices and answerKey")
        labels, texts = list(ch["label"]), list(ch["text"])
        if r["answerKey"] not in labels or len(labels) != len(texts):
            raise ValueError(f"CommonsenseQA row {n}: answerKey {r['answerKey']!r} is not one "
                             f"of the choice labels {labels}")
        bad = [lab for lab in labels if lab not in LETTERS]
        if bad:
            raise ValueError(f"CommonsenseQA row {n}: choice labels {bad} are not in {LETTERS}")
        out.append({"question": q, "labels": labels, "texts": texts, "answerKey": r["answerKey"]})
    return out


# --------------------------------------------------------------------------- prompts


def gsm8k_text(question: str, answer: str) -> str:
    """The authors' GSM8K direct-answer text (the answer's part after the last ####)."""
    return "Q: " + question + ANSWER_MARKER + answer.split("####")[-1] + "\n"


def csqa_text(question: str, labels: Sequence[str], texts: Sequence[str], key: str) -> str:
    """The authors' CommonsenseQA direct-answer text."""
    choices = "\n".join(f"({lab}) {t}" for lab, t in zip(labels, texts, strict=True))
    return "Q: " + question + "\n" + choices + ANSWER_MARKER + " " + key + "\n"


def cot_prompt(question: str) -> str:
    """The authors' zero-shot chain-of-thought prompt."""
    return "Q: " + question + COT_PROMPT


# --------------------------------------------------------------------------- tokens


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _char_token(tokenizer: Tokenizer, text: str, char: str) -> int:
    """The last id of `text`'s encoding, which must decode to `char` alone."""
    ids = _encode(tokenizer, text)
    if not ids:
        raise ValueError(f"tokenizer encodes {text!r} as no tokens")
    got = tokenizer.decode([ids[-1]])
    if got != char and (not char.strip() or got.strip() != char.strip()):
        raise ValueError(f"tokenizer has no single token for {char!r}: {text!r} ends in "
                         f"{got!r}; the authors' metric needs one token per answer character")
    return int(ids[-1])


def newline_token_id(tokenizer: Tokenizer) -> int:
    """Id of "\\n" (for SentencePiece byte fallback, the piece <0x0A>)."""
    return _char_token(tokenizer, "\n", "\n")


def gsm8k_valid_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the digits 0..9 then newline; raises if the tokenizer merges digits."""
    digits = [_char_token(tokenizer, d, d) for d in DIGITS]
    run = _encode(tokenizer, DIGITS)
    if run[-10:] != digits:
        raise ValueError(f"tokenizer does not encode {DIGITS!r} one token per digit "
                         f"({run}); the authors' per-digit GSM8K metric does not apply")
    return digits + [newline_token_id(tokenizer)]


def csqa_valid_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of " A" .. " E" (their letter-carrying last token) then newline."""
    letters = [_char_token(tokenizer, " " + c, c) for c in LETTERS]
    if len(set(letters)) != len(letters):
        raise ValueError(f"tokenizer maps two choice letters to one token: {letters}")
    return letters + [newline_token_id(tokenizer)]


def marker_end(tokenizer: Tokenizer, ids: Sequence[int], marker: str = ANSWER_MARKER) -> int:
    """Index of the token that completes the LAST occurrence of `marker`.

    As the authors find it: the largest i such that `decode(ids[:i])` holds fewer
    markers than the whole text, so token i completes the last one (binary search;
    the count is monotone in i).
    """
    total = tokenizer.decode(list(ids)).count(marker)
    if total == 0:
        raise ValueError(f"answer marker {marker!r} not found in the prompt")
    lo, hi = 0, len(ids)  # count(ids[:lo]) < total <= count(ids[:hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokenizer.decode(list(ids[:mid])).count(marker) < total:
            lo = mid
        else:
            hi = mid
    return lo


@dataclasses.dataclass(frozen=True)
class AnswerExample:
    """One direct-answer example.

    ids: the prompt's token ids (BOS first when the tokenizer adds one).
    positions: prediction indices j whose logits are scored (they predict ids[j + 1]).
    targets: for each, the index of ids[j + 1] in the valid id list.
    """

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    targets: tuple[int, ...]


def answer_targets(
    ids: Sequence[int], first: int, valid_ids: Sequence[int], pad_id: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The authors' scored tokens: for j = first .. len - 2 with target ids[j + 1],
    stop at a pad target, skip targets that are not valid tokens.
    Returns (positions j, target indices into valid_ids)."""
    index = {t: k for k, t in enumerate(valid_ids)}
    pos, tgt = [], []
    for j in range(first, len(ids) - 1):
        t = ids[j + 1]
        if pad_id is not None and t == pad_id:
            break
        if t in index:
            pos.append(j)
            tgt.append(index[t])
    return tuple(pos), tuple(tgt)


def build_examples(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    valid_ids: Sequence[int],
    *,
    skip_first: bool,
    pad_id: int | None,
    max_length: int | None = None,
) -> list[AnswerExample]:
    """Tokenize direct-answer texts (with special tokens) and locate the scored tokens.

    skip_first: skip the first answer token (GSM8K, as the authors). A text longer
    than max_length keeps its last max_length tokens (the authors cut a random
    window, which can cut the answer off).
    """
    out = []
    for n, text in enumerate(texts):
        ids = list(tokenizer(text)["input_ids"])
        first = marker_end(tokenizer, ids) + (1 if skip_first else 0)
        if max_length is not None and len(ids) > max_length:
            cut = len(ids) - max_length
            ids, first = ids[cut:], max(0, first - cut)
        pos, tgt = answer_targets(ids, first, valid_ids, pad_id)
        if not pos:
            raise ValueError(f"example {n}: no valid answer token to score in {text[-40:]!r}")
        out.append(AnswerExample(tuple(ids), pos, tgt))
    return out
