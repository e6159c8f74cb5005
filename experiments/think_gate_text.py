"""The real-model half of experiments/think_gate.py: where should a thought go in
SmolLM2-135M's reading of web math text?

The pretrained SmolLM2-135M (`load_pretrained` of its HF directory, float32, remat
"full") gets thought params and a think gate and trains `steps` updates of the trainer's
step with sparse thoughts (`think_k` positions per row, the gate's top ones plus a
random share) on 64-token windows of the OpenWebMath sample's first documents. The LM's
weights move at the paper's learning rate (1e-6) and the new parts (mixing head,
thought embeddings, gate) at `head_lr`: at 1e-6 a zero-initialised mixing head would
stay the base LM, and no thought could show a gain. Then, on windows of the held-out
last documents, every position thinks once (one dense rollout, the same per-position
measures as the two-hop task: NLL and argmax hit of the true next token with and
without the thought, base entropy, gate logit; `think_gate.make_position_fn`) and the
curve of accuracy / NLL against think rate compares the gate with random positions, the
entropy rule and the gain oracle (`think_gate.curve`), every scored position being an
"answer".
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quietstar_jax.model import Params
from quietstar_jax.thought import ThoughtConfig, init_gate_params
from quietstar_jax.train.step import init_state, make_train_step

HERE = os.path.dirname(os.path.abspath(__file__))
SMOLLM2_DIR = os.environ.get(
    "QUIETSTAR_SMOLLM2", os.path.expanduser("~/.cache/quietstar/smollm2-135m-hf"))
OPENWEBMATH = os.path.join(HERE, "..", "..", "shared", "data", "openwebmath",
                           "openwebmath_samples.txt")


@dataclasses.dataclass(frozen=True)
class TextSetup:
    """Every number of the text half (`--set text_<name>=value` in think_gate.py)."""

    hf_dir: str = SMOLLM2_DIR
    text_path: str = OPENWEBMATH
    eval_documents: int = 2  # the last documents of the file are held out
    seq_len: int = 64
    batch: int = 2
    steps: int = 30
    lm_lr: float = 1e-6  # the paper's
    head_lr: float = 3e-4  # mixing head, thought embeddings, gate (a prior, not tuned)
    n_ahead: int = 6  # start, 3 sampled tokens, end (+ the base step)
    n_ahead_talk: int = 2
    n_passes: int = 2
    think_k: int = 8
    think_explore: float = 0.25
    gate_cost: float = 0.0
    eval_windows: int = 24
    seed: int = 0


def windows(token_ids: list[int], seq_len: int) -> list[list[int]]:
    """Consecutive non-overlapping `seq_len`-token windows of one document (the tail
    shorter than a window is dropped)."""
    return [token_ids[i:i + seq_len] for i in range(0, len(token_ids) - seq_len + 1, seq_len)]


def text_windows(tok: Any, path: str, seq_len: int, held_out: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) int32 `[n, seq_len]`: windows of the file's documents (one per
    non-empty line), the last `held_out` documents for evaluation only."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"think_gate_text: no text file at {path}")
    with open(path) as f:
        docs = [line for line in f.read().splitlines() if line.strip()]
    if len(docs) <= held_out:
        raise ValueError(f"think_gate_text: {path} has {len(docs)} documents; "
                         f"{held_out} are held out, none would be left to train on")
    split = len(docs) - held_out
    parts = ([], [])
    for i, d in enumerate(docs):
        parts[i >= split].extend(windows(tok(d)["input_ids"], seq_len))
    if not parts[0] or not parts[1]:
        raise ValueError(f"think_gate_text: documents shorter than {seq_len} tokens")
    return np.asarray(parts[0], np.int32), np.asarray(parts[1], np.int32)


def two_speed_optimizer(params: Params, lm_lr: float, head_lr: float
                        ) -> optax.GradientTransformation:
    """Clipping, then AdamW at `lm_lr` for the LM's params and `head_lr` for `thought`
    and `think_gate`."""
    labels = {k: jax.tree.map(lambda _, k=k: "head" if k in ("thought", "think_gate")
                              else "lm", v) for k, v in params.items()}
    return optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {"lm": optax.adamw(lm_lr, weight_decay=0.0),
         "head": optax.adamw(head_lr, weight_decay=0.0)}, labels))


def run_text(t: TextSetup, log: Callable[[str], None], rates: tuple[float, ...],
             n_boot: int) -> dict[str, Any]:
    """Train SmolLM2-135M with sparse thoughts and the gate, then the think-rate curve on
    held-out text; the same keys as the two-hop results (`curve`, `never`, `always`,
    `diagnostics`), plus `history`, `setup`, `time_s`."""
    import quietstar_jax as qs
    from experiments import think_gate as TG

    t0 = time.time()
    if not os.path.isdir(t.hf_dir):
        raise FileNotFoundError(
            f"think_gate_text: no SmolLM2-135M at {t.hf_dir}: make it with `python "
            f"../shared/data/smollm2-135m/to_hf.py {t.hf_dir}` (or set QUIETSTAR_SMOLLM2)")
    cfg, params, tok = qs.load_pretrained(t.hf_dir, "float32")
    ids = qs.thought_token_ids(tok)
    tc = ThoughtConfig(n_ahead=t.n_ahead, n_ahead_talk=t.n_ahead_talk, n_passes=t.n_passes,
                       think_k=t.think_k, think_explore=t.think_explore,
                       gate_cost=t.gate_cost, **ids)
    params = dict(params, think_gate=init_gate_params(cfg, jax.random.key(t.seed + 25)))
    train, held = text_windows(tok, t.text_path, t.seq_len, t.eval_documents)
    opt = two_speed_optimizer(params, t.lm_lr, t.head_lr)
    step = make_train_step(cfg, tc, opt, seed=t.seed)
    state = init_state(params, opt)
    order = np.random.default_rng(t.seed).permutation(len(train))
    hist = []
    for i in range(t.steps):
        rows = train[np.take(order, range(i * t.batch, (i + 1) * t.batch), mode="wrap")]
        batch = {"input_ids": jnp.asarray(rows), "attention_mask": jnp.ones_like(rows)}
        state, m = step(state, batch)
        rec = {"step": i + 1} | {k: float(m[k]) for k in (
            "nll_base", "nll_thought", "reward_mean", "gate_loss", "gate_accuracy",
            "mixing_weight_mean") if k in m}
        hist.append(rec)
        if (i + 1) % 10 == 0 or i + 1 == t.steps:
            log(f"  smollm2 step {i + 1}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in rec.items() if k != "step")
                + f" ({time.time() - t0:.0f}s)")
    t_train = time.time() - t0
    ev_rows = held[: t.eval_windows]
    batch = {"input_ids": ev_rows, "attention_mask": np.ones_like(ev_rows)}
    fn = TG.make_position_fn(cfg, tc.replace(think_k=None))
    pp = TG.per_position(fn, state.params, batch, t.seed, chunk=4)
    cand = TG.candidates(batch["attention_mask"])
    # every scored position is an "answer": pos lists each row's candidate positions
    pos = np.where(cand, np.arange(cand.shape[1])[None], -1).astype(np.int32)
    curve = TG.curve(pp, batch["attention_mask"], pos, rates, n_boot)
    never = {"accuracy": float(pp["hit_base"][cand].mean()),
             "nll": float(pp["nll_base"][cand].mean())}
    always = {"accuracy": float(pp["hit_think"][cand].mean()),
              "nll": float(pp["nll_think"][cand].mean())}
    gain = pp["nll_base"] - pp["nll_think"]
    diag = {"positions": int(cand.sum()), "train_windows": int(len(train)),
            "gain_mean": float(gain[cand].mean()),
            "gain_positive_frac": float((gain[cand] > 0).mean()),
            "mixing_weight_mean": float(pp["weight"][cand].mean()),
            "gate_gain_spearman": TG._spearman(pp["gate"][cand], gain[cand]),
            "entropy_gain_spearman": TG._spearman(pp["entropy"][cand], gain[cand])}
    return {"curve": curve, "never": never, "always": always, "diagnostics": diag,
            "must_show_style": TG.must_show(curve, always, never), "history": hist,
            "setup": dataclasses.asdict(t),
            "time_s": {"train": t_train, "total": time.time() - t0}}
