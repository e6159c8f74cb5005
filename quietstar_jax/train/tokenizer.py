"""Tokenizers the trainer uses: a byte-level one needing no files, and a wrapper
giving a Hugging Face tokenizer (with the thought tokens added) the same face.

Both offer `encode(text, add_bos) -> list[int]`, `decode(ids) -> str`,
`thought_token_ids() -> {start_token_id, end_token_id, pad_token_id}`,
`special_token_ids()` (eos, bos, pad, ...; not the thought tokens), `eos_token_id`,
`init_token_id(text)` (first id of `text`, default "---": the thought embeddings'
init row; None for None) and
`vocab_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

THOUGHT_INIT_STRING = "---"


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def thought_token_ids(self) -> dict[str, int]: ...

    def special_token_ids(self) -> tuple[int, ...]: ...

    def init_token_id(self, text: str | None = THOUGHT_INIT_STRING) -> int | None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then `<eos>` (also the pad) 256, `<bos>` 257,
    `<|startthought|>` 258, `<|endthought|>` 259. Vocabulary size 260."""

    eos_token_id = 256
    pad_token_id = 256
    bos_token_id = 257
    start_thought_id = 258
    end_thought_id = 259
    vocab_size = 260
    _SPECIAL = {256: "<eos>", 257: "<bos>", 258: "<|startthought|>", 259: "<|endthought|>"}

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids become their names, broken UTF-8 becomes U+FFFD."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(self._SPECIAL.get(i, f"<{i}>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def thought_token_ids(self) -> dict[str, int]:
        return {"start_token_id": self.start_thought_id, "end_token_id": self.end_thought_id,
                "pad_token_id": self.pad_token_id}

    def special_token_ids(self) -> tuple[int, ...]:
        """`<eos>` (also the pad) and `<bos>`."""
        return (self.eos_token_id, self.bos_token_id)

    def init_token_id(self, text: str | None = THOUGHT_INIT_STRING) -> int | None:
        """First byte of `text` (the thought embeddings' init row); None for None."""
        if text is None:
            return None
        ids = self.encode(text, add_bos=False)
        if not ids:
            raise ValueError(f"the thought init text {text!r} encodes as no tokens")
        return ids[0]


class HFTokenizer:
    """A `transformers` tokenizer that already holds the thought tokens
    (`hf.load_pretrained` adds them)."""

    def __init__(self, tokenizer: Any):
        from quietstar_jax import hf

        self.hf_tokenizer = tokenizer
        self._ids = hf.thought_token_ids(tokenizer)
        self.vocab_size = len(tokenizer)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of `text`; with `add_bos` the tokenizer's own special tokens are added
        (a BOS for Llama/Mistral tokenizers)."""
        return list(self.hf_tokenizer(text, add_special_tokens=add_bos)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf_tokenizer.decode([int(i) for i in ids])

    def thought_token_ids(self) -> dict[str, int]:
        return dict(self._ids)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf_tokenizer.eos_token_id

    def special_token_ids(self) -> tuple[int, ...]:
        from quietstar_jax import hf

        return hf.special_token_ids(self.hf_tokenizer)

    def init_token_id(self, text: str | None = THOUGHT_INIT_STRING) -> int | None:
        """First token id of `text` (the thought embeddings' init row); None for None."""
        from quietstar_jax import hf

        return hf.thought_init_token_id(self.hf_tokenizer, text)


def token_pieces(tokenizer: TextTokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded string (keeps SentencePiece spaces,
    which decoding tokens one by one would drop). A token that ends inside a
    multi-byte character adds "" and the character goes to the token completing it."""
    pieces, prev = [], ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        if text.endswith("\ufffd") and n < len(ids):
            pieces.append("")
            continue
        pieces.append(text[len(prev):] if text.startswith(prev)
                      else tokenizer.decode(ids[n - 1:n]))
        prev = text
    return pieces
