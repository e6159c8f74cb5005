"""quietstar_jax.hf as a package: every name callers use is importable from it, and
the shards of an export are huggingface_hub's plan with the standard index."""

from __future__ import annotations

import json

import jax
import numpy as np

from quietstar_jax import hf

CALLER_NAMES = (  # what quietstar_jax, train/, evaluation, generation, benchmarks, tests use
    "add_thought_tokens", "grow_vocab", "load_model", "load_params", "load_pretrained",
    "load_tokenizer", "model_config_from_hf", "model_config_to_hf", "save_pretrained",
    "special_token_ids", "thought_init_token_id", "thought_token_ids", "tensor_specs",
    "has_authors_thought_params", "START_THOUGHT_TOKEN", "END_THOUGHT_TOKEN",
    "AUTHORS_THOUGHT_KEYS", "SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME", "TensorSpec",
)


def test_public_names():
    assert sorted(hf.__all__) == sorted(set(hf.__all__))
    for name in CALLER_NAMES:
        assert name in hf.__all__ and getattr(hf, name) is not None, name
    assert not hasattr(hf, "export_pretrained")


def test_tensor_larger_than_a_shard_gets_its_own(make_hf_checkpoint, tmp_path):
    _, path = make_hf_checkpoint("llama")
    cfg, params, _ = hf.load_pretrained(path, add_thought_tokens=False)
    # the [97, 32] float32 embedding (12,416 bytes) is larger than a 5,000-byte shard
    out = hf.save_pretrained(tmp_path / "export", params, cfg, max_shard_size=5_000)
    index = json.loads((out / hf.SAFE_WEIGHTS_INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert [k for k, f in index["weight_map"].items()
            if f == index["weight_map"]["model.embed_tokens.weight"]] == [
        "model.embed_tokens.weight"]
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(out / f), framework="numpy") as h:
            total += sum(h.get_tensor(k).nbytes for k in h.keys())
    assert index["metadata"]["total_size"] == total
    _, again, _ = hf.load_pretrained(out, add_thought_tokens=False)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
