"""benchmarks/hlo_report.py: upcasts, collectives and large results by named scope, read
from compiled HLO text. The expected figures are computed from the arrays' shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from hlo_report import hlo_report, scope_of  # noqa: E402

MIB = 1 << 20


@pytest.mark.parametrize("op_name, scope", [
    ("jit(step)/while/body/transpose(jvp(replayed_backward))/while/body/jvp(jit(silu))/neg",
     "replayed_backward"),
    ("jit(step)/transpose(jvp(replayed_backward))/attention/dot_general", "attention"),
    ("jit(step)/base_pass/transpose(jvp(mlp))/mul;jit(step)/vocab/exp", "mlp"),
    ("jit(step)/optimizer/add", "optimizer"),
    ("jit(step)/attention_like/add", "other"),
    ("", "other"),
])
def test_scope_is_the_innermost_named_scope(op_name: str, scope: str) -> None:
    assert scope_of(op_name) == scope


def test_an_upcast_in_a_named_scope_is_counted_with_its_size() -> None:
    """A bfloat16 [1024, 1024] array widened to float32 inside `mlp` (4 MiB) and a smaller
    one (below the 1 MiB threshold) that is not counted."""
    def f(x, y):
        with jax.named_scope("mlp"):
            big = jnp.sin(x.astype(jnp.float32))
        return big.sum() + jnp.sin(y.astype(jnp.float32)).sum()

    x = jnp.ones((1024, 1024), jnp.bfloat16)
    y = jnp.ones((256, 256), jnp.bfloat16)
    hlo = jax.jit(f).lower(x, y).compile().as_text()
    r = hlo_report(hlo)
    converts = [c for c in r["upcasts"]["largest"]]
    # XLA may fuse the convert; where it survives as an instruction it is this one.
    for c in converts:
        assert c["shape"] == "f32[1024, 1024]" and c["bytes"] == 4 * MIB
    assert r["upcasts"]["count"] == len(converts) <= 1
    if converts:
        assert r["upcasts"]["by_scope"] == {"mlp": 1}
    # The same figures from handwritten HLO, where nothing can be fused away.
    text = "\n".join([
        '  %c.1 = f32[1024,1024]{1,0} convert(bf16[1024,1024]{1,0} %p.0), '
        'metadata={op_name="jit(f)/mlp/convert_element_type"}',
        '  %c.2 = f32[256,256]{1,0} convert(bf16[256,256]{1,0} %p.1), '
        'metadata={op_name="jit(f)/convert_element_type"}',
        '  %c.3 = bf16[1024,1024]{1,0} convert(f32[1024,1024]{1,0} %p.2), '
        'metadata={op_name="jit(f)/attention/convert_element_type"}',
        '  %ag = bf16[4096,2048]{1,0} all-gather(bf16[1024,2048]{1,0} %w), dimensions={0}, '
        'metadata={op_name="jit(f)/transpose(jvp(vocab))/all_gather"}',
        '  %k = f32[8]{0} custom-call(f32[8]{0} %x), custom_call_target="tpu_custom_call"',
    ])
    r = hlo_report(text)
    assert r["upcasts"]["count"] == 1 and r["upcasts"]["total_bytes"] == 4 * MIB
    assert r["upcasts"]["by_scope"] == {"mlp": 1}
    ag = r["collectives"]["all-gather"]
    assert ag["count"] == 1 and ag["total_bytes"] == 4096 * 2048 * 2
    assert ag["by_scope"] == {"vocab": 1}
    assert r["custom_calls"] == {"tpu_custom_call": 1}
    assert r["scopes"]["mlp"]["largest_bytes"] == 4 * MIB
    assert r["scopes"]["attention"]["largest_shape"] == "bf16[1024, 1024]"
    assert r["scopes"]["vocab"]["count"] == 1


def test_untyped_operands_and_widened_results_as_the_tpu_compiler_prints_them() -> None:
    """TPU HLO text names operands without their types, and marks float32 results of
    bfloat16 ops with `float_type_correction_info`: the convert's source dtype comes from
    the operand's own line, and the widened results are counted by scope."""
    text = "\n".join([
        '  %p.0 = bf16[1024,1024]{1,0:T(8,128)(2,1)} parameter(0)',
        '  %convert.7 = f32[1024,1024]{1,0:T(8,128)} convert(%p.0)',
        '  %neg.2 = f32[1024,1024]{1,0:T(8,128)} negate(%convert.7), '
        'metadata={op_name="jit(f)/transpose(jvp(mlp))/neg"}, '
        'backend_config={"float_type_correction_info":{"original_type":"BF16"}}',
        '  %neg.3 = f32[1024,1024]{1,0:T(8,128)} negate(%convert.7), '
        'metadata={op_name="jit(f)/mlp/neg"}',
    ])
    r = hlo_report(text)
    assert r["upcasts"]["count"] == 1 and r["upcasts"]["total_bytes"] == 4 * MIB
    assert r["widened"]["count"] == 1 and r["widened"]["by_scope"] == {"mlp": 1}
    assert r["widened"]["total_bytes"] == 4 * MIB


def test_a_gather_of_a_sharded_array_is_a_collective() -> None:
    """A [2048, 1024] float32 array sharded over 4 simulated devices, used whole: the
    partitioner all-gathers it, and the report shows the gathered size (8 MiB). Run in a
    subprocess, which can have 4 CPU devices."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hlo_report import hlo_report
mesh = Mesh(np.array(jax.devices()), ("x",))
w = jax.device_put(jnp.ones((2048, 1024)), NamedSharding(mesh, P("x", None)))
def f(w):
    with jax.named_scope("vocab"):
        return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P())) * 2.0
r = hlo_report(jax.jit(f).lower(w).compile().as_text())
print("DEVICES", jax.device_count())
print("GATHER", r["collectives"]["all-gather"]["largest"][0]["bytes"])
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "DEVICES 4" in p.stdout
    assert f"GATHER {2048 * 1024 * 4}" in p.stdout, p.stdout


def test_compare_hlo_hashes_the_program_not_its_source_locations() -> None:
    """benchmarks/compare_hlo.py: the same function compiled from two source locations
    (other file/line metadata and debug tables) hashes the same; one changed op does not."""
    from compare_hlo import program_hash

    x = jnp.ones((8, 8), jnp.float32)
    src_a = "def f(x):\n    return jnp.tanh(x @ x) * 2.0\n"
    src_b = "\n\n\n" + src_a  # the same program, defined three lines lower
    src_c = src_a.replace("* 2.0", "* 3.0")
    hashes = []
    for i, src in enumerate((src_a, src_b, src_c)):
        ns = {"jnp": jnp}
        exec(compile(src, f"/tmp/compare_hlo_case_{i}.py", "exec"), ns)
        text = jax.jit(ns["f"]).lower(x).compile().as_text()
        hashes.append(program_hash(text))
    assert hashes[0] == hashes[1]
    assert hashes[0][0] != hashes[2][0]
    assert hashes[0][1] > 0


def test_canonical_hash_ignores_the_names_tracing_order_gives_and_nothing_else() -> None:
    """Two traces of one program in another order (so other instruction and parameter
    names) have different program hashes and the same canonical hash; a changed op
    changes both."""
    from compare_hlo import canonical_hash, program_hash

    x = jnp.ones((8, 8), jnp.float32)

    def ab(x):
        a = jnp.sum(jnp.tanh(x))
        b = jnp.sum(jnp.exp(x))
        return a, b

    def ba(x):  # the same outputs, traced in the other order
        b = jnp.sum(jnp.exp(x))
        a = jnp.sum(jnp.tanh(x))
        return a, b

    def other(x):
        return jnp.sum(jnp.tanh(x)), jnp.sum(jnp.sin(x))

    texts = [jax.jit(f).lower(x).compile().as_text() for f in (ab, ba, other)]
    assert program_hash(texts[0]) != program_hash(texts[1])
    assert canonical_hash(texts[0]) == canonical_hash(texts[1])
    assert canonical_hash(texts[0]) != canonical_hash(texts[2])
