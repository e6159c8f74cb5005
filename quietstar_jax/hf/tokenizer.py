"""Hugging Face tokenizers with the two thought tokens.

`<|startthought|>` and `<|endthought|>` are added as special tokens through the
tokenizer's public `add_special_tokens` (as extra special tokens: never split, kept
by `save_pretrained`); the params grow to fit them (`hf.loading.grow_vocab` or
`load_params(vocab_size=len(tokenizer))`, the mean-row start of transformers'
`resize_token_embeddings`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quietstar_jax.hf.config import PathLike

START_THOUGHT_TOKEN = "<|startthought|>"
END_THOUGHT_TOKEN = "<|endthought|>"
# Named special tokens under which a tokenizer may record its thought tokens.
_THOUGHT_TOKEN_NAMES = {
    "start_thought_token": START_THOUGHT_TOKEN,
    "end_thought_token": END_THOUGHT_TOKEN,
}
THOUGHT_INIT_STRING = "---"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "spiece.model",
)


def load_tokenizer(path: PathLike) -> Any | None:
    """`transformers.AutoTokenizer` of directory `path`, or None when it holds no
    tokenizer files."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, where: str) -> None:
    """Raise ValueError (one line, both sizes) when the tokenizer has token ids past the
    model's `vocab_size` embedding rows, the two thought tokens excepted (those rows are
    added at load). Such ids would read rows the checkpoint does not have: a tokenizer
    from another model."""
    n = len(tokenizer)
    thought = {_token_id(tokenizer, t) for t in _THOUGHT_TOKEN_NAMES.values()}
    beyond = [i for i in range(vocab_size, n) if i not in thought]
    if beyond:
        raise ValueError(
            f"{where}: the tokenizer has {n} tokens but the model's embedding has "
            f"{vocab_size} rows (vocab_size in config.json); ids {beyond[0]}..{beyond[-1]} "
            "have no embedding (is the tokenizer from another model?)")


def _configured_thought_tokens(tokenizer: Any) -> dict[str, str]:
    """Thought tokens a tokenizer names (`start_thought_token`, `end_thought_token`):
    as named special tokens (`special_tokens_map`) or in the config it was loaded
    from (`init_kwargs`, maybe inside `extra_special_tokens`)."""
    found: dict[str, str] = {}
    init = getattr(tokenizer, "init_kwargs", None) or {}
    sources = [
        getattr(tokenizer, "special_tokens_map", None),
        init,
        init.get("model_specific_special_tokens"),
        init.get("extra_special_tokens"),
    ]
    for name in _THOUGHT_TOKEN_NAMES:
        for src in sources:
            if isinstance(src, Mapping) and src.get(name) is not None:
                found[name] = str(src[name])
                break
    return found


def _token_id(tokenizer: Any, token: str) -> int | None:
    """Id of `token` in the vocabulary (None when it is not a single known token)."""
    vocab = tokenizer.get_vocab()
    return int(vocab[token]) if token in vocab else None


def add_thought_tokens(tokenizer: Any) -> dict[str, int]:
    """Add `<|startthought|>` and `<|endthought|>` as special tokens (in place).

    Tokens already in the vocabulary are reused. A tokenizer that names other
    strings as its thought tokens (`start_thought_token`/`end_thought_token`) is an
    error. Returns `thought_token_ids(tokenizer)`.
    """
    for name, token in _configured_thought_tokens(tokenizer).items():
        if token != _THOUGHT_TOKEN_NAMES[name]:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} already has a different "
                f"thought token configured: {name}={token!r}, expected "
                f"{_THOUGHT_TOKEN_NAMES[name]!r}")
    from tokenizers import AddedToken

    new = [AddedToken(t, rstrip=False, lstrip=False, normalized=False, special=True)
           for t in _THOUGHT_TOKEN_NAMES.values()]
    try:
        tokenizer.add_special_tokens({"extra_special_tokens": new},
                                     replace_extra_special_tokens=False)
    except (TypeError, ValueError):  # transformers 4
        tokenizer.add_special_tokens({"additional_special_tokens": new},
                                     replace_additional_special_tokens=False)
    return thought_token_ids(tokenizer)


def thought_token_ids(tokenizer: Any) -> dict[str, int]:
    """`{"start_token_id", "end_token_id", "pad_token_id"}` of a tokenizer with thought
    tokens; pad is the tokenizer's pad id, else its eos id (as the authors use)."""
    ids = {}
    for key, token in (("start_token_id", START_THOUGHT_TOKEN),
                       ("end_token_id", END_THOUGHT_TOKEN)):
        tid = _token_id(tokenizer, token)
        if tid is None:
            raise ValueError(f"tokenizer has no {token!r} token; call add_thought_tokens first")
        ids[key] = tid
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    ids["pad_token_id"] = int(pad)
    return ids


def special_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The special tokens of a Hugging Face tokenizer (eos, bos, pad, unk, ...) other
    than the two thought tokens, which thought sampling masks anyway."""
    thought = {START_THOUGHT_TOKEN, END_THOUGHT_TOKEN}
    ids = {int(i) for i, t in zip(tokenizer.all_special_ids, tokenizer.all_special_tokens,
                                  strict=True) if t not in thought}
    ids |= {int(i) for i in (tokenizer.pad_token_id, tokenizer.eos_token_id,
                             tokenizer.bos_token_id) if i is not None}
    return tuple(sorted(ids))


def thought_init_token_id(tokenizer: Any, text: str | None = THOUGHT_INIT_STRING) -> int | None:
    """The first token id of `text` (no special tokens; the authors' "---"): the thought
    embeddings' init row. None when `text` is None (zero-initialised embeddings)."""
    if text is None:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"tokenizer encodes the thought init text {text!r} as no tokens")
    return int(ids[0])
