"""benchmarks/flops.py: the analytic FLOP count keeps the formula and the numbers of the
function it replaced (`step_benchmark.analytic_flops` at 5d81c96), whose outputs on the
cpu-small and smollm2 presets (and two sweep points) are recorded here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

# step_benchmark.analytic_flops(PRESETS[name]) before the split (5d81c96).
OLD = {
    "cpu-small": {
        "plain_useful": 23360176128.0,
        "qs_useful": 353340751872.0,
        "ratio_useful": 15.125774306490708,
        "plain_dense": 24159191040.0,
        "qs_dense": 365325975552.0,
        "ratio_dense": 15.121614583333333,
        "qs_forward_parts": {
            "base_pass_linear": 0.05469890673409067,
            "base_pass_attention": 0.002296926747622948,
            "base_logits": 0.009116484455681778,
            "thought_steps_linear": 0.7657846942772694,
            "thought_steps_attention_ctx": 0.03215697446672127,
            "thought_steps_attention_own": 0.003739183077525729,
            "sampling_logits": 0.082048360101136,
            "talk_logits": 0.03646593782272711,
            "mixing_head": 0.01369253231722517
        }
    },
    "cpu-small:n_ahead=4": {
        "plain_useful": 23360176128.0,
        "qs_useful": 165402378240.0,
        "ratio_useful": 7.080527875033665,
        "plain_dense": 24159191040.0,
        "qs_dense": 170995482624.0,
        "ratio_dense": 7.077864583333334,
        "qs_forward_parts": {
            "base_pass_linear": 0.11685051350323317,
            "base_pass_attention": 0.004906808672499049,
            "base_logits": 0.019475085583872193,
            "thought_steps_linear": 0.701103081019399,
            "thought_steps_attention_ctx": 0.029440852034994296,
            "thought_steps_attention_own": 0.001597565614302016,
            "sampling_logits": 0.019475085583872193,
            "talk_logits": 0.07790034233548877,
            "mixing_head": 0.029250665652339292
        }
    },
    "cpu-small:seq=256": {
        "plain_useful": 48330964992.0,
        "qs_useful": 730840694784.0,
        "ratio_useful": 15.121582921114292,
        "plain_dense": 51539607552.0,
        "qs_dense": 778970333184.0,
        "ratio_dense": 15.114013671875,
        "qs_forward_parts": {
            "base_pass_linear": 0.052890740676973934,
            "base_pass_attention": 0.004424778761061947,
            "base_logits": 0.008815123446162322,
            "thought_steps_linear": 0.7404703694776351,
            "thought_steps_attention_ctx": 0.061946902654867256,
            "thought_steps_attention_own": 0.003615577975965015,
            "sampling_logits": 0.0793361110154609,
            "talk_logits": 0.03526049378464929,
            "mixing_head": 0.013239902207224269
        }
    },
    "smollm2": {
        "plain_useful": 208288088064.0,
        "qs_useful": 3092525678592.0,
        "ratio_useful": 14.847347764034254,
        "plain_dense": 209960239104.0,
        "qs_dense": 3117607944192.0,
        "ratio_dense": 14.848563506577783,
        "qs_forward_parts": {
            "base_pass_linear": 0.052731830376990245,
            "base_pass_attention": 0.00055787255444407,
            "base_logits": 0.014062393610842983,
            "thought_steps_linear": 0.7382456252778634,
            "thought_steps_attention_ctx": 0.00781021576221698,
            "thought_steps_attention_own": 0.0018023574835885339,
            "sampling_logits": 0.12656154249758683,
            "talk_logits": 0.05624957444337193,
            "mixing_head": 0.001978587993094968
        }
    },
    "smollm2:n_ahead=4": {
        "plain_useful": 208288088064.0,
        "qs_useful": 1421761904640.0,
        "ratio_useful": 6.825939581351094,
        "plain_dense": 209960239104.0,
        "qs_dense": 1433466961920.0,
        "ratio_dense": 6.827325821485458,
        "qs_forward_parts": {
            "base_pass_linear": 0.1146989091406916,
            "base_pass_attention": 0.001213448745791822,
            "base_logits": 0.03058762033366729,
            "thought_steps_linear": 0.6881934548441496,
            "thought_steps_attention_ctx": 0.007280692474750932,
            "thought_steps_attention_own": 0.0007840745742039465,
            "sampling_logits": 0.03058762033366729,
            "talk_logits": 0.12235048133466916,
            "mixing_head": 0.004303698218408329
        }
    },
    "smollm2:seq=256": {
        "plain_useful": 853536669696.0,
        "qs_useful": 12675867475968.0,
        "ratio_useful": 14.85099343240016,
        "plain_dense": 880609591296.0,
        "qs_dense": 13081961299968.0,
        "ratio_dense": 14.855574398996922,
        "qs_forward_parts": {
            "base_pass_linear": 0.05145984362148649,
            "base_pass_attention": 0.0021525357764847052,
            "base_logits": 0.013723183340769027,
            "thought_steps_linear": 0.7204378107008109,
            "thought_steps_attention_ctx": 0.030135500870785873,
            "thought_steps_attention_own": 0.0017588813737812767,
            "sampling_logits": 0.12350865006692124,
            "talk_logits": 0.05489273336307611,
            "mixing_head": 0.0019308608858843348
        }
    }
}


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("key", sorted(OLD))
def test_analytic_flops_unchanged(key: str) -> None:
    flops = _load("flops")
    presets = _load("step_benchmark").PRESETS
    name, _, point = key.partition(":")
    c = dict(presets[name])
    if point:
        field, value = point.split("=")
        c[field] = int(value)
    assert flops.analytic_flops(c) == OLD[key]
