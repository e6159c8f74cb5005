"""Evaluation: the authors' direct-answer metric, perplexity, chain of thought, CLI."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path

from quietstar_jax.evaluation import cli as evaluate_cli
from quietstar_jax.evaluation import data as eval_data
from quietstar_jax.evaluation import tasks as evaluate
from quietstar_jax.evaluation.cot import cut_at_repeat
from quietstar_jax.evaluation.metrics import (
    answer_score,
    extract_first_integer,
    majority_vote,
    nll_bins,
    renormalise,
)
from quietstar_jax.model import lm_logits, logits_from_hidden
from quietstar_jax.thought import ThoughtConfig, mixed_hidden, rollout

# --------------------------------------------------------------------------- metric by hand


def _logits_from_probs(rows: list[dict[int, float]], vocab: int = 20) -> np.ndarray:
    """Full-vocabulary logits whose softmax has the given probabilities; the remaining
    mass is spread over the other tokens."""
    out = np.zeros((len(rows), vocab))
    for r, probs in enumerate(rows):
        rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
        p = np.full(vocab, rest)
        for t, v in probs.items():
            p[t] = v
        out[r] = np.log(p)
    return out


VALID = [10, 11, 12, 13]


def test_authors_metric_three_token_answer_by_hand():
    """Answer tokens 10, 12, 13 at prediction positions 2, 3, 4 of ids [1 2 3 10 12 13].

    Renormalised over the valid ids {10, 11, 12, 13}:
      pos 2: p(10) = 0.2 / (0.2 + 0.1 + 0.05 + 0.05) = 0.5
      pos 3: p(12) = 0.3 / (0.1 + 0.1 + 0.3 + 0.1)   = 0.5
      pos 4: p(13) = 0.6 / (0.1 + 0.05 + 0.05 + 0.6) = 0.75
    score = 0.5 * 0.5 * 0.75 = 0.1875, and every true token is the valid argmax.
    """
    ids = [1, 2, 3, 10, 12, 13]
    logits = _logits_from_probs([
        {}, {},
        {10: 0.2, 11: 0.1, 12: 0.05, 13: 0.05},
        {10: 0.1, 11: 0.1, 12: 0.3, 13: 0.1},
        {10: 0.1, 11: 0.05, 12: 0.05, 13: 0.6},
        {},
    ])
    pos, tgt = eval_data.answer_targets(ids, 2, VALID, pad_id=None)
    assert pos == (2, 3, 4) and tgt == (0, 2, 3)
    score, exact = answer_score(logits[list(pos)][:, VALID], tgt)
    assert score == pytest.approx(0.1875, rel=1e-9)
    assert exact
    # a wrong-but-valid true token at position 3: p(10) = 0.1 / 0.6
    ids2 = [1, 2, 3, 10, 10, 13]
    pos, tgt = eval_data.answer_targets(ids2, 2, VALID, pad_id=None)
    score, exact = answer_score(logits[list(pos)][:, VALID], tgt)
    assert score == pytest.approx(0.5 * (0.1 / 0.6) * 0.75, rel=1e-9)
    assert not exact


def test_answer_targets_skip_invalid_and_stop_at_pad():
    # 7 is not a valid answer token (skipped, factor 1); 0 is padding (stop)
    pos, tgt = eval_data.answer_targets([1, 2, 3, 10, 7, 12, 0, 13], 2, VALID, pad_id=0)
    assert pos == (2, 4) and tgt == (0, 2)


def test_renormalise_equals_full_softmax_restricted():
    z = np.random.default_rng(0).normal(size=(3, 20))
    full = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    want = full[:, VALID] / full[:, VALID].sum(-1, keepdims=True)
    np.testing.assert_allclose(renormalise(z[:, VALID]), want, rtol=1e-12)


def test_nll_bins_by_hand():
    bins = nll_bins(np.array([0.1, 0.7, 2.5, 9.0]), np.array([0.2, 0.5, 2.0, 10.0]),
                    edges=(0.0, 1.0, 3.0, math.inf))
    assert [b["tokens"] for b in bins] == [2, 1, 1]
    assert bins[0]["base_nll"] == pytest.approx(0.4)
    assert bins[0]["thought_nll"] == pytest.approx(0.35)
    assert bins[0]["improvement"] == pytest.approx(0.05)
    assert bins[1]["improvement"] == pytest.approx(0.5)
    assert bins[2]["improvement"] == pytest.approx(-1.0)
    assert sum(b["share"] for b in bins) == pytest.approx(1.0)


def test_cot_answer_extraction_and_vote():
    assert extract_first_integer(" is 1,234 apples and 5") == 1234
    assert extract_first_integer(" -10 dollars") == 10  # the authors' regex has no sign
    assert extract_first_integer(" none") is None
    assert majority_vote([3, None, 5, 3, 5]) == 3  # tie: the first seen wins
    assert majority_vote([None, None, 4]) is None
    assert cut_at_repeat("Q: a\nA: b. Q: c") == "Q: a\nA: b. "
    assert cut_at_repeat("Q: a\n\n\nb\n\n\nc") == "Q: a\n\n\nb"
    assert cut_at_repeat("Q: a\nA: b") == "Q: a\nA: b"


def test_length_batches_cover_each_example_once_with_one_shape_per_width():
    from quietstar_jax.evaluation.scoring import length_batches

    lengths = [5, 70, 64, 130, 65, 3, 66, 200]
    seen, shapes = [], {}
    for idx, width, rows in length_batches(lengths, batch_tokens=256, multiple=64):
        assert all(lengths[i] <= width < lengths[i] + 64 for i in idx)
        assert len(idx) <= rows and shapes.setdefault(width, rows) == rows
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(lengths)))
    # width 128 holds 70, 65, 66: 256 // 128 = 2 rows per batch; width 64: 3 examples
    assert shapes == {64: 3, 128: 2, 192: 1, 256: 1}


# --------------------------------------------------------------------------- data


def test_read_jsonl_and_rows_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        eval_data.read_jsonl(bad)
    with pytest.raises(ValueError, match="no '####'"):
        eval_data.gsm8k_rows([{"question": "q", "answer": "42"}])
    with pytest.raises(ValueError, match="answerKey 'F'"):
        eval_data.csqa_rows([{"question": "q", "choices": {"label": ["A"], "text": ["x"]},
                              "answerKey": "F"}])
    with pytest.raises(FileNotFoundError, match="gsm8k data"):
        eval_data.load_rows("gsm8k", tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        eval_data.load_rows("mmlu", tmp_path)


def test_csqa_original_schema():
    row = {"question": {"stem": "Why?", "choices": [{"label": "A", "text": "x"},
                                                     {"label": "B", "text": "y"}]},
           "answerKey": "B"}
    (r,) = eval_data.csqa_rows([row])
    text = eval_data.csqa_text(r["question"], r["labels"], r["texts"], r["answerKey"])
    assert text == "Q: Why?\n(A) x\n(B) y\nA: B\n"


class _MergingTokenizer:
    """A fake tokenizer that encodes "0123456789" as one token."""

    vocab = {c: i for i, c in enumerate("0123456789\n ABCDE")}

    def __call__(self, text, add_special_tokens=True):
        if text == "0123456789":
            return {"input_ids": [99]}
        return {"input_ids": [self.vocab[c] for c in text]}

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv.get(i, "?") for i in ids)


def test_tokenizer_that_merges_digits_is_rejected():
    with pytest.raises(ValueError, match="one token per digit"):
        eval_data.gsm8k_valid_ids(_MergingTokenizer())


# --------------------------------------------------------------------------- stories260K


@pytest.fixture(scope="module")
def stories():
    from quietstar_jax import hf

    cfg, params, tok = hf.load_pretrained(shared_path("data", "stories260K-hf"))
    return cfg, params, tok


def _authors_marker_end(tok, ids, marker="\nA:"):
    """The authors' linear scan from the end."""
    total = tok.decode(ids).count(marker)
    for i in range(len(ids) - 1, 0, -1):
        if tok.decode(ids[:i]).count(marker) < total:
            return i
    raise AssertionError


def test_valid_ids_and_answer_tokens_from_tokenizer(stories):
    _, _, tok = stories
    g = eval_data.gsm8k_valid_ids(tok)
    assert tok.convert_ids_to_tokens(g) == list("0123456789") + ["<0x0A>"]
    c = eval_data.csqa_valid_ids(tok)
    assert tok.convert_ids_to_tokens(c) == ["A", "▁B", "C", "D", "E", "<0x0A>"]
    # GSM8K: the first answer token ("▁") is skipped; 7, 2, newline are scored
    text = eval_data.gsm8k_text("What is 8 times 9?", "8*9=<<8*9=72>>72\n#### 72")
    assert text == "Q: What is 8 times 9?\nA: 72\n"
    (ex,) = eval_data.build_examples(tok, [text], g, skip_first=True, pad_id=2)
    assert ex.targets == (7, 2, 10)
    assert [tok.convert_ids_to_tokens(ex.ids[j + 1]) for j in ex.positions] == ["7", "2",
                                                                                "<0x0A>"]
    # CommonsenseQA " A": "▁" then "A" (the bare "▁" is not valid: skipped)
    for key, want in (("A", ["A", "<0x0A>"]), ("B", ["▁B", "<0x0A>"])):
        text = eval_data.csqa_text("Which?", list("ABCDE"), list("vwxyz"), key)
        (ex,) = eval_data.build_examples(tok, [text], c, skip_first=False, pad_id=2)
        assert [tok.convert_ids_to_tokens(ex.ids[j + 1]) for j in ex.positions] == want
    for text in ("Q: a\nA: 5\n", "Q: x\nA: y\nA: 12\n", "Q: one\n(A) b\nA: C\n"):
        ids = tok(text)["input_ids"]
        assert eval_data.marker_end(tok, ids) == _authors_marker_end(tok, ids)


def _random_mix(params, seed=0):
    params = dict(params)
    mix = dict(params["thought"]["mix"])
    mix["w2"] = 0.5 * jax.random.normal(jax.random.key(seed), mix["w2"].shape)
    params["thought"] = dict(params["thought"], mix=mix)
    return params


def _independent_scores(params, cfg, tc, tok, texts, valid, skip_first):
    """All examples right-padded to one width (padding after a position does not
    change it): full-vocabulary logits of every position from `lm_logits` (base) and
    from the full parallel `rollout` (thinking), renormalised in numpy."""

    @jax.jit
    def logits(params, ids, mask):
        ro = rollout(params, cfg, tc, ids, mask, None, num_steps=tc.n_ahead - 1)
        mixed, _ = mixed_hidden(params, tc, ro.base_hidden, ro.step_hidden[-1], tc.n_ahead - 1)
        return lm_logits(params, cfg, ids, mask), logits_from_hidden(params, cfg, mixed)

    seqs = [tok(text)["input_ids"] for text in texts]
    width = max(map(len, seqs))
    ids = np.full((len(seqs), width), 2, np.int32)
    mask = np.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = s, 1
    zb, zt = (np.asarray(z, np.float64) for z in logits(params, jnp.asarray(ids),
                                                         jnp.asarray(mask)))
    base, think, first_ok = [], [], []
    for r, s in enumerate(seqs):
        first = _authors_marker_end(tok, s) + int(skip_first)
        pos, tgt = eval_data.answer_targets(s, first, valid, pad_id=2)
        for z, out in ((zb[r], base), (zt[r], think)):
            p = np.exp(z[list(pos)] - z[list(pos)].max(-1, keepdims=True))
            pv = p[:, valid] / p[:, valid].sum(-1, keepdims=True)
            out.append(float(np.prod(pv[np.arange(len(tgt)), list(tgt)])))
        first_ok.append(int(np.argmax(zb[r, pos[0], valid])) == tgt[0])
    return np.array(base), np.array(think), np.array(first_ok)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["gsm8k", "csqa"])
def test_direct_answer_matches_independent_computation(stories, task):
    """Batched, bucketed, thinking-only-at-answer-positions scores equal per-example
    scores from the plain LM and the full rollout (greedy thoughts, n_ahead 5)."""
    from quietstar_jax import hf

    cfg, params, tok = stories
    params = _random_mix(params)
    tc = ThoughtConfig(n_ahead=5, n_ahead_talk=1, n_passes=1, sampling="greedy",
                       **hf.thought_token_ids(tok))
    src = shared_path("data", "gsm8k" if task == "gsm8k" else "commonsenseqa")
    fn = evaluate.evaluate_gsm8k if task == "gsm8k" else evaluate.evaluate_csqa
    # batches of 2-3 prompts in buckets of 128 tokens: several batches, few shapes
    res = fn(params, cfg, tc, tok, src, limit=8, batch_tokens=384, bucket=128,
             return_examples=True)
    assert res["examples"] == 8 and res["n_ahead"] == 5 and res["thought_tokens"] == 2
    rows = eval_data.load_rows(task, src)[:8]
    if task == "gsm8k":
        texts = [eval_data.gsm8k_text(r["question"], r["answer"]) for r in rows]
        valid = eval_data.gsm8k_valid_ids(tok)
    else:
        rows = eval_data.csqa_rows(rows)
        texts = [eval_data.csqa_text(r["question"], r["labels"], r["texts"], r["answerKey"])
                 for r in rows]
        valid = eval_data.csqa_valid_ids(tok)
    base, think, first = _independent_scores(params, cfg, tc, tok, texts, valid,
                                             task == "gsm8k")
    np.testing.assert_allclose(res["per_example"]["base_score"], base, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(res["per_example"]["thinking_score"], think, rtol=2e-4,
                               atol=1e-7)
    assert not np.allclose(base, think)  # the random mixing head makes thinking differ
    assert res["base"]["accuracy"] == pytest.approx(base.mean(), rel=2e-4)
    np.testing.assert_array_equal(res["per_example"]["base_first"], first)


@pytest.mark.slow
def test_perplexity_base_matches_known_loss(stories):
    """stories260K on TinyStories text: 40 chunks of 256 predicted tokens (the first
    token of each 257-token chunk is context only), paragraphs joined by one newline.
    The reference loss is 1.3336 nats/token (PROVENANCE.md)."""
    from quietstar_jax import hf

    cfg, params, tok = stories
    text = shared_path("data", "tinystories", "tinystories_val_head.txt")
    params = _random_mix(params, seed=1)
    tc = ThoughtConfig(n_ahead=4, n_ahead_talk=1, n_passes=1, sampling="greedy",
                       **hf.thought_token_ids(tok))
    res = evaluate.evaluate_perplexity(params, cfg, tc, tok, text, max_chunks=40, batch_size=20)
    assert res["tokens"] == 40 * 256 and res["chunks"] == 40
    assert res["base"]["nll"] == pytest.approx(1.3336, abs=0.05)
    assert sum(b["tokens"] for b in res["bins"]) == res["tokens"]
    # independent check of chunk 0: numpy log-softmax of the plain LM logits
    chunk = evaluate.text_chunks(tok, text.read_text(), 256, max_chunks=1)[0]
    assert len(chunk) == 257
    z = np.asarray(lm_logits(params, cfg, jnp.asarray([chunk])), np.float64)[0, :-1]
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(
        -1, keepdims=True)
    nll0 = -logp[np.arange(256), chunk[1:]].mean()
    again = evaluate.evaluate_perplexity(params, cfg, None, tok, text.read_text(),
                                         max_chunks=1)
    assert again["base"]["nll"] == pytest.approx(nll0, rel=1e-4)
    assert "thinking" not in again
    assert res["thinking"]["nll"] != pytest.approx(res["base"]["nll"], abs=1e-3)


@pytest.mark.slow
def test_cot_end_to_end_small(stories):
    from quietstar_jax import hf

    cfg, params, tok = stories
    tc = ThoughtConfig(n_ahead=4, n_ahead_talk=1, n_passes=1, **hf.thought_token_ids(tok))
    res = evaluate.evaluate_cot(params, cfg, tc, tok, shared_path("data", "gsm8k"), limit=2,
                                n_votes=2, max_solution_tokens=8, answer_tokens=4,
                                batch_size=4, return_examples=True)
    assert res["questions"] == 2 and res["votes"] == 2
    for name in ("base", "thinking"):
        assert 0.0 <= res[name]["accuracy"] <= 1.0
        (q0, _) = res[name]["per_question"]
        assert len(q0["votes"]) == 2 and len(q0["solutions"]) == 2
        assert q0["solutions"][0].startswith("Q: ")
        assert "\nTherefore, the answer (arabic numerals) is" in q0["solutions"][0]


@pytest.mark.slow
def test_cli_writes_json_and_rejects_bad_tasks(tmp_path, capsys):
    model = str(shared_path("data", "stories260K-hf"))
    data = shared_path("data")
    out = tmp_path / "r.json"
    rc = evaluate_cli.main([model, "--tasks", "gsm8k,csqa,perplexity", "--limit", "3",
                        "--gsm8k", str(data / "gsm8k"), "--csqa", str(data / "commonsenseqa"),
                        "--text", str(data / "tinystories" / "tinystories_val_head.txt"),
                        "--max-chunks", "2", "--n-ahead", "4", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"gsm8k", "csqa", "perplexity"}
    assert res["gsm8k"]["examples"] == 3 and "thinking" in res["csqa"]
    table = capsys.readouterr().out
    assert "authors acc" in table and "nll/token" in table
    capsys.readouterr()
    assert evaluate_cli.main([model, "--tasks", "mmlu"]) == 2
    assert evaluate_cli.main([model, "--tasks", "perplexity"]) == 2
    capsys.readouterr()
    assert evaluate_cli.main([str(tmp_path / "nowhere"), "--tasks", "gsm8k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].split(": error: ", 1)[1].startswith("model path"), err
