"""The analytic FLOP count of one update step, and the chips' peak FLOP/s (for MFU).

Matmuls only: the base pass, one forward over all positions per thought/talk step with
attention over the base keys plus the position's own keys, the logits where they are
computed, the mixing head; backward = 2x forward. `useful` counts the causal attention
a query needs, `dense` what the implementation computes.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from quietstar_jax.thought.schedule import ThoughtSchedule

# Dense peak FLOP/s per chip by device kind (substring, lower case) and compute dtype.
PEAK_FLOPS = {
    # GPUs: dense tensor-core peaks (bf16/fp16; float32 is the TF32 tensor-core peak).
    "h200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "h100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "l4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "a10": {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12},
    # TPUs (per chip).
    "tpu v4": {"bfloat16": 275e12, "float32": 275e12 / 2},
    "tpu v5 lite": {"bfloat16": 197e12},
    "tpu v5e": {"bfloat16": 197e12},
    "tpu v5p": {"bfloat16": 459e12},
    "tpu v5": {"bfloat16": 459e12},
    "tpu v6": {"bfloat16": 918e12},
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    kind = device_kind.lower()
    for key, table in PEAK_FLOPS.items():
        if key in kind:
            return table.get(dtype)
    return None


def analytic_flops(c: dict[str, Any]) -> dict[str, float]:
    """Matmul FLOPs of one update step, Quiet-STaR and plain (forward + 2x backward).

    `useful` counts the causal attention a query needs (base keys j <= i); `dense` counts
    what the implementation computes (scores against all L base keys, then masked).
    Elementwise work (norms, rope, softmax, sampling, the optimiser) is not counted.
    """
    h, m, nl, v = c["hidden"], c["intermediate"], c["layers"], c["vocab"]
    nh, nkv = c["heads"], c["kv_heads"]
    d = c["head_dim"] or h // nh
    rows, seq = c["batch"] * c["n_passes"], c["seq"]
    tok = rows * seq
    linear = nl * (2 * h * (nh + 2 * nkv) * d + 2 * nh * d * h + 6 * h * m)  # per token
    attn_key = nl * 4 * nh * d  # per (query, key) pair: q.k and p.v
    logits = 2 * h * v  # per token
    mix = 2 * (2 * h * h + h * h + h)  # mixing head per token
    causal_keys = rows * seq * (seq + 1) / 2
    dense_keys = rows * seq * seq
    # What each position's thought runs, from the schedule the rollout runs.
    counts = ThoughtSchedule.of(SimpleNamespace(n_ahead=c["n_ahead"],
                                                n_ahead_talk=c["n_ahead_talk"])).flop_counts()
    steps = counts.forwarded_steps
    n_sample_logits = counts.sampling_logits  # logits r_{s-1} for each sampled token
    n_talk = counts.talk_logits
    own_keys = tok * counts.own_keys  # step s sees its own keys of steps 1..s

    out = {}
    for kind, base_keys in (("useful", causal_keys), ("dense", dense_keys)):
        plain_fwd = tok * (linear + logits) + attn_key * base_keys
        qs_fwd = (
            plain_fwd  # base pass + base logits
            + steps * (tok * linear + attn_key * base_keys)  # thought/talk step forwards
            + attn_key * own_keys
            + (n_sample_logits + n_talk) * tok * logits
            + counts.mixing_heads * tok * mix
        )
        out[f"plain_{kind}"] = 3.0 * plain_fwd
        out[f"qs_{kind}"] = 3.0 * qs_fwd
        out[f"ratio_{kind}"] = qs_fwd / plain_fwd
    # A breakdown of the useful Quiet-STaR forward (fractions), for the report.
    parts = {
        "base_pass_linear": tok * linear,
        "base_pass_attention": attn_key * causal_keys,
        "base_logits": tok * logits,
        "thought_steps_linear": steps * tok * linear,
        "thought_steps_attention_ctx": steps * attn_key * causal_keys,
        "thought_steps_attention_own": attn_key * own_keys,
        "sampling_logits": n_sample_logits * tok * logits,
        "talk_logits": n_talk * tok * logits,
        "mixing_head": n_talk * tok * mix,
    }
    total = sum(parts.values())
    out["qs_forward_parts"] = {k: x / total for k, x in parts.items()}
    return out
