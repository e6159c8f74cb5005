"""quietstar_jax.hf: bad input, sharded checkpoints, the authors' layout, vocab growth,
tokenizers and sharded placement."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, shared_path
from safetensors.numpy import load_file, save_file

from quietstar_jax import hf
from quietstar_jax.model import ModelConfig, lm_logits, param_shapes

AUTHORS = ("fixtures", "qs_reference", "weights", "model_talkhead_perturbed")
STORIES_HF = ("data", "stories260K-hf")


def _leaves_equal(a, b) -> None:
    ka = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
    kb = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(b)[0]]
    assert ka == kb
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _rewrite(path: Path, edit) -> None:
    """Apply `edit(dict of tensors)` to the checkpoint's model.safetensors."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.fixture
def llama_ckpt(make_hf_checkpoint):
    return make_hf_checkpoint("llama")


# --------------------------------------------------------------------------- bad input


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load_pretrained(tmp_path / "nope")


def test_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        hf.load_pretrained(tmp_path / "f")


def test_no_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_pretrained(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"config\.json.*unsupported model_type 'gpt2'"):
        hf.load_pretrained(tmp_path)


def test_no_weights(llama_ckpt):
    _, path = llama_ckpt
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf.load_pretrained(path, add_thought_tokens=False)


def test_missing_tensor(llama_ckpt):
    _, path = llama_ckpt
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.safetensors.*missing tensor "
                       r"'model\.layers\.1\.mlp\.up_proj\.weight' of expected shape \[48, 32\]"):
        hf.load_pretrained(path, add_thought_tokens=False)


def test_misshaped_tensor(llama_ckpt):
    _, path = llama_ckpt
    key = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(path, lambda t: t.__setitem__(key, np.zeros((24, 32), np.float32)))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn"
                       r"\.k_proj\.weight' has shape \[24, 32\], expected \[16, 32\]"):
        hf.load_pretrained(path, add_thought_tokens=False)


def test_unknown_tensor(llama_ckpt):
    _, path = llama_ckpt
    _rewrite(path, lambda t: t.__setitem__("model.layers.2.mlp.up_proj.weight",
                                           np.zeros((48, 32), np.float32)))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model\.layers\.2\."):
        hf.load_pretrained(path, add_thought_tokens=False)


def test_rotary_inv_freq_buffers_are_ignored(llama_ckpt):
    _, path = llama_ckpt
    cfg, ref, _ = hf.load_pretrained(path, add_thought_tokens=False)
    _rewrite(path, lambda t: t.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
        "model.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    _, params, _ = hf.load_pretrained(path, add_thought_tokens=False)
    _leaves_equal(params, ref)


def test_incomplete_authors_thought_tensors(llama_ckpt):
    _, path = llama_ckpt
    _rewrite(path, lambda t: t.__setitem__("start_embedding", np.zeros((2, 32), np.float32)))
    with pytest.raises(KeyError, match="incomplete Quiet-STaR thought tensors"):
        hf.load_pretrained(path)


@pytest.mark.parametrize("edit, match", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE scaling type 'linear'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "RoPE scaling type 'yarn'"),
    (dict(rope_parameters={"full_attention": {"rope_theta": 1e4},
                           "sliding_attention": {"rope_theta": 1e6}}), "different rope_theta"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(num_attention_heads=5), "not a multiple"),
    (dict(hidden_size=None), "missing required field"),
])
def test_config_errors(edit, match):
    c = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(ValueError, match=match):
        hf.model_config_from_hf({**c, **edit}, source="x/config.json")


def test_config_forms():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2)
    cfg = hf.model_config_from_hf({**base, "model_type": "llama", "rope_theta": 5e5,
                                   "eos_token_id": [7, 8]})
    assert (cfg.rope_theta, cfg.eos_token_id, cfg.num_kv_heads) == (5e5, 7, 2)
    cfg = hf.model_config_from_hf({**base, "model_type": "llama", "rope_parameters": {
        "rope_type": "default", "rope_theta": 1234.0}})
    assert cfg.rope_theta == 1234.0
    nested = {"full_attention": {"rope_type": "default", "rope_theta": 99.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 99.0}}
    assert hf.model_config_from_hf({**base, "model_type": "mistral",
                                    "rope_parameters": nested}).rope_theta == 99.0
    assert hf.model_config_from_hf({**base, "model_type": "mistral",
                                    "sliding_window": None}).sliding_window is None
    assert hf.model_config_from_hf({**base, "model_type": "mistral",
                                    "sliding_window": 7}).sliding_window == 7
    qwen = {**base, "model_type": "qwen2", "sliding_window": 7}
    cfg = hf.model_config_from_hf(qwen)
    assert cfg.sliding_window is None and cfg.attention_bias
    assert hf.model_config_from_hf({**qwen, "use_sliding_window": True,
                                    "max_window_layers": 0}).sliding_window == 7
    assert hf.model_config_from_hf({**qwen, "use_sliding_window": True,
                                    "max_window_layers": 2}).sliding_window is None
    with pytest.raises(ValueError, match="only some layers"):
        hf.model_config_from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 1})
    cfg = hf.model_config_from_hf({**base, "model_type": "llama"}, "bfloat16", "float32",
                                  scan_layers=False, remat="full")
    assert (cfg.dtype, cfg.param_dtype, cfg.scan_layers, cfg.remat) == (
        "bfloat16", "float32", False, "full")


@pytest.mark.parametrize("cfg", [
    ModelConfig(11, 16, 24, 2, 4, 2, model_type="llama", tie_word_embeddings=True),
    ModelConfig(11, 16, 24, 2, 4, 1, head_dim=8, model_type="mistral", sliding_window=9,
                rope_theta=1e6, rms_norm_eps=1e-5),
    ModelConfig(11, 16, 24, 3, 4, 4, model_type="qwen2", attention_bias=True, sliding_window=5),
    ModelConfig(11, 16, 24, 3, 4, 4, model_type="qwen2", attention_bias=True),
])
def test_config_round_trip(cfg):
    d = hf.model_config_to_hf(cfg)
    assert hf.model_config_from_hf(json.loads(json.dumps(d))) == cfg


def test_config_export_errors():
    with pytest.raises(ValueError, match="sliding window"):
        hf.model_config_to_hf(ModelConfig(11, 16, 24, 2, 4, 2, sliding_window=4))
    with pytest.raises(ValueError, match="attention_bias"):
        hf.model_config_to_hf(ModelConfig(11, 16, 24, 2, 4, 2, attention_bias=True))


def test_export_rejects_wrong_params(llama_ckpt, tmp_path):
    _, path = llama_ckpt
    cfg, params, _ = hf.load_pretrained(path, add_thought_tokens=False)
    bad = {**params, "final_norm": jnp.ones(5)}
    with pytest.raises(ValueError, match=r"\['final_norm'\] has shape \[5\], expected \[32\]"):
        hf.save_pretrained(tmp_path / "out", bad, cfg)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# --------------------------------------------------------------------------- sharded files


def test_sharded_index_checkpoint(make_hf_checkpoint):
    _, single = make_hf_checkpoint("qwen2", name="single", seed=4)
    _, sharded = make_hf_checkpoint("qwen2", name="sharded", seed=4,
                                    save_kwargs=dict(max_shard_size="20KB"))
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    cfg1, p1, _ = hf.load_pretrained(single, add_thought_tokens=False)
    cfg2, p2, _ = hf.load_pretrained(sharded, add_thought_tokens=False)
    assert cfg1 == cfg2
    _leaves_equal(p1, p2)
    # a shard named by the index but absent is an error naming it
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard file '{victim.name}' is missing"):
        hf.load_pretrained(sharded, add_thought_tokens=False)


def test_our_sharded_export_loads_in_transformers(make_hf_checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    model, path = make_hf_checkpoint("mistral", sliding_window=6)
    cfg, params, _ = hf.load_pretrained(path, add_thought_tokens=False)
    out = hf.save_pretrained(tmp_path / "export", params, cfg, max_shard_size=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (out / "model.safetensors").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    _, again, _ = hf.load_pretrained(out, add_thought_tokens=False)
    _leaves_equal(again, params)


def test_qwen2_export_without_biases_writes_zero_biases(llama_ckpt, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    _, path = llama_ckpt
    cfg, params, _ = hf.load_pretrained(path, add_thought_tokens=False)
    qcfg = cfg.replace(model_type="qwen2")
    out = hf.save_pretrained(tmp_path / "qwen", params, qcfg, max_shard_size=25_000)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert float(model.model.layers[1].self_attn.k_proj.bias.detach().abs().max()) == 0.0
    ids = np.random.default_rng(0).integers(3, 97, size=(1, 10))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(lm_logits(params, cfg, jnp.asarray(ids))) - ref).max() <= 1e-4
    cfg2, again, _ = hf.load_pretrained(out, add_thought_tokens=False)
    assert cfg2.attention_bias and float(jnp.abs(again["layers"]["attn"]["q_bias"]).max()) == 0.0


def test_save_into_a_non_empty_directory_needs_overwrite_and_keeps_other_files(llama_ckpt,
                                                                              tmp_path):
    _, path = llama_ckpt
    cfg, params, _ = hf.load_pretrained(path, add_thought_tokens=False)
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty"):
        hf.save_pretrained(out, params, cfg)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    hf.save_pretrained(out, params, cfg, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [hf.EXPORT_MANIFEST, "config.json",
                                                     "model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bfloat16_params_round_trip(llama_ckpt, tmp_path):
    _, path = llama_ckpt
    cfg, params, _ = hf.load_pretrained(path, "bfloat16", add_thought_tokens=False)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
    out = hf.save_pretrained(tmp_path / "bf16", params, cfg)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    cfg2, again, _ = hf.load_pretrained(out, "bfloat16", add_thought_tokens=False)
    assert cfg2 == cfg
    _leaves_equal(again, params)
    # a bf16 file read as float32 holds exactly the bf16 values
    _, as_f32, _ = hf.load_pretrained(out, "float32", add_thought_tokens=False)
    np.testing.assert_array_equal(np.asarray(as_f32["embed"]),
                                  np.asarray(params["embed"]).astype(np.float32))


# --------------------------------------------------------------------------- authors' layout


def test_authors_layout_round_trip(tmp_path):
    src = shared_path(*AUTHORS)
    raw = load_file(str(src / "model.safetensors"))
    cfg, params, tok = hf.load_pretrained(src)
    assert tok is None
    assert cfg.model_type == "mistral" and cfg.vocab_size == 512 and cfg.sliding_window == 4096
    th = params["thought"]
    np.testing.assert_array_equal(th["start_emb"], raw["start_embedding"][0])
    np.testing.assert_array_equal(th["end_emb"], raw["end_embedding"][0])
    np.testing.assert_array_equal(th["mix"]["w0"], raw["talk_head.0.0.weight"].T)
    np.testing.assert_array_equal(th["mix"]["b0"], raw["talk_head.0.0.bias"])
    np.testing.assert_array_equal(th["mix"]["w1"], raw["talk_head.0.2.weight"].T)
    np.testing.assert_array_equal(th["mix"]["b1"], raw["talk_head.0.2.bias"])
    np.testing.assert_array_equal(th["mix"]["w2"], raw["talk_head.0.4.weight"].T)
    assert th["mix"]["w2"].shape == (64, 1) and float(jnp.abs(th["mix"]["w2"]).max()) > 0
    q1 = raw["model.layers.1.self_attn.q_proj.weight"]  # [heads * head_dim, H]
    np.testing.assert_array_equal(params["layers"]["attn"]["q"][1], q1.T.reshape(64, 4, 16))

    out = hf.save_pretrained(tmp_path / "authors", params, cfg)
    exported = load_file(str(out / "model.safetensors"))
    assert set(exported) == set(raw)
    for k, v in raw.items():
        if k in ("start_embedding", "end_embedding"):
            np.testing.assert_array_equal(exported[k][0], v[0])
            np.testing.assert_array_equal(exported[k][1], np.zeros_like(v[1]))
        else:
            np.testing.assert_array_equal(exported[k], v, err_msg=k)
    cfg2, again, _ = hf.load_pretrained(out)
    assert cfg2 == cfg
    _leaves_equal(again, params)


def test_authors_export_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    src = shared_path(*AUTHORS)
    cfg, params, _ = hf.load_pretrained(src)
    out = hf.save_pretrained(tmp_path / "authors", params, cfg)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(3, 510, size=(2, 16))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(lm_logits(params, cfg, jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4


def test_authors_zero_head_loads_as_zero():
    cfg, params, _ = hf.load_pretrained(shared_path("fixtures", "qs_reference", "weights",
                                                    "model_talkhead_zero"))
    assert float(jnp.abs(params["thought"]["mix"]["w2"]).max()) == 0.0


# --------------------------------------------------------------------------- vocab growth


@pytest.mark.parametrize("tied", [False, True])
def test_grow_vocab(tied):
    cfg = ModelConfig(10, 8, 16, 1, 2, 2, tie_word_embeddings=tied)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32),
                          param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    grown, cfg2 = hf.grow_vocab(params, cfg, 13)
    assert cfg2.vocab_size == 13 and cfg.vocab_size == 10
    assert grown["embed"].shape == (13, 8) and params["embed"].shape == (10, 8)
    np.testing.assert_array_equal(grown["embed"][:10], params["embed"])
    mean = np.asarray(params["embed"]).mean(0)
    for r in range(10, 13):
        np.testing.assert_allclose(grown["embed"][r], mean, rtol=1e-6)
    if tied:
        assert "lm_head" not in grown
    else:
        assert grown["lm_head"].shape == (8, 13)
        np.testing.assert_array_equal(grown["lm_head"][:, :10], params["lm_head"])
        np.testing.assert_allclose(grown["lm_head"][:, 12], np.asarray(params["lm_head"]).mean(1),
                                   rtol=1e-6)
    assert hf.grow_vocab(params, cfg, 10)[1] is cfg
    with pytest.raises(ValueError, match="shrinking"):
        hf.grow_vocab(params, cfg, 9)
    # the grown rows never win an argmax: their logit is the mean of the others
    logits = lm_logits(grown, cfg2, jnp.array([[1, 2, 3, 4]]))
    assert int(jnp.argmax(logits, -1).max()) < 10


def test_load_params_grows_like_grow_vocab(llama_ckpt):
    _, path = llama_ckpt
    cfg, params, _ = hf.load_pretrained(path, add_thought_tokens=False)
    direct = hf.load_params(path, cfg, vocab_size=cfg.vocab_size + 2)
    grown, _ = hf.grow_vocab(params, cfg, cfg.vocab_size + 2)
    for k in ("embed", "lm_head"):
        np.testing.assert_allclose(direct[k], grown[k], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- tokenizers


def test_no_tokenizer(llama_ckpt):
    _, path = llama_ckpt
    assert hf.load_tokenizer(path) is None
    with pytest.raises(ValueError, match="init_token_id"):
        hf.load_pretrained(path)
    cfg, params, tok = hf.load_pretrained(path, init_token_id=5)
    assert tok is None and cfg.vocab_size == 97
    np.testing.assert_allclose(params["thought"]["start_emb"], params["embed"][5] / 100.0)
    np.testing.assert_allclose(params["thought"]["end_emb"], params["embed"][5] / 100.0)
    assert float(jnp.abs(params["thought"]["mix"]["w2"]).max()) == 0.0
    _, plain, _ = hf.load_pretrained(path, add_thought_tokens=False)
    assert "thought" not in plain


def _stories_tokenizer_dir(tmp_path: Path, extra: dict | None = None) -> Path:
    src = shared_path(*STORIES_HF)
    d = tmp_path / "tok"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, d / name)
    if extra:
        c = json.loads((d / "tokenizer_config.json").read_text())
        c.update(extra)
        (d / "tokenizer_config.json").write_text(json.dumps(c))
    return d


def test_add_thought_tokens_and_reuse(tmp_path):
    tok = hf.load_tokenizer(_stories_tokenizer_dir(tmp_path))
    assert len(tok) == 512
    ids = hf.add_thought_tokens(tok)
    assert ids == {"start_token_id": 512, "end_token_id": 513, "pad_token_id": 2}
    assert len(tok) == 514
    enc = tok("a<|startthought|>b<|endthought|>", add_special_tokens=False)["input_ids"]
    assert 512 in enc and 513 in enc
    # adding again, or to a saved copy, reuses the tokens
    assert hf.add_thought_tokens(tok) == ids and len(tok) == 514
    tok.save_pretrained(str(tmp_path / "saved"))
    again = hf.load_tokenizer(tmp_path / "saved")
    assert len(again) == 514 and hf.thought_token_ids(again) == ids
    assert hf.add_thought_tokens(again) == ids and len(again) == 514
    assert hf.thought_init_token_id(tok) == 410


def test_conflicting_thought_tokens(tmp_path):
    d = _stories_tokenizer_dir(tmp_path, {"extra_special_tokens": {
        "start_thought_token": "<think>", "end_thought_token": "</think>"}})
    tok = hf.load_tokenizer(d)
    with pytest.raises(ValueError, match=r"different thought token.*'<think>'"):
        hf.add_thought_tokens(tok)


def test_thought_token_ids_needs_tokens(tmp_path):
    tok = hf.load_tokenizer(_stories_tokenizer_dir(tmp_path))
    with pytest.raises(ValueError, match="add_thought_tokens first"):
        hf.thought_token_ids(tok)


# --------------------------------------------------------------------------- placement


def test_sharding_argument_single_device(llama_ckpt):
    _, path = llama_ckpt
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    seen = []

    def by_path(p, shape):
        seen.append((p, shape))
        return rep

    cfg, params, _ = hf.load_pretrained(path, sharding=by_path, init_token_id=3)
    assert (("layers", "attn", "q"), (2, 32, 4, 8)) in seen
    assert (("thought", "mix", "w0"), (64, 32)) in seen
    assert all(x.sharding == rep for x in jax.tree.leaves(params))
    tree = jax.tree.map(lambda _: rep, params)
    _, again, _ = hf.load_pretrained(path, sharding=tree, init_token_id=3)
    _leaves_equal(again, params)
    _, single, _ = hf.load_pretrained(path, sharding=rep, init_token_id=3)
    assert all(x.sharding == rep for x in jax.tree.leaves(single))
    with pytest.raises(KeyError, match=r"sharding has no entry for params\['layers'\]"):
        hf.load_params(path, cfg, sharding={"embed": rep})


_SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from quietstar_jax import hf
    path = sys.argv[1]
    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))

    def rule(p, shape):
        if len(shape) >= 2 and shape[-1] % 2 == 0 and shape[0] % 2 == 0:
            return NamedSharding(mesh, P("data", *([None] * (len(shape) - 2)), "model"))
        return NamedSharding(mesh, P())

    cfg, params, _ = hf.load_pretrained(path, sharding=rule, add_thought_tokens=False)
    _, ref, _ = hf.load_pretrained(path, add_thought_tokens=False)
    q = params["layers"]["attn"]["q"]  # [2, 32, 4, 8] -> each device holds [1, 32, 4, 4]
    assert {s.data.shape for s in q.addressable_shards} == {(1, 32, 4, 4)}, q.sharding
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("OK")
""")


def test_sharded_placement_on_four_cpu_devices(llama_ckpt):
    _, path = llama_ckpt
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(path)], env=env,
                         capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout
