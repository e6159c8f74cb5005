"""Training text -> token batches, deterministic, shardable across processes, resumable.

A *source* is a random-access list of documents (`len(source)`, `source[i] -> str`):
generated arithmetic problems, local files (plain text, jsonl, parquet), a
tensorflow-datasets `data_source` (no TensorFlow needed) or a Hugging Face dataset.

`TokenBatches` is a Grain (`grain.MapDataset`) pipeline that walks a source epoch by
epoch. Each epoch has a seeded permutation of the documents (Grain's shuffle);
process `p` of `P` takes every `P`-th document of it (all processes take the same
number). A document becomes one row: its tokens, cut to a random window of
`seq_len` when longer (the window's offset is drawn from a generator seeded by
`(seed, epoch, document)`), right-padded with `pad_id` when shorter, as the authors
did. Its position, the Grain iterator's state with the readable
`DataState(epoch, index)`, is a small JSON-able dict saved with each checkpoint;
restoring it continues with the next unseen batch.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grain
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
    epoch `epoch` have been used (the same on every process). A finished epoch reads
    `(epoch, share)` until the next row of `epoch + 1` is taken."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataState:
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))

    def rows(self, share: int) -> int:
        """Rows used since the start of epoch 0, with `share` rows per epoch."""
        return self.epoch * share + self.index

    @classmethod
    def after(cls, rows: int, share: int) -> DataState:
        """The position after `rows` rows, with `share` rows per epoch."""
        if rows == 0:
            return cls()
        epoch, index = divmod(rows - 1, share)
        return cls(epoch=epoch, index=index + 1)


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


def shuffle_seed(seed: int) -> int:
    """The seed given to Grain's shuffle for `data.seed`: Grain shuffles epoch `e` with
    `seed + e`, so seeds `s` and `s + 1` would share permutations one epoch apart;
    a hash of `seed` keeps the runs of nearby seeds unrelated."""
    return int(np.random.default_rng([seed, 0x5EED]).integers(0, 2**32))


class TokenBatches:
    """Iterator of this process's rows of each global batch, a Grain pipeline.

    Yields `{"input_ids", "attention_mask"}`, int32 `[local_batch, seq_len]`.
    `encode(text) -> list[int]` tokenises a document.

    The pipeline (`grain.MapDataset`): document indices `0..len(source)-1` ->
    Grain's global shuffle (a new permutation each epoch; none when `shuffle` is
    False) -> process `p` of `P` takes every `P`-th of them, `len(source) // P` per
    epoch -> repeated epoch after epoch -> each index read from `source`, tokenised,
    cut to a window (offset seeded by `(seed, epoch, document)`) and padded ->
    batches of `local_batch` rows, which run across epoch boundaries. It is read
    synchronously (no prefetch threads). `get_state()` is the Grain iterator's state
    plus the readable `DataState`; `set_state` also takes an old `{"epoch", "index"}`.
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
        if seed < 0:
            raise DataError(f"config.data.seed={seed} must be >= 0")
        if local_batch < 1 or seq_len < 1:
            raise DataError(f"local_batch={local_batch} and seq_len={seq_len} must be >= 1")
        self.source, self.encode = source, encode
        self.seq_len, self.local_batch, self.pad_id = seq_len, local_batch, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        n = len(source)
        self.share = n // process_count
        if self.share == 0:
            raise DataError(f"the dataset has {n} documents, fewer than the "
                            f"{process_count} processes")
        docs = grain.MapDataset.range(n)
        if shuffle:
            docs = docs.shuffle(seed=shuffle_seed(seed))
        # Every P-th document of the epoch's order, the same number on every process;
        # past the end the slice and the shuffle go on into the next epoch.
        docs = docs[process_index:process_index + process_count * self.share:process_count]
        self.documents = docs.repeat()  # [i] = document of row i of this process
        rows = self.documents.map_with_index(
            lambda i, doc: dict(zip(("input_ids", "attention_mask"),
                                    self.row(i // self.share, doc), strict=True)))
        self.dataset = rows.batch(local_batch, drop_remainder=True)
        self.iterator = self.dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()

    def order(self, epoch: int) -> np.ndarray:
        """Document indices of this process's share of `epoch`, in visiting order."""
        base = epoch * self.share
        return np.asarray([self.documents[base + j] for j in range(self.share)], np.int64)

    def row(self, epoch: int, doc: int) -> tuple[np.ndarray, np.ndarray]:
        """The row document `doc` gives in `epoch`: (ids, mask), int32 `[seq_len]`."""
        tokens = self.encode(self.source[int(doc)])
        rng = np.random.default_rng([self.seed, epoch, int(doc)])
        return window(tokens, self.seq_len, self.pad_id, rng)

    @property
    def state(self) -> DataState:
        """The position as (epoch, index) (from the Grain iterator's batch count)."""
        batches = int(self.iterator.get_state()["next_index"])
        return DataState.after(batches * self.local_batch, self.share)

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict[str, Any]:
        """JSON-able: `{"grain": <Grain iterator state>, "epoch", "index"}`."""
        return {"grain": self.iterator.get_state(), **self.state.to_dict()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue after the rows that `state` (of `get_state`) counts, through the
        Grain iterator's `set_state`. The saved Grain state is used as it is when it
        agrees with the saved (epoch, index) under this run's batch size and share;
        otherwise (a state of the pre-Grain pipeline, `{"epoch", "index"}` only, or a
        run whose per-process batch size changed) the iterator is placed at that
        (epoch, index), as the pre-Grain pipeline did, if it is a whole number of
        batches, else DataError. A pre-Grain state's epoch continues in Grain's order,
        not the old one."""
        if "epoch" not in state or "index" not in state:
            raise DataError(f"data state {state!r} has no epoch and index")
        want = DataState.from_dict(state)
        rows = want.rows(self.share)
        saved = state.get("grain")
        if saved is None or int(saved["next_index"]) * self.local_batch != rows:
            if rows % self.local_batch:
                raise DataError(
                    f"the saved data position (epoch {want.epoch} index {want.index}, "
                    f"{rows} rows) is not a whole number of this run's "
                    f"{self.local_batch}-row batches: the batch size changed since it "
                    "was saved")
            saved = {"next_index": rows // self.local_batch}
        self.iterator.set_state(dict(saved))
