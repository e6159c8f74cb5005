"""The NNX modules: the params pytree is their state, the functions are their calls,
the logical axes are their Params' metadata, and `load_model` is `load_pretrained`
as a module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path
from flax import nnx

import quietstar_jax as qs
from quietstar_jax import model, sharding, thought
from quietstar_jax.model import CausalLM, DecoderLayer, ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                  num_heads=4, num_kv_heads=2)
CASES = {
    "llama": CFG,
    "qwen2-tied": CFG.replace(model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
    "unrolled-remat": CFG.replace(scan_layers=False, remat="mlp", param_dtype="bfloat16"),
}


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def test_load_model_is_a_module_with_the_logits_of_lm_logits():
    path = shared_path("data", "stories260K-hf")
    m, tok = qs.load_model(path)
    assert isinstance(m, nnx.Module) and isinstance(m, CausalLM)
    assert nnx.Module in type(m).__mro__
    cfg, params, tok2 = qs.load_pretrained(path)
    assert m.cfg == cfg and len(tok) == len(tok2)
    ids = jnp.asarray([tok("One day, a clever fox found a shiny key.")["input_ids"]])
    mask = jnp.ones_like(ids).at[0, -2:].set(0)
    want = qs.lm_logits(params, cfg, ids, mask)
    np.testing.assert_allclose(np.asarray(m(ids, mask)), np.asarray(want), atol=1e-6, rtol=0)
    # Compiled, like against like (XLA's fusions round differently from op-by-op).
    jitted = nnx.jit(lambda mod, x, k: mod(x, k))(m, ids, mask)
    want_jit = jax.jit(qs.lm_logits, static_argnums=1)(params, cfg, ids, mask)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(want_jit), atol=1e-6, rtol=0)
    # nnx.split gives (graph, params): the params are load_pretrained's pytree ...
    graph, state = nnx.split(m)
    pure = nnx.to_pure_dict(state)
    assert jax.tree.structure(pure) == jax.tree.structure(params)
    for (p, a), (_, b) in zip(_leaves(pure), _leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))
    # ... and merging that plain dict back gives the module.
    again = nnx.merge(graph, pure)
    np.testing.assert_array_equal(np.asarray(again(ids, mask)), np.asarray(m(ids, mask)))
    # Without thought tokens there are no thought params: a plain CausalLM.
    plain, _ = qs.load_model(path, add_thought_tokens=False)
    assert type(plain) is CausalLM and not hasattr(plain, "thought")


@pytest.mark.parametrize("case", list(CASES))
def test_params_are_the_module_state(case):
    cfg = CASES[case]
    lm = CausalLM(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    params = model.to_params(lm)
    assert jax.tree.map(jnp.shape, params) == model.param_shapes(cfg)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(cfg.param_dtype)}
    assert set(params) == {"embed", "layers", "final_norm"} | (
        set() if cfg.tie_word_embeddings else {"lm_head"})
    assert ("q_bias" in params["layers"]["attn"]) == cfg.attention_bias
    # The norms are RMSNorm params, the projections plain Params; a layer holds an
    # Attention and an MLP.
    assert isinstance(lm.layers.attn_norm, model.RMSNorm) and isinstance(lm.final_norm,
                                                                         nnx.Param)
    assert type(lm.layers.attn.q) is nnx.Param
    assert isinstance(lm.layers.attn, model.Attention) and isinstance(lm.layers.mlp, model.MLP)
    # init_params is the module's state; from_params gives the module back.
    np.testing.assert_array_equal(
        np.asarray(model.init_params(cfg, jax.random.key(0))["layers"]["attn"]["q"], np.float32),
        np.asarray(params["layers"]["attn"]["q"], np.float32))
    back = model.to_params(model.from_params({**params, "thought": {}}, cfg))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(lm(ids)), np.asarray(model.lm_logits(params, cfg,
                                                                                  ids)))


def test_the_per_layer_function_is_one_scan_step():
    cfg = CFG.replace(attention_bias=True)
    params = model.init_params(cfg, jax.random.key(0))
    h = jax.random.normal(jax.random.key(1), (2, 5, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    tabs = model.rope_tables(pos, cfg.dim_per_head, cfg.rope_theta)
    mask = model.causal_mask(pos, jnp.ones((2, 5), bool), None)
    for i in range(cfg.num_layers):
        lp = jax.tree.map(lambda a, i=i: a[i], params["layers"])
        h_fn, k_fn, _ = model.layer(lp, cfg, h, tabs, mask, None, None)
        h_mod, k_mod, _ = model.from_params(lp, cfg, DecoderLayer)(h, tabs, mask)
        np.testing.assert_array_equal(np.asarray(h_fn), np.asarray(h_mod))
        np.testing.assert_array_equal(np.asarray(k_fn), np.asarray(k_mod))
        h = h_fn
    h_all, kv = model.decoder(params, cfg, jax.random.normal(jax.random.key(1), h.shape), pos,
                              self_mask=mask)
    np.testing.assert_allclose(
        np.asarray(h_all),
        np.asarray(model.rms_norm(h, params["final_norm"], cfg.rms_norm_eps)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(kv.k[-1]), np.asarray(k_fn), atol=1e-5)


def test_from_params_rejects_params_of_another_config():
    params = model.init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match=r"missing \['layers/attn/k_bias', 'layers/attn/q_bias', "
                                         r"'layers/attn/v_bias'\], unexpected \[\]"):
        model.from_params(params, CFG.replace(attention_bias=True))
    # Keys the module does not have are ignored at the top (`thought`, an unused
    # `lm_head` under tied embeddings), never inside.
    model.from_params({**params, "thought": {}}, CFG.replace(tie_word_embeddings=True))
    extra = {**params, "layers": {**params["layers"], "q2": params["layers"]["attn"]["q"]}}
    with pytest.raises(ValueError, match=r"unexpected \['layers/q2'\]"):
        model.decoder(extra, CFG, jnp.zeros((1, 3, 32)), jnp.zeros((1, 3), jnp.int32))
    del params["lm_head"]
    with pytest.raises(ValueError, match=r"missing \['lm_head'\]"):
        model.lm_logits(params, CFG, jnp.zeros((1, 3), jnp.int32))


def test_logical_axes_are_the_params_metadata():
    cfg = CFG.replace(attention_bias=True)
    axes = sharding.params_logical_axes(cfg)
    lm = thought.QuietStarLM(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(lm, nnx.Param)
    meta = nnx.to_pure_dict(state, extract_fn=lambda v: v.get_metadata("out_sharding"))
    assert meta == axes
    flat = jax.tree_util.tree_flatten_with_path(
        axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    shapes = {p: a.shape for p, a in _leaves(model.to_params(lm))}
    assert len(flat) == len(shapes)
    for path, names in flat:
        assert len(names) == len(shapes[path]), path
        assert set(names) <= set(sharding.DEFAULT_RULES), path
        if path[0].key == "layers":
            assert names[0] == "layers"


def test_thought_params_module():
    params = model.init_params(CFG, jax.random.key(0))
    th = thought.init_thought_params(params, CFG, jax.random.key(1), init_token_id=5,
                                      embedding_scale=10.0)
    assert jax.tree.map(jnp.shape, th) == thought.thought_param_shapes(CFG)
    row = np.asarray(params["embed"][5]) / 10.0
    np.testing.assert_allclose(np.asarray(th["start_emb"]), row, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(th["end_emb"]), row, rtol=1e-6)
    assert not np.any(np.asarray(th["mix"]["w2"]))
    bound = 1 / np.sqrt(2 * CFG.hidden_size)
    assert 0 < np.abs(np.asarray(th["mix"]["w0"])).max() <= bound
    mix = dict(th["mix"], w2=0.1 * jax.random.normal(jax.random.key(2), (CFG.hidden_size, 1)))
    b, t = jax.random.normal(jax.random.key(3), (2, 2, 4, CFG.hidden_size))
    head = model.from_params(mix, CFG, thought.MixingHead)
    np.testing.assert_array_equal(np.asarray(thought.mixing_weight(mix, b, t)),
                                  np.asarray(head(b, t)))
    x = jnp.concatenate([b, t], -1)
    x = jax.nn.relu(x @ mix["w0"] + mix["b0"])
    x = jax.nn.relu(x @ mix["w1"] + mix["b1"])
    np.testing.assert_allclose(np.asarray(head(b, t)), np.asarray((x @ mix["w2"])[..., 0]),
                               atol=1e-6)
    # A QuietStarLM holds the whole pytree of the trainer: the model's and `thought`.
    full = model.to_params(thought.QuietStarLM(CFG, rngs=nnx.Rngs(0), init_token_id=5))
    assert set(full) == set(params) | {"thought"}
    assert jax.tree.structure(full["thought"]) == jax.tree.structure(th)


def test_module_shardings_read_the_params_metadata_through_flax():
    """`sharding.module_shardings` (Flax's `nnx.get_partition_spec` of the module) gives
    the shardings the trainer derives from `params_logical_axes`, leaf by leaf, on a
    mesh that divides neither the vocabulary (258 rows) nor the kv heads (2) by tensor=4."""
    cfg = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    mesh = jax.sharding.AbstractMesh((1, 2, 4), sharding.MESH_AXES)
    lm = nnx.eval_shape(lambda: thought.QuietStarLM(cfg, rngs=nnx.Rngs(0)))
    got = sharding.module_shardings(lm, mesh)
    params = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
    want = sharding.param_shardings(mesh, params, sharding.params_logical_axes(cfg))
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    assert len(flat_got) == len(flat_want) > 10
    for path, sh in flat_got:
        assert sh.spec == flat_want[path].spec, path
    assert got["embed"].spec == jax.sharding.PartitionSpec(None, "fsdp")  # 258 % 4 != 0
    assert got["layers"]["attn"]["q"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert got["layers"]["attn"]["k"].spec == jax.sharding.PartitionSpec(None, "fsdp")  # 2 kv heads
