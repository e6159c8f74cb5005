"""Safetensors files of a Hugging Face checkpoint directory: reading and writing.

Reading: `model.safetensors`, or the shards named by `model.safetensors.index.json`
(its `weight_map`), opened lazily and read one tensor at a time. A file that
safetensors cannot read (truncated, overwritten, an interrupted download) is one
`ValueError` line: "<file>: not a readable safetensors file (<reason>) ...".

Writing: huggingface_hub plans the shards (`split_state_dict_into_shards_factory`:
tensors in order, a new shard when the next would pass `max_shard_size`, a larger
tensor alone) and names them as transformers does (`model.safetensors`, or
`model-00001-of-0000N.safetensors` and the standard index). Tensors are produced one
at a time by a callback, so no more than one shard is on the host at once.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_FILENAME_PATTERN = "model{suffix}.safetensors"


def damaged_file_message(file: Path, error: BaseException) -> str:
    """One line: a safetensors file that cannot be read, and why."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return (f"{file}: not a readable safetensors file ({reason}); the file is damaged or "
            "incomplete (an interrupted download or copy?)")


class SafetensorsCheckpoint:
    """Safetensors files of a checkpoint directory, opened lazily (each handle closed
    with `stack`); `key_file` maps every tensor name to its file, `where(key)` names
    the file that holds a tensor, `source` the file that lists them."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        self._stack = stack
        self._handles: dict[str, Any] = {}
        single, index = path / SAFE_WEIGHTS_NAME, path / SAFE_WEIGHTS_INDEX_NAME
        self.path = path
        if single.is_file():
            self.source = str(single)
            self.key_file = {k: SAFE_WEIGHTS_NAME for k in self._handle(SAFE_WEIGHTS_NAME).keys()}
        elif index.is_file():
            self.source = str(index)
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(
                    f"{index}: not a safetensors index (needs 'weight_map'): {e}") from e
            self.key_file = dict(weight_map)
            for name in sorted(set(self.key_file.values())):
                if not (path / name).is_file():
                    raise FileNotFoundError(f"{index}: shard file {name!r} is missing")
        else:
            others = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
            hint = f" (found {others}; only safetensors is supported)" if others else ""
            raise FileNotFoundError(
                f"{path}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}{hint}")

    def _handle(self, name: str) -> Any:
        """The open safetensors handle of file `name`."""
        if name not in self._handles:
            from safetensors import safe_open

            file = self.path / name
            try:
                handle = safe_open(str(file), framework="numpy")
            except Exception as e:  # noqa: BLE001 - SafetensorError is not importable by name
                raise ValueError(damaged_file_message(file, e)) from None
            self._handles[name] = self._stack.enter_context(handle)
        return self._handles[name]

    def where(self, key: str) -> str:
        """The file that holds tensor `key`."""
        return str(self.path / self.key_file[key])

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of tensor `key` (read from the header only)."""
        handle = self._handle(self.key_file[key])
        if key not in handle.keys():
            raise KeyError(f"{self.where(key)}: tensor {key!r} listed in the index is not in "
                           "the file")
        return tuple(handle.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        """Tensor `key` as a numpy array."""
        handle = self._handle(self.key_file[key])
        try:
            return handle.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
            raise ValueError(damaged_file_message(Path(self.where(key)), e)) from None


def write_safetensors(
    directory: Path,
    sizes: Mapping[str, int],
    tensor: Callable[[str], np.ndarray],
    *,
    max_shard_size: int | str,
    write: bool = True,
) -> dict[str, str]:
    """Write tensors `sizes` (name -> bytes, in file order) into `directory` as
    transformers names them: one `model.safetensors`, or shards of at most
    `max_shard_size` (bytes, or a string such as "5GB"; huggingface_hub's planner)
    plus `model.safetensors.index.json`. `tensor(name)` makes each array when its
    shard is written. With `write=False` the tensors are still made (in the same
    order, for collective gathers across processes) but nothing is written. Returns
    the weight map (tensor name -> file name)."""
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors import numpy as st_numpy

    split = split_state_dict_into_shards_factory(
        dict(sizes), get_storage_size=int, filename_pattern=_FILENAME_PATTERN,
        max_shard_size=max_shard_size)
    for name, keys in split.filename_to_tensors.items():
        tensors = {key: tensor(key) for key in keys}
        if write:
            st_numpy.save_file(tensors, str(directory / name), metadata={"format": "pt"})
        del tensors
    if write and split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2))
    return dict(split.tensor_to_filename)

