"""Data pipeline: sources, windows, determinism, resume position, process shares."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quietstar_jax.train.arithmetic import arithmetic_document
from quietstar_jax.train.config import base_config
from quietstar_jax.train.data import (
    DataError,
    DataState,
    GeneratedSource,
    ListSource,
    TokenBatches,
    file_source,
    hf_source,
    make_source,
    tfds_source,
    window,
)
from quietstar_jax.train.tokenizer import ByteTokenizer, token_pieces

TOK = ByteTokenizer()


def batches(source, n, **kw):
    defaults = dict(seq_len=16, local_batch=3, pad_id=TOK.pad_token_id, seed=7)
    it = TokenBatches(source, TOK.encode, **(defaults | kw))
    return it, [next(it) for _ in range(n)]


def docs(n):
    return ListSource([f"document number {i} " + "x" * (i % 23) for i in range(n)])


# ------------------------------------------------------------------ tokenizer


def test_byte_tokenizer_round_trip_and_special_ids():
    text = "Q: 3 + 4 = 7. héllo\n"
    ids = TOK.encode(text)
    assert ids[0] == TOK.bos_token_id and ids[1:] == list(text.encode("utf-8"))
    assert TOK.decode(ids[1:]) == text
    assert TOK.decode([TOK.start_thought_id, 65, TOK.end_thought_id]) == (
        "<|startthought|>A<|endthought|>")
    assert TOK.thought_token_ids() == {"start_token_id": 258, "end_token_id": 259,
                                       "pad_token_id": 256}
    assert TOK.init_token_id() == ord("-")
    assert max(TOK.encode("\xff" * 3)) < TOK.vocab_size


def test_token_pieces_rebuild_the_text():
    ids = TOK.encode("ab é", add_bos=False)
    pieces = token_pieces(TOK, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == "ab é"


# ------------------------------------------------------------------ sources


def test_generated_documents_are_seeded_and_worked():
    a, b = arithmetic_document(3, 11), arithmetic_document(3, 11)
    assert a == b and a != arithmetic_document(4, 11)
    assert a.startswith("Q: ") and "\nA: " in a and "The answer is" in a
    # The stated answer is the result of the worked steps.
    for i in range(50):
        doc = arithmetic_document(0, i)
        steps = doc.split("\nA: ")[1].split(" The answer is ")[0]
        last = steps.rstrip(".").split(". ")[-1]
        lhs, rhs = last.split(" = ")
        assert eval(lhs) == int(rhs)  # noqa: S307 - generated arithmetic only
        assert doc.strip().endswith(f"The answer is {rhs}.")
    src = GeneratedSource(5, seed=3)
    assert len(src) == 5 and src[4] == arithmetic_document(3, 4)
    with pytest.raises(IndexError):
        src[5]


def test_text_file_split_modes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n\n\nthree\n\nfour\n")
    assert file_source(str(path), text_split="blank_line").documents == [
        "one\ntwo", "three", "four"]
    assert file_source(str(path), text_split="line").documents == ["one", "two", "three",
                                                                  "four"]
    assert file_source(str(path), text_split="file").documents == [path.read_text()]


def test_jsonl_parquet_glob_and_comma_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "alpha", "id": 1}) + "\n\n" + json.dumps({"text": "beta"}) + "\n")
    pq.write_table(pa.table({"body": ["gamma", "delta"]}), tmp_path / "b.parquet")
    assert file_source(str(tmp_path / "a.jsonl")).documents == ["alpha", "beta"]
    assert file_source(str(tmp_path / "b.parquet"), field="body").documents == [
        "gamma", "delta"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "eps"}) + "\n")
    assert file_source(str(tmp_path / "*.jsonl")).documents == ["alpha", "beta", "eps"]
    both = f"{tmp_path / 'c.jsonl'},{tmp_path / 'a.jsonl'}"
    assert file_source(both).documents == ["eps", "alpha", "beta"]


def test_bad_sources_fail_with_one_line(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        file_source(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="matches no file"):
        file_source(str(tmp_path / "*.nothing"))
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="no field 'text'"):
        file_source(str(tmp_path / "a.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="not valid JSON"):
        file_source(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    cfg = base_config().data
    cfg.source, cfg.path = "files", str(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="no documents") as e:
        make_source(cfg)
    assert "\n" not in str(e.value)


def test_tfds_unavailable_dataset_is_one_line(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError) as e:
        tfds_source("no_such_dataset_xyz", "train", "text", data_dir=str(tmp_path))
    assert "no_such_dataset_xyz" in str(e.value) and "\n" not in str(e.value)


def test_hf_datasets_missing_is_clear():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install datasets"):
            hf_source("open-web-math/open-web-math", None, "train", "text")
    else:
        pytest.skip("datasets is installed; its loading needs the network")


# ------------------------------------------------------------------ windows and batches


def test_window_cuts_a_random_slice_or_pads():
    tokens = list(range(100, 140))
    ids, mask = window(tokens, 8, 0, np.random.default_rng(1))
    start = ids[0] - 100
    assert list(ids) == tokens[start:start + 8] and mask.tolist() == [1] * 8
    starts = {int(window(tokens, 8, 0, np.random.default_rng(s))[0][0]) for s in range(40)}
    assert len(starts) > 5  # the offset is random, not always 0
    ids, mask = window([5, 6, 7], 6, 0, None)
    assert ids.tolist() == [5, 6, 7, 0, 0, 0] and mask.tolist() == [1, 1, 1, 0, 0, 0]
    assert window(tokens, 8, 0, None)[0].tolist() == tokens[:8]


def test_rows_are_the_documents_tokens():
    src = docs(10)
    it, out = batches(src, 1, shuffle=False, seq_len=64, local_batch=4)
    for r in range(4):
        want = TOK.encode(src[r])
        n = len(want)
        assert out[0]["input_ids"][r, :n].tolist() == want
        assert out[0]["attention_mask"][r].sum() == n
        assert (out[0]["input_ids"][r, n:] == TOK.pad_token_id).all()


def test_batches_are_deterministic_and_seed_dependent():
    src = docs(50)
    _, a = batches(src, 6)
    _, b = batches(src, 6)
    _, c = batches(src, 6, seed=8)
    for x, y in zip(a, b, strict=True):
        assert (x["input_ids"] == y["input_ids"]).all()
    assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(a, c, strict=True))


def test_each_epoch_visits_every_document_once_in_a_new_order():
    n = 12
    src = ListSource([f"doc {i:02d}" for i in range(n)])
    it = TokenBatches(src, TOK.encode, seq_len=8, local_batch=4, pad_id=256, seed=0)
    seen = []
    for _ in range(6):  # two epochs
        for row in next(it)["input_ids"]:
            seen.append(TOK.decode([t for t in row if t < 256]))
    e0, e1 = seen[:n], seen[n:]
    assert sorted(e0) == sorted(e1) == sorted(src.documents)
    assert e0 != e1
    assert it.state == DataState(epoch=1, index=n)


def test_batches_span_epoch_boundaries():
    src = ListSource([f"doc {i}" for i in range(5)])
    it = TokenBatches(src, TOK.encode, seq_len=8, local_batch=3, pad_id=256, seed=0)
    next(it)
    next(it)  # rows 3, 4 of epoch 0 and row 0 of epoch 1
    assert it.state == DataState(epoch=1, index=1)


def test_restored_state_continues_with_the_next_unseen_batch():
    src = docs(23)
    it, straight = batches(src, 9)
    it2, first = batches(src, 4)
    saved = json.loads(json.dumps(it2.get_state()))  # through JSON, as in a checkpoint
    fresh = TokenBatches(src, TOK.encode, seq_len=16, local_batch=3, pad_id=256, seed=7)
    fresh.set_state(saved)
    rest = [next(fresh) for _ in range(5)]
    for x, y in zip(straight, first + rest, strict=True):
        assert (x["input_ids"] == y["input_ids"]).all()
        assert (x["attention_mask"] == y["attention_mask"]).all()


def test_processes_get_disjoint_equal_shares():
    n = 31
    src = ListSource([f"doc {i:02d}" for i in range(n)])
    shares = []
    for p in range(3):
        it = TokenBatches(src, TOK.encode, seq_len=8, local_batch=2, pad_id=256, seed=4,
                          process_index=p, process_count=3)
        shares.append(set(it.order(0).tolist()))
        assert len(it.order(0)) == n // 3
    assert not (shares[0] & shares[1] or shares[0] & shares[2] or shares[1] & shares[2])
    # Together they are the epoch's permutation minus at most process_count - 1 documents.
    assert len(set.union(*shares)) == 3 * (n // 3)
    with pytest.raises(DataError, match="fewer than"):
        TokenBatches(ListSource(["a"]), TOK.encode, seq_len=8, local_batch=1, pad_id=256,
                     process_count=2, process_index=1)


def _texts(batch):
    return [TOK.decode([t for t in row if t < 256]) for row in batch["input_ids"]]


def test_rows_follow_the_epoch_order_and_seeded_windows():
    """Row r of the stream is document order(r // share)[r % share] of epoch r // share,
    cut by a generator seeded (seed, epoch, document): recomputed here row by row."""
    src = ListSource([f"word{i} " * (3 + i % 5) for i in range(7)])
    it, out = batches(src, 6, seq_len=10, local_batch=4, seed=3)  # 24 rows, 3.4 epochs
    for r in range(24):
        epoch, k = divmod(r, 7)
        doc = int(it.order(epoch)[k])
        ids, mask = window(TOK.encode(src[doc]), 10, TOK.pad_token_id,
                           np.random.default_rng([3, epoch, doc]))
        got = out[r // 4]
        assert got["input_ids"].dtype == np.int32 and got["input_ids"].shape == (4, 10)
        assert got["input_ids"][r % 4].tolist() == ids.tolist()
        assert got["attention_mask"][r % 4].tolist() == mask.tolist()
    for epoch in range(4):
        assert sorted(it.order(epoch).tolist()) == list(range(7))


@pytest.mark.parametrize("cut", [2, 4, 7])
def test_resume_from_saved_state_matches_the_uninterrupted_run_across_epochs(cut):
    """10 documents, 3 rows a batch: the 12 batches cross three epoch boundaries; the
    run is cut after `cut` batches (mid-epoch, just after a batch spanning epochs 0 and
    1, and after one spanning 1 and 2), saved through JSON and restored in a new
    pipeline, which must give exactly the uninterrupted run's next batches."""
    src = docs(10)
    _, straight = batches(src, 12)
    first, head = batches(src, cut)
    saved = json.loads(json.dumps(first.get_state()))
    assert first.state == DataState.after(3 * cut, 10)
    fresh = TokenBatches(src, TOK.encode, seq_len=16, local_batch=3, pad_id=256, seed=7)
    fresh.set_state(saved)
    assert fresh.state == first.state
    tail = [next(fresh) for _ in range(12 - cut)]
    for x, y in zip(straight, head + tail, strict=True):
        assert (x["input_ids"] == y["input_ids"]).all()
        assert (x["attention_mask"] == y["attention_mask"]).all()


def test_old_epoch_index_state_and_changed_batch_size():
    """A pre-Grain `{"epoch", "index"}` state and a state read with another batch size
    continue at the same row when it is a whole number of batches; else DataError."""
    src = docs(10)
    first, _ = batches(src, 4)  # 12 rows: epoch 1, index 2
    assert first.state == DataState(epoch=1, index=2)
    saved = first.get_state()
    old = TokenBatches(src, TOK.encode, seq_len=16, local_batch=3, pad_id=256, seed=7)
    old.set_state({"epoch": 1, "index": 2})  # a checkpoint of the pre-Grain pipeline
    other = TokenBatches(src, TOK.encode, seq_len=16, local_batch=2, pad_id=256, seed=7)
    other.set_state(saved)  # rows 12, 13 next
    want = next(first)["input_ids"]  # rows 12, 13, 14
    assert (next(old)["input_ids"] == want).all()
    assert (next(other)["input_ids"] == want[:2]).all()
    assert other.state == DataState(epoch=1, index=4)
    with pytest.raises(DataError, match="batch size"):
        other.set_state(first.get_state())  # 15 rows are not whole 2-row batches
    with pytest.raises(DataError, match="batch size"):
        other.set_state({"epoch": 1, "index": 5})
    with pytest.raises(DataError, match="no epoch and index"):
        other.set_state({"grain": {"next_index": 1}})


@pytest.mark.parametrize("n", [14, 15])
def test_two_processes_cover_each_document_of_an_epoch_once(n):
    """Process 0 and 1 read the same seeded epochs; the first n // 2 rows of each are
    its share of epoch 0, the next n // 2 of epoch 1: together each epoch holds every
    document exactly once (one left out when n is odd), differently ordered."""
    src = ListSource([f"doc {i:02d}" for i in range(n)])
    share = n // 2
    streams = []
    for p in range(2):
        it = TokenBatches(src, TOK.encode, seq_len=8, local_batch=3, pad_id=256, seed=5,
                          process_index=p, process_count=2)
        streams.append([t for _ in range(5) for t in _texts(next(it))])  # 15 rows
    for e in range(2):
        both = streams[0][e * share:(e + 1) * share] + streams[1][e * share:(e + 1) * share]
        assert len(both) == len(set(both)) == 2 * share
        assert set(both) <= set(src.documents)
    assert streams[0][:share] != streams[0][share:2 * share]


def test_nearby_seeds_do_not_share_permutations():
    """Grain shuffles epoch e with seed + e; the seed it gets is a hash of data.seed, so
    seed 8's first epoch is not seed 7's second (as it would be with raw seeds)."""
    src = docs(50)
    a = TokenBatches(src, TOK.encode, seq_len=8, local_batch=2, pad_id=256, seed=7)
    b = TokenBatches(src, TOK.encode, seq_len=8, local_batch=2, pad_id=256, seed=8)
    assert a.order(1).tolist() != b.order(0).tolist()
    assert a.order(0).tolist() != a.order(1).tolist()
    with pytest.raises(DataError, match="seed=-1"):
        TokenBatches(src, TOK.encode, seq_len=8, local_batch=2, pad_id=256, seed=-1)
