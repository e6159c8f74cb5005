"""benchmarks/tpu_compile.py: the trainer's step compiled by the TPU compiler on this host.

The compiling tests need libtpu (the TPU compiler) and are skipped without it: `.ci/run`
installs the libtpu jax pins into ~/.cache/quietstar/libtpu (a side directory, so that
JAX's start-up elsewhere is untouched); `pip install -e ".[tpu-aot]"` also works.
Each compile runs in a subprocess, as the script runs, with `JAX_PLATFORMS=cpu`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tpu_compile.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import tpu_compile as T  # noqa: E402  (defines no flags on import)

# A tiny model of the default config: one layer, short thoughts, 4 x 16 tokens.
TINY = ["--config", str(ROOT / "configs" / "default.py"), "--config.model.hidden_size=32",
        "--config.model.intermediate_size=64", "--config.model.num_layers=1",
        "--config.model.num_heads=2", "--config.model.num_kv_heads=2",
        "--config.thought.n_ahead=4", "--config.thought.n_ahead_talk=2",
        "--config.data.seq_len=16", "--config.batch_size=4", "--config.grad_accum=2"]


def _libtpu() -> str:
    try:
        so, _ = T.find_libtpu()
    except T.ToolError as e:
        pytest.skip(f"libtpu (the TPU compiler) is not available: {e}")
    return so


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("TPU_LIBRARY_PATH", None)
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def _error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("tpu_compile.py:")]


def test_tiny_step_compiles_and_does_not_fit_a_smaller_budget(tmp_path: Path) -> None:
    """One compile of the tiny step for a v5e 2x2 slice: the JSON's fields, and (with a
    pretend HBM of a few KiB) the one-line "does not fit" and exit status 2 after the
    figures are printed and written."""
    so = _libtpu()
    out = tmp_path / "r.json"
    p = _run(["--topology", "v5e:2x2", "--mesh", "1,2,2", "--hbm_gib", "1e-6", "--out",
              str(out), "--libtpu", so, *TINY], _env())
    assert p.returncode == 2, p.stdout + p.stderr[-3000:]
    errors = _error_lines(p.stderr)
    assert len(errors) == 1, p.stderr[-3000:]
    assert "does not fit: needs " in errors[0] and "GB per chip, the chip has 0.0 GB" in errors[0]
    assert "peak per chip" in p.stdout and "DOES NOT FIT" in p.stdout

    r = json.loads(out.read_text())
    assert r["topology"] == "v5e:2x2" and r["chips"] == 4
    assert r["device_kind"].startswith("TPU v5")
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert r["model"]["num_layers"] == 1 and r["model"]["hidden_size"] == 32
    assert r["grad_accum"] == 2 and r["micro_batch"] == 2
    pc = r["per_chip"]
    for k in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes", "param_bytes",
              "opt_state_bytes"):
        assert pc[k] > 0, k
    assert pc["peak_bytes"] == (pc["argument_bytes"] + pc["output_bytes"] - pc["alias_bytes"]
                                + pc["temp_bytes"])
    # The donated state comes back in place; params and AdamW moments are arguments.
    assert pc["alias_bytes"] > 0
    assert pc["argument_bytes"] >= pc["param_bytes"] + pc["opt_state_bytes"]
    assert pc["chip_hbm_gib"] == 16 and r["fits"] is False
    assert r["compile_s"] > 0 and r["compiler_cost"]["flops"] > 0
    rf = r["roofline_estimate"]
    assert "estimate" in rf["note"] and rf["step_s"] >= rf["compute_s"] > 0
    assert rf["chip_peak_bf16_flops"] == 197e12
    # The HLO summary (tests/test_hlo_report.py checks its figures): FSDP over 2 chips
    # makes the partitioner gather the weights.
    hr = r["hlo_report"]
    assert {"upcasts", "collectives", "scopes", "custom_calls"} <= set(hr)
    assert hr["collectives"], hr
    assert "HLO (results >= 1 MiB)" in p.stdout


def test_cost_analysis_counts_a_loop_body_once() -> None:
    """Why the roofline uses the analytic FLOP count: the TPU compiler's cost analysis of a
    scan of 4 matmuls reports what a scan of 2 does (the loop body, counted once)."""
    so = _libtpu()
    code = f"""
import os
os.environ["TPU_LIBRARY_PATH"] = {so!r}
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
dev = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
x = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=SingleDeviceSharding(dev))
def flops(n):
    f = lambda a: jax.lax.scan(lambda c, _: (jnp.tanh(c @ c), None), a, None, length=n)[0]
    return jax.jit(f).lower(x).compile().cost_analysis()["flops"]
print("FLOPS", flops(2), flops(4))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_env(), timeout=120)
    line = [x for x in p.stdout.splitlines() if x.startswith("FLOPS")]
    assert line, p.stderr[-3000:]
    two, four = (float(v) for v in line[0].split()[1:])
    assert two == four > 2 * 256**3


def test_missing_libtpu_is_one_line_naming_what_to_install(tmp_path: Path) -> None:
    """No libtpu anywhere the script looks: one line naming the pip command, exit 2."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed in this environment")
    p = _run(["--topology", "v5e:2x2", *TINY],
             _env(QUIETSTAR_LIBTPU_DIR=str(tmp_path / "none")), timeout=120)
    assert p.returncode == 2
    (line,) = _error_lines(p.stderr)
    assert "libtpu is not installed" in line and "pip install --target" in line
    assert T.libtpu_requirement() in line


def test_mismatched_libtpu_is_one_line(tmp_path: Path) -> None:
    """A libtpu whose version is not the one jax pins: one line, exit 2, before compiling."""
    pkg = tmp_path / "libtpu"
    pkg.mkdir()
    (pkg / "libtpu.so").write_bytes(b"")
    (tmp_path / "libtpu-0.0.1.dist-info").mkdir()
    p = _run(["--topology", "v5e:2x2", "--libtpu", str(tmp_path), *TINY], _env(), timeout=120)
    assert p.returncode == 2
    (line,) = _error_lines(p.stderr)
    assert "libtpu 0.0.1" in line and "does not match jax" in line


def test_topology_names() -> None:
    assert T.parse_topology("v5p-32")["libtpu_name"] == "v5:2x2x4"
    assert T.parse_topology("v5p-32")["chips"] == 16
    assert T.parse_topology("v4:2x2x1")["chip_config"] == "megacore"
    assert T.parse_topology("v5e-16")["name"] == "v5e:4x4"
    with pytest.raises(T.ToolError, match="unknown topology"):
        T.parse_topology("v9:2x2")
    assert T._version_matches("0.0.42.1", "libtpu==0.0.42.*")
    assert not T._version_matches("0.0.43", "libtpu==0.0.42.*")
    assert T._version_matches("0.0.42.1", "libtpu==0.0.42.1")


def test_model_shapes_as_the_trainer_would_load_them(tmp_path: Path) -> None:
    """A checkpoint's config.json (no weights), grown by the two thought tokens; the
    published shapes when the checkpoint is absent; shape fields on the command line win."""
    from quietstar_jax.train.config import base_config

    config = base_config()
    config.model.dtype, config.model.remat = "bfloat16", "full"
    hf_config = dict(T.KNOWN_MODELS["mistral-7b-v0.1"], num_hidden_layers=3, vocab_size=1000)
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    config.model.hf_path = str(tmp_path)
    cfg, source = T.model_config(config, [])
    assert (cfg.vocab_size, cfg.num_layers, cfg.hidden_size) == (1002, 3, 4096)
    assert cfg.dtype == "bfloat16" and cfg.remat == "full" and "config.json" in source

    config.model.hf_path = str(tmp_path / "elsewhere" / "Mistral-7B-v0.1")
    config.model.num_layers = 2
    cfg, source = T.model_config(config, ["--config.model.num_layers=2"])
    assert (cfg.vocab_size, cfg.num_layers, cfg.num_kv_heads) == (32002, 2, 8)
    assert "published shapes" in source and "num_layers=2" in source

    config.model.hf_path = str(tmp_path / "unknown-model")
    with pytest.raises(T.ToolError, match="no config.json"):
        T.model_config(config, [])
