"""Training text -> token batches, deterministic, shardable across processes, resumable.

A *source* is a random-access list of documents (`len(source)`, `source[i] -> str`):
generated arithmetic problems, local files (plain text, jsonl, parquet), a
tensorflow-datasets `data_source` (no TensorFlow needed) or a Hugging Face dataset.

`TokenBatches` walks a source epoch by epoch. Each epoch has a seeded permutation of
the documents; process `p` of `P` takes every `P`-th document of it (all processes
take the same number). A document becomes one row: its tokens, cut to a random
window of `seq_len` when longer (the window's offset is drawn from a generator
seeded by `(seed, epoch, document)`), right-padded with `pad_id` when shorter, as
the authors did. Its position, `DataState(epoch, index)`, is a small JSON-able dict
saved with each checkpoint; restoring it continues with the next unseen batch.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from quietstar_jax.train.arithmetic import arithmetic_document


class DocumentSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> str: ...


class DataError(ValueError):
    """A data source that cannot be used (missing file, empty, unknown field)."""


# ------------------------------------------------------------------ sources


class GeneratedSource:
    """`num_documents` arithmetic word problems of corpus `seed` (computed on access)."""

    def __init__(self, num_documents: int, seed: int = 0):
        self.num_documents = int(num_documents)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < self.num_documents:
            raise IndexError(index)
        return arithmetic_document(self.seed, int(index))


class ListSource:
    """Documents held in memory."""

    def __init__(self, documents: Sequence[str]):
        self.documents = list(documents)

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> str:
        return self.documents[index]


class FieldSource:
    """Text field of a random-access dataset of records (tfds data source, HF dataset)."""

    def __init__(self, records: Any, field: str, name: str):
        self.records, self.field, self.name = records, field, name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> str:
        value = self.records[int(index)][self.field]
        if isinstance(value, bytes | np.bytes_):
            value = bytes(value).decode("utf-8", errors="replace")
        return str(value)


def expand_paths(path: str) -> list[str]:
    """Files named by `path`: one path, a glob, or a comma-separated list of those."""
    files: list[str] = []
    for part in (p.strip() for p in path.split(",")):
        if not part:
            continue
        if any(ch in part for ch in "*?["):
            matched = sorted(glob.glob(part))
            if not matched:
                raise DataError(f"data file pattern {part!r} matches no file")
            files += matched
        elif not os.path.isfile(part):
            raise DataError(f"data file {part!r} does not exist")
        else:
            files.append(part)
    if not files:
        raise DataError(f"config.data.path={path!r} names no file")
    return files


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower()
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def read_text_documents(path: str, split: str) -> list[str]:
    """Documents of a plain text file: separated by blank lines, one per line, or the
    whole file (`split` = blank_line | line | file). Blank documents are dropped."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if split == "file":
        docs = [text]
    elif split == "line":
        docs = text.splitlines()
    elif split == "blank_line":
        docs, cur = [], []
        for line in text.splitlines():
            if line.strip():
                cur.append(line)
            elif cur:
                docs.append("\n".join(cur))
                cur = []
        if cur:
            docs.append("\n".join(cur))
    else:
        raise DataError(f"unknown text split {split!r}")
    return [d for d in docs if d.strip()]


def read_jsonl_documents(path: str, field: str) -> list[str]:
    """The `field` of every JSON line of `path` (blank lines skipped)."""
    docs = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not valid UTF-8 (byte {e.start + 1} of the "
                                "line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} column {e.colno})") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{n}: no field {field!r} (has {keys}); set "
                                "config.data.text_field")
            docs.append(str(record[field]))
    return docs


def read_parquet_documents(path: str, field: str) -> list[str]:
    """The `field` column of a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        reason = " ".join(str(e).split())
        raise DataError(f"{path}: not a readable parquet file ({reason})") from None
    if field not in table.column_names:
        raise DataError(f"{path}: no column {field!r} (has {table.column_names}); set "
                        "config.data.text_field")
    return [str(v) for v in table.column(field).to_pylist() if v is not None]


def file_source(path: str, fmt: str = "auto", text_split: str = "blank_line",
                field: str = "text") -> ListSource:
    """Documents of local files (see `expand_paths`), in file order."""
    docs: list[str] = []
    for file in expand_paths(path):
        kind = _format_of(file, fmt)
        if kind == "text":
            docs += read_text_documents(file, text_split)
        elif kind == "jsonl":
            docs += read_jsonl_documents(file, field)
        elif kind == "parquet":
            docs += read_parquet_documents(file, field)
        else:
            raise DataError(f"unknown data format {kind!r}")
    return ListSource(docs)


def tfds_source(name: str, split: str, field: str, data_dir: str | None = None) -> FieldSource:
    """A tensorflow-datasets dataset as a random-access source (`tfds.data_source`:
    needs the dataset prepared in the array_record format, but no TensorFlow)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"config.data.source='tfds' needs tensorflow-datasets ({e})") from None
    try:
        records = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds; report in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"tensorflow-datasets {name!r} split {split!r} is not available as a "
                        f"random-access data source: {first}") from None
    return FieldSource(records, field, f"tfds:{name}")


def hf_source(name: str, config_name: str | None, split: str, field: str) -> FieldSource:
    """A Hugging Face dataset (downloaded/cached by `datasets.load_dataset`)."""
    try:
        import datasets
    except ImportError:
        raise DataError("config.data.source='hf' needs the Hugging Face `datasets` package "
                        "(pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as e:  # noqa: BLE001 - network, auth, unknown name: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"Hugging Face dataset {name!r} ({split}) could not be loaded: "
                        f"{first}") from None
    if field not in ds.column_names:
        raise DataError(f"Hugging Face dataset {name!r} has no column {field!r} (has "
                        f"{ds.column_names}); set config.data.text_field")
    return FieldSource(ds, field, f"hf:{name}")


def make_source(data: Any) -> DocumentSource:
    """The source `config.data` describes; raises DataError when it is empty."""
    if data.source == "generated":
        source: DocumentSource = GeneratedSource(data.num_documents, data.seed)
    elif data.source == "files":
        source = file_source(data.path, data.format, data.text_split, data.text_field)
    elif data.source == "tfds":
        source = tfds_source(data.tfds_name, data.tfds_split, data.text_field,
                             data.tfds_data_dir)
    elif data.source == "hf":
        source = hf_source(data.hf_name, data.hf_config, data.hf_split, data.text_field)
    else:
        raise DataError(f"unknown data source {data.source!r}")
    if len(source) == 0:
        where = data.path if data.source == "files" else data.source
        raise DataError(f"the dataset ({where}) has no documents")
    return source


# ------------------------------------------------------------------ batches


@dataclasses.dataclass(frozen=True)
class DataState:
    """Where a `TokenBatches` stands: `index` documents of this process's share of
    epoch `epoch` have been used (the same on every process)."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataState:
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


def window(tokens: Sequence[int], seq_len: int, pad_id: int,
           rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """A random `seq_len` window of a longer sequence (the first one when `rng` is
    None), or the sequence right-padded. Returns (ids, attention mask), int32
    `[seq_len]` each."""
    n = len(tokens)
    ids = np.full((seq_len,), pad_id, np.int32)
    mask = np.zeros((seq_len,), np.int32)
    if n > seq_len:
        start = 0 if rng is None else int(rng.integers(0, n - seq_len + 1))
        ids[:] = tokens[start:start + seq_len]
        mask[:] = 1
    else:
        ids[:n] = tokens
        mask[:n] = 1
    return ids, mask


class TokenBatches:
    """Iterator of this process's rows of each global batch.

    Yields `{"input_ids", "attention_mask"}`, int32 `[local_batch, seq_len]`.
    `encode(text) -> list[int]` tokenises a document.
    """

    def __init__(
        self,
        source: DocumentSource,
        encode: Callable[[str], list[int]],
        *,
        seq_len: int,
        local_batch: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.source, self.encode = source, encode
        self.seq_len, self.local_batch, self.pad_id = seq_len, local_batch, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        self.share = len(source) // process_count
        if self.share == 0:
            raise DataError(f"the dataset has {len(source)} documents, fewer than the "
                            f"{process_count} processes")
        self.state = DataState()
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Document indices of this process's share of `epoch`, in visiting order."""
        if self._order_epoch != epoch:
            n = len(self.source)
            perm = (np.random.default_rng([self.seed, epoch]).permutation(n)
                    if self.shuffle else np.arange(n))
            self._order = perm[self.process_index::self.process_count][: self.share]
            self._order_epoch = epoch
        return self._order

    def row(self, epoch: int, doc: int) -> tuple[np.ndarray, np.ndarray]:
        """The row document `doc` gives in `epoch`."""
        tokens = self.encode(self.source[doc])
        rng = np.random.default_rng([self.seed, epoch, doc])
        return window(tokens, self.seq_len, self.pad_id, rng)

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        ids = np.empty((self.local_batch, self.seq_len), np.int32)
        mask = np.empty((self.local_batch, self.seq_len), np.int32)
        epoch, index = self.state.epoch, self.state.index
        for r in range(self.local_batch):
            if index >= self.share:
                epoch, index = epoch + 1, 0
            doc = int(self.order(epoch)[index])
            ids[r], mask[r] = self.row(epoch, doc)
            index += 1
        self.state = DataState(epoch, index)
        return {"input_ids": ids, "attention_mask": mask}

    def get_state(self) -> dict[str, int]:
        return self.state.to_dict()

    def set_state(self, state: dict[str, Any]) -> None:
        self.state = DataState.from_dict(state)
