"""Structural types of the objects the package takes from outside (a leaf module)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
    """What generation and evaluation use of a tokenizer: a Hugging Face
    `PreTrainedTokenizerFast` (`hf.load_tokenizer`, with the thought tokens added)
    satisfies it."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    all_special_ids: list[int]

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str: ...

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]: ...
