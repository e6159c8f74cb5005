"""Shared test helpers: the `../shared` data folder and tiny Hugging Face checkpoints."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Tests run tiny models where XLA's compile time dominates: cheaper CPU code generation
# halves it. Set before any test module imports jax; subprocess tests inherit it.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

# Many tests compile the same programs (the tiny trainer in a dozen subprocesses, the
# same step in several modules after `jax.clear_caches`): one persistent compilation
# cache for the whole run, shared by the xdist workers and the subprocesses they start
# (all inherit the environment), cuts the suite's compile time. The process that makes
# it (the controller, or the only process) deletes it at the end; a cache directory set
# by the caller is used as it is and kept.
_RUN_CACHE_DIR: str | None = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _RUN_CACHE_DIR = tempfile.mkdtemp(prefix="quietstar-jax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE_DIR
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.25")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _RUN_CACHE_DIR is not None:
        import shutil

        shutil.rmtree(_RUN_CACHE_DIR, ignore_errors=True)

REPO_ROOT = Path(__file__).resolve().parents[1]
# The project's data folder next to the repository (large files stay there) ...
SHARED = REPO_ROOT.parent / "shared"
# ... and the small files a clone needs to check the parity claims, bundled
# (tests/fixtures/PROVENANCE.md): `shared_path` parts -> the bundled copy.
FIXTURES = REPO_ROOT / "tests" / "fixtures"
BUNDLED = {
    ("fixtures", "qs_reference"): FIXTURES / "qs_reference",
    ("data", "stories260K-hf"): FIXTURES / "stories260K-hf",
    ("data", "stories260K", "reference_outputs.json"):
        FIXTURES / "stories260K" / "reference_outputs.json",
}


def shared_path(*parts: str) -> Path:
    """The bundled copy of `../shared/<parts>` if the repository has one (BUNDLED), else
    the path under `../shared`; skips the calling test when neither exists."""
    for prefix, bundled in BUNDLED.items():
        if parts[:len(prefix)] == prefix:
            path = bundled.joinpath(*parts[len(prefix):])
            if path.exists():
                return path
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} is not available (expected the project's shared/ "
                    f"folder next to the repository, at {SHARED})")
    return path


@pytest.fixture
def shared() -> Callable[..., Path]:
    """`shared("data", "stories260K-hf")` -> path, or skip when absent."""
    return shared_path


TINY_HF = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)


def tiny_hf_model(model_type: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random float32 transformers `*ForCausalLM` (eager attention) whose
    weights are scaled up so logits differ clearly between tokens: matrices
    N(0, 0.15), norms 1 + N(0, 0.1), biases N(0, 0.1)."""
    torch = pytest.importorskip("torch")
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }
    config = classes[model_type](**{**TINY_HF, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


@pytest.fixture
def make_hf_checkpoint(tmp_path: Path) -> Callable[..., tuple[Any, Path]]:
    """Factory: `make_hf_checkpoint("llama", name="ckpt", **config)` -> (torch model,
    directory it was saved to with transformers' `save_pretrained`)."""

    def make(model_type: str, name: str = "ckpt", seed: int = 0,
             save_kwargs: dict[str, Any] | None = None, **overrides: Any) -> tuple[Any, Path]:
        model = tiny_hf_model(model_type, seed=seed, **overrides)
        path = tmp_path / name
        model.save_pretrained(str(path), **(save_kwargs or {}))
        return model, path

    return make


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Every program XLA:CPU compiles keeps its JIT-ed code in memory maps of its own. One
    pytest process compiles thousands of programs, and without a release the process
    passes the kernel's per-process limit (`vm.max_map_count`, 65,530 by default) about
    two thirds into the suite; LLVM's allocator then fails inside a compile and the run
    dies with SIGSEGV. Tests within a module still share their compiles.
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def assert_grads_close(got: Any, want: Any, *, rtol: float = 1e-5,
                       leaf_scale: bool = True) -> None:
    """Every leaf of the gradient pytree `got` equals `want`'s (same structure) within
    `rtol`, and an absolute 1e-5 of the leaf's largest |want| (at least 1e-3 of it) with
    `leaf_scale` (a replayed backward sums in another order), else 1e-5; the failing
    leaf is named."""
    import jax
    import numpy as np

    flat_want = jax.tree_util.tree_leaves_with_path(want)
    flat_got = jax.tree.leaves(got)
    assert len(flat_want) == len(flat_got)
    for (path, w), g in zip(flat_want, flat_got, strict=True):
        atol = 1e-5 * max(float(np.abs(w).max()), 1e-3) if leaf_scale else 1e-5
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))
