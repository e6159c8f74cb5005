"""Our decoder (loaded by quietstar_jax.hf) against transformers' torch models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quietstar_jax import hf
from quietstar_jax.model import lm_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import tiny_hf_model  # noqa: E402

TOL = 1e-4
BATCH, SEQ = 3, 12

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # grouped-query attention (4 heads, 2 kv heads), untied head
    "llama_gqa_untied": ("llama", {}),
    # multi-head attention, tied head, non-default RoPE base
    "llama_mha_tied_theta": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                           rope_theta=500000.0)),
    # sliding window shorter than the sequence, head_dim != hidden / heads
    "mistral_window_head_dim": ("mistral", dict(sliding_window=5, head_dim=16)),
    # q/k/v biases, one kv head, tied head
    "qwen2_bias_tied_mqa": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    # Qwen2 sliding window on every layer
    "qwen2_sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                    max_window_layers=0)),
}

_jit_logits = jax.jit(lm_logits, static_argnums=1)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> dict[str, Any]:
    """A tiny torch model, its checkpoint directory, and our (cfg, params) of it."""
    torch.set_num_threads(2)
    model_type, overrides = CASES[request.param]
    model = tiny_hf_model(model_type, seed=len(request.param), **overrides)
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    model.save_pretrained(str(path))
    cfg, params, tok = hf.load_pretrained(path, add_thought_tokens=False)
    assert tok is None
    return dict(name=request.param, model=model, path=path, cfg=cfg, params=params)


def _batch(vocab: int, padding: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask `[BATCH, SEQ]`, padded with id 0 on `padding` side."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(BATCH, SEQ)).astype(np.int32)
    mask = np.zeros((BATCH, SEQ), np.int32)
    for b, n in enumerate((SEQ, SEQ - 3, 5)):
        if padding == "right":
            mask[b, :n] = 1
        else:
            mask[b, SEQ - n:] = 1
    return np.where(mask == 1, ids, 0), mask


def torch_logits(model: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Float32 logits of a transformers model; positions count real tokens only."""
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(position_ids, dtype=torch.long))
    return out.logits.float().numpy()


def max_diff(a: Any, b: Any, mask: np.ndarray) -> float:
    """Max |a - b| over the positions where mask is 1."""
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float(d[mask.astype(bool)].max())


@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_match_torch(case, padding):
    cfg, params, model = case["cfg"], case["params"], case["model"]
    ids, mask = _batch(cfg.vocab_size, padding)
    ours = _jit_logits(params, cfg, jnp.asarray(ids), jnp.asarray(mask))
    ref = torch_logits(model, ids, mask)
    assert ours.shape == ref.shape
    diff = max_diff(ours, ref, mask)
    print(f"{case['name']} {padding}-padded: max |logit diff| = {diff:.2e}")
    assert diff <= TOL, diff
    # the logits are far from trivial: they vary by O(1) across the vocabulary
    assert float(np.std(ref[mask.astype(bool)])) > 0.3
    if cfg.sliding_window is not None:  # the window really cuts the context here
        full = _jit_logits(params, cfg.replace(sliding_window=None), jnp.asarray(ids),
                           jnp.asarray(mask))
        assert max_diff(full, ref, mask) > 1e-2


def test_config_read(case):
    cfg, model = case["cfg"], case["model"]
    c = model.config
    assert cfg.model_type == c.model_type
    assert cfg.num_kv_heads == c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert cfg.dim_per_head == head_dim
    assert cfg.tie_word_embeddings == bool(c.tie_word_embeddings)
    assert cfg.attention_bias == (c.model_type == "qwen2")
    expected_window = {"mistral_window_head_dim": 5, "qwen2_sliding": 4}.get(case["name"])
    assert cfg.sliding_window == expected_window
    if case["name"] == "llama_mha_tied_theta":
        assert cfg.rope_theta == 500000.0
    assert ("lm_head" in case["params"]) == (not cfg.tie_word_embeddings)


def test_unrolled_and_remat_give_same_numbers(case):
    cfg, params = case["cfg"], case["params"]
    ids, mask = _batch(cfg.vocab_size, "right", seed=1)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    base = _jit_logits(params, cfg, ids, mask)
    for variant in (dict(scan_layers=False, remat="full"),):
        other = _jit_logits(params, cfg.replace(**variant), ids, mask)
        np.testing.assert_allclose(np.asarray(other), np.asarray(base), atol=1e-5, rtol=0,
                                   err_msg=str(variant))


def test_remat_gradients_match():
    model = tiny_hf_model("mistral", seed=3, sliding_window=6)
    cfg = hf.model_config_from_hf(model.config.to_dict())
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    params = _params_from_state_dict(sd, cfg)
    ids, mask = _batch(cfg.vocab_size, "right", seed=2)

    def loss(p, c):
        lg = lm_logits(p, c, jnp.asarray(ids), jnp.asarray(mask))
        lp = jax.nn.log_softmax(lg[:, :-1])
        tgt = jnp.take_along_axis(lp, jnp.asarray(ids)[:, 1:, None], -1)[..., 0]
        return -(tgt * mask[:, 1:]).sum()

    grads = {}
    for name, c in (("plain", cfg), ("remat", cfg.replace(remat="full"))):
        grads[name] = jax.jit(jax.grad(loss), static_argnums=1)(params, c)
    for name in ("remat",):
        for a, b in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(grads["plain"]),
                        strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def _params_from_state_dict(sd: dict[str, np.ndarray], cfg) -> dict:
    """Load a state dict through a temporary single-file checkpoint."""
    import tempfile

    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory() as d:
        save_file({k: np.ascontiguousarray(v) for k, v in sd.items()
                   if not (cfg.tie_word_embeddings and k == "lm_head.weight")},
                  str(Path(d) / "model.safetensors"), metadata={"format": "pt"})
        return hf.load_params(d, cfg)


def test_round_trip_through_transformers(case, tmp_path):
    cfg, params, model = case["cfg"], case["params"], case["model"]
    out = hf.save_pretrained(tmp_path / "export", params, cfg)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), attn_implementation="eager", dtype=torch.float32).eval()
    assert type(reloaded).__name__ == type(model).__name__
    ids, mask = _batch(cfg.vocab_size, "right", seed=3)
    diff = max_diff(torch_logits(reloaded, ids, mask), torch_logits(model, ids, mask), mask)
    assert diff <= 1e-6, diff
    # torch weights are bitwise equal after the round trip
    sd0, sd1 = model.state_dict(), reloaded.state_dict()
    assert set(sd0) == set(sd1)
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    # and our reload of our export gives the same params
    cfg2, params2, _ = hf.load_pretrained(out, add_thought_tokens=False)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
