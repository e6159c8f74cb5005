"""The figures quoted in README.md, BENCHMARKS.md, docs/TRAINING.md and
docs/EXPERIMENTS.md, from the results JSON (benchmarks/results/, and the experiments'
results under experiments/results/).

Each quoted figure has a short id in `FIGURES`: the results file it comes from (under
`benchmarks/results/`), the key path to its value in that file, and how it is written.
In the docs the figure sits between markers, `<!-- fig:ID -->13.30<!-- /fig -->` (the
markers render as nothing), so that

    python benchmarks/report.py --check   # exit 1, listing every marked figure whose
                                          # text is not what its JSON says
    python benchmarks/report.py --write   # rewrite every marked figure from its JSON

A figure with no JSON behind it (the authors' PyTorch timings of issue 7, the figures of
the older hand-written runs quoted in prose, ranges over several runs) carries no marker.
Its command line is the package's (`command_line.CommandLine`, absl flags): run it with the
project installed or on `PYTHONPATH`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from absl import flags

from quietstar_jax.command_line import CommandLine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ("README.md", "BENCHMARKS.md", "docs/TRAINING.md", "docs/EXPERIMENTS.md")
# <!-- fig:ID -->TEXT<!-- /fig -->, on one line.
MARKER = re.compile(r"<!-- fig:([A-Za-z0-9_.-]+) -->(.*?)<!-- /fig -->")

GB, GIB, GIGA = 1e-9, 2.0**-30, 1e-9


class FigureError(ValueError):
    """A figure id, results file or key path that does not resolve."""


@dataclasses.dataclass(frozen=True)
class Figure:
    """One quoted figure: `fmt.format(value * scale)` (of `1 / value` when `invert`),
    value = the JSON of `file` (relative to the results directory) at `path` (dict keys
    and list indices)."""

    file: str
    path: tuple[str | int, ...]
    fmt: str = "{:.2f}"
    scale: float = 1.0
    invert: bool = False


_S2 = "ab_2026-12-02/t_integ_smollm2_1.json"  # SmolLM2, trainer's step, run 1 of 2
_S2B = "step_cpu_smollm2.json"  # run 2 of 2 (the same file as ab_2026-12-02/..._2.json)
_S2NT = "step_cpu_smollm2_no_torch.json"  # run without torch installed
_GEN = "generation_smollm2.json"
_TOY = "step_cpu_cpu-small_main.json"  # issue 7's toy, trainer's step, 7cc826f
_TOY2 = "ab_2026-12-02/t_integ_cpu-small_2.json"
_TOYOLD = "step_cpu_cpu-small.json"  # the toy at b5490cb (hand-written update functions)
_GENTOY = "generation_from_step_benchmark.json"
_PLAN8 = "memory_plan_mistral7b_8dev_fsdp4_tp2_trainer_step.json"
_SPARSE = "step_cpu_smollm2_think_k8.json"  # issue 25: sparse step, SmolLM2, replayed backward
_SPARSE_TOY = "step_cpu_cpu-small_think_k8.json"
_GATED = "generation_gated_smollm2_b1.json"  # gated generation, SmolLM2, batch 1
_PLAN = "tpu_compile/plan_32_layers.json"  # list: 0 v4-8 b4, 1 v4-8, 2 v4-8 sum in bf16,
# 3 v4-16, 4 v5e-16 bf16 params, 5 v5e-16, 6 v5p-8, 7 v5p-8 b8, 8 v5p-32


def _main(*keys: str | int) -> tuple[str | int, ...]:
    return ("main", *keys)


# Issue 21: the full run of experiments/latent_steps.py (3 pretrained LMs x 2 seeds).
_LAT = "../../experiments/results/latent_steps_full_2026-12-07.json"


def _latent(*keys: str | int, fmt: str = "{:.3f}", **kw: Any) -> Figure:
    return Figure(_LAT, keys, fmt, **kw)


_THINK_PLAIN = ("answer_accuracy", "differences", "thinking_minus_plain_lm")

# Issue 25: experiments/think_gate.py, full preset (tune split, head opened), seed 0.
_TG = "../../experiments/results/think_gate_full_tune_offset1_2026-12-07.json"


def _gate(*keys: str | int, fmt: str = "{:.3f}", **kw: Any) -> Figure:
    return Figure(_TG, keys, fmt, **kw)


_TG_R10 = ("curve", 2)  # the row of rate 0.10


FIGURES: dict[str, Figure] = {
    # Issue 21: does Quiet-STaR discover the intermediate step? (docs/EXPERIMENTS.md)
    **{f"lat_acc_{arm}": _latent("answer_accuracy", arm, "mean")
       for arm in ("plain_lm", "pause", "thinking", "reinforce_off", "oracle_thought",
                   "random_thought", "calibration_only", "worked_step", "pretrained")},
    "lat_think_minus_plain": _latent(*_THINK_PLAIN, "mean", fmt="{:+.3f}"),
    "lat_think_minus_plain_lo": _latent(*_THINK_PLAIN, "ci95", 0, fmt="{:+.3f}"),
    "lat_think_minus_plain_hi": _latent(*_THINK_PLAIN, "ci95", 1, fmt="{:+.3f}"),
    **{f"lat_inter_{k}": _latent("intermediate_in_thought", k, "mean")
       for k in ("before_training", "thinking", "reinforce_off")},
    "lat_wall_min": _latent("wall_time_s", fmt="{:.0f}", scale=1 / 60),
    # Issue 25: where should a thought go? (docs/EXPERIMENTS.md, "Think gate")
    "tg_never_acc": _gate("never", "accuracy"),
    "tg_always_acc": _gate("always", "accuracy"),
    **{f"tg_r10_{sel}_acc": _gate(*_TG_R10, sel, "accuracy")
       for sel in ("gated", "random", "entropy", "oracle")},
    "tg_r10_gated_minus_random": _gate(*_TG_R10, "gated_minus_random", "accuracy",
                                       fmt="{:+.3f}"),
    "tg_r10_gated_minus_random_lo": _gate(*_TG_R10, "gated_minus_random", "accuracy_ci95", 0,
                                          fmt="{:+.3f}"),
    "tg_r10_gated_minus_random_hi": _gate(*_TG_R10, "gated_minus_random", "accuracy_ci95", 1,
                                          fmt="{:+.3f}"),
    "tg_must_show_rate": _gate("must_show", "accuracy", "rate", fmt="{:.2f}"),
    "tg_dense_always_acc": _gate("dense_trained", "always", "accuracy"),
    # Adaptive thinking (issue 25): the sparse step in fast plain steps, gated generation.
    "smollm2_sparse_k8_fast_plain_steps": Figure(
        _SPARSE, _main("sparse_ratios", "sparse_over_fast_plain")),
    "toy_sparse_k8_fast_plain_steps": Figure(
        _SPARSE_TOY, _main("sparse_ratios", "sparse_over_fast_plain")),
    "smollm2_gated_generation_of_base": Figure(
        _GATED, ("marginal", "runs", "gated_rate_0.1", "of_base")),
    # SmolLM2-135M, the trainer's step (README "Speed", BENCHMARKS.md's main table).
    "smollm2_qs_s_1": Figure(_S2, _main("qs", "median_s")),
    "smollm2_qs_s_2": Figure(_S2B, _main("qs", "median_s")),
    "smollm2_qs_tok_s": Figure(_S2B, _main("qs", "input_tokens_per_s"), "{:.1f}"),
    "smollm2_plain_s_1": Figure(_S2, _main("plain", "median_s")),
    "smollm2_plain_s_2": Figure(_S2B, _main("plain", "median_s")),
    "smollm2_ratio_medians_1": Figure(_S2, _main("ratio_of_medians")),
    "smollm2_ratio_medians_2": Figure(_S2B, _main("ratio_of_medians")),
    "smollm2_ratio_interleaved_1": Figure(_S2, _main("interleaved", "ratio_median")),
    "smollm2_ratio_interleaved_2": Figure(_S2B, _main("interleaved", "ratio_median")),
    "smollm2_ratio_interleaved_2_1dp": Figure(_S2B, _main("interleaved", "ratio_median"),
                                              "{:.1f}"),
    "smollm2_ratio_medians_2_1dp": Figure(_S2B, _main("ratio_of_medians"), "{:.1f}"),
    "smollm2_flop_ratio": Figure(_S2B, _main("flops", "ratio_useful")),
    "smollm2_flop_ratio_1dp": Figure(_S2B, _main("flops", "ratio_useful"), "{:.1f}"),
    "smollm2_peak_no_torch": Figure(_S2NT, _main("qs", "peak_rss_process_bytes"), scale=GB),
    "smollm2_peak_1": Figure(_S2, _main("qs", "peak_rss_process_bytes"), scale=GB),
    "smollm2_peak_2": Figure(_S2B, _main("qs", "peak_rss_process_bytes"), scale=GB),
    "smollm2_plain_peak_1": Figure(_S2, _main("plain", "peak_rss_process_bytes"), scale=GB),
    "smollm2_plain_peak_2": Figure(_S2B, _main("plain", "peak_rss_process_bytes"), scale=GB),
    "smollm2_plain_peak_no_torch": Figure(_S2NT, _main("plain", "peak_rss_process_bytes"),
                                          scale=GB),
    "smollm2_plain_s3_1": Figure(_S2, _main("plain", "median_s"), "{:.3f}"),
    "smollm2_plain_s3_2": Figure(_S2B, _main("plain", "median_s"), "{:.3f}"),
    "smollm2_qs_cpu_s_1": Figure(_S2, _main("qs", "cpu_s_median")),
    "smollm2_qs_cpu_s_2": Figure(_S2B, _main("qs", "cpu_s_median")),
    "smollm2_qs_compile": Figure(_S2, _main("qs", "compile_s"), "{:.1f}"),
    # The commit before issue 16's merges (43a7588), paired with the runs above.
    "smollm2_before_peak_1": Figure("ab_2026-12-02/t_main_smollm2_1.json",
                                    _main("qs", "peak_rss_process_bytes"), scale=GB),
    "smollm2_before_peak_2": Figure("ab_2026-12-02/t_main_smollm2_2.json",
                                    _main("qs", "peak_rss_process_bytes"), scale=GB),
    "smollm2_plain_compile": Figure(_S2, _main("plain", "compile_s"), "{:.1f}"),
    "smollm2_xla_gflop": Figure(_S2B, _main("qs", "xla_flops"), scale=GIGA),
    "smollm2_temp_gb": Figure(_S2B, _main("qs", "memory_analysis", "temp"), "{:.3f}",
                              scale=GB),
    "smollm2_temp_gb_1dp": Figure(_S2B, _main("qs", "memory_analysis", "temp"), "{:.1f}",
                                  scale=GB),
    "smollm2_args_gb": Figure(_S2B, _main("qs", "memory_analysis", "argument"), scale=GB),
    # SmolLM2 thinking generation, batch 1, 40 tokens.
    "gen_greedy_over_base": Figure(_GEN, ("thinking_over_base", "cached_thinking"),
                                   "1/{:.1f}", invert=True),
    "gen_sampled_over_base": Figure(_GEN, ("thinking_over_base", "cached_thinking_sampled"),
                                    "1/{:.1f}", invert=True),
    "gen_greedy_tok_s": Figure(_GEN, ("runs", "cached_thinking", "tokens_per_s")),
    "gen_base_tok_s": Figure(_GEN, ("runs", "cached_base", "tokens_per_s"), "{:.1f}"),
    "gen_sampled_tok_s": Figure(_GEN, ("runs", "cached_thinking_sampled", "tokens_per_s")),
    # Issue 7's toy (Mistral-style, 4 x 128 tokens), the trainer's step at 7cc826f.
    "toy_qs_s": Figure(_TOY, _main("qs", "median_s"), "{:.3f}"),
    "toy_qs_s_2dp": Figure(_TOY, _main("qs", "median_s")),
    "toy_qs_min_s": Figure(_TOY, _main("qs", "min_s")),
    "toy_qs_max_s": Figure(_TOY, _main("qs", "max_s")),
    "toy_qs_tok_s": Figure(_TOY, _main("qs", "input_tokens_per_s"), "{:.1f}"),
    "toy_qs_compile": Figure(_TOY, _main("qs", "compile_s"), "{:.1f}"),
    "toy_qs_peak_gib": Figure(_TOY, _main("qs", "peak_rss_process_bytes"), scale=GIB),
    "toy_qs_peak_gb": Figure(_TOY, _main("qs", "peak_rss_process_bytes"), scale=GB),
    "toy_qs_peak_gb_2": Figure(_TOY2, _main("qs", "peak_rss_process_bytes"), scale=GB),
    "toy_qs_achieved_g": Figure(_TOY, _main("qs", "achieved_flops_per_s_useful"), "{:.0f}",
                                scale=GIGA),
    "toy_plain_achieved_g": Figure(_TOY, _main("plain", "achieved_flops_per_s_useful"),
                                   "{:.0f}", scale=GIGA),
    "toy_plain_s": Figure(_TOY, _main("plain", "median_s"), "{:.3f}"),
    "toy_plain_min_s": Figure(_TOY, _main("plain", "min_s")),
    "toy_plain_max_s": Figure(_TOY, _main("plain", "max_s")),
    "toy_plain_tok_s": Figure(_TOY, _main("plain", "input_tokens_per_s"), "{:.0f}"),
    "toy_plain_compile": Figure(_TOY, _main("plain", "compile_s"), "{:.1f}"),
    "toy_plain_peak_gib": Figure(_TOY, _main("plain", "peak_rss_process_bytes"), scale=GIB),
    "toy_ratio_medians": Figure(_TOY, _main("ratio_of_medians"), "{:.1f}"),
    "toy_ratio_interleaved": Figure(_TOY, _main("interleaved", "ratio_median"), "{:.1f}"),
    "toy_qs_s_run2": Figure(_TOY2, _main("qs", "median_s"), "{:.3f}"),
    "toy_flop_ratio": Figure(_TOY, _main("flops", "ratio_useful")),
    "toy_flop_ratio_1dp": Figure(_TOY, _main("flops", "ratio_useful"), "{:.1f}"),
    "toy_qs_gflop": Figure(_TOY, _main("flops", "qs_useful"), "{:.1f}", scale=GIGA),
    "toy_plain_gflop": Figure(_TOY, _main("flops", "plain_useful"), "{:.1f}", scale=GIGA),
    # The toy at b5490cb (hand-written update functions; the sweeps' run).
    "toyold_qs_s": Figure(_TOYOLD, _main("qs", "median_s")),
    "toyold_qs_min_s": Figure(_TOYOLD, _main("qs", "min_s")),
    "toyold_qs_max_s": Figure(_TOYOLD, _main("qs", "max_s")),
    "toyold_qs_tok_s": Figure(_TOYOLD, _main("qs", "input_tokens_per_s"), "{:.1f}"),
    "toyold_qs_compile": Figure(_TOYOLD, _main("qs", "compile_s"), "{:.1f}"),
    "toyold_qs_peak_gib": Figure(_TOYOLD, _main("qs", "peak_rss_process_bytes"), scale=GIB),
    "toyold_qs_peak_gb": Figure(_TOYOLD, _main("qs", "peak_rss_process_bytes"), scale=GB),
    "toyold_qs_achieved_g": Figure(_TOYOLD, _main("qs", "achieved_flops_per_s_useful"),
                                   "{:.0f}", scale=GIGA),
    "toyold_plain_achieved_g": Figure(_TOYOLD, _main("plain", "achieved_flops_per_s_useful"),
                                      "{:.0f}", scale=GIGA),
    "toyold_plain_s": Figure(_TOYOLD, _main("plain", "median_s"), "{:.3f}"),
    "toyold_plain_min_s": Figure(_TOYOLD, _main("plain", "min_s")),
    "toyold_plain_max_s": Figure(_TOYOLD, _main("plain", "max_s")),
    "toyold_plain_tok_s": Figure(_TOYOLD, _main("plain", "input_tokens_per_s"), "{:.0f}"),
    "toyold_plain_compile": Figure(_TOYOLD, _main("plain", "compile_s"), "{:.1f}"),
    "toyold_plain_peak_gib": Figure(_TOYOLD, _main("plain", "peak_rss_process_bytes"),
                                    scale=GIB),
    "toyold_ratio_medians": Figure(_TOYOLD, _main("ratio_of_medians"), "{:.1f}"),
    "toyold_ratio_interleaved": Figure(_TOYOLD, _main("interleaved", "ratio_median"),
                                       "{:.1f}"),
    # Cached thinking generation against recomputing everything (stories260K).
    "gen_cached_vs_recompute": Figure(_GENTOY, ("cached_vs_recompute_speedup",), "{:.1f}"),
    # Mistral-7B compiled by the TPU compiler, extrapolated to 32 layers (GB per chip).
    # Mistral-7B on 8 simulated CPU devices, mesh (1, 4, 2), the trainer's step, one
    # micro-batch of 4, 32 layers extrapolated from 2 and 4 (GB per device).
    "mistral7b_8dev_f32_gb": Figure(_PLAN8, ("variants", 0, "estimate", "peak_bytes"),
                                    "{:.1f}", scale=GB),
    "mistral7b_8dev_f32_temp_gb": Figure(_PLAN8, ("variants", 0, "estimate", "temp_bytes"),
                                         "{:.1f}", scale=GB),
    "mistral7b_8dev_bf16_gb": Figure(_PLAN8, ("variants", 1, "estimate", "peak_bytes"),
                                     "{:.1f}", scale=GB),
    "mistral7b_8dev_bf16_temp_gb": Figure(_PLAN8, ("variants", 1, "estimate", "temp_bytes"),
                                          "{:.1f}", scale=GB),
    "tpu_v4_8_b4_gb": Figure(_PLAN, (0, "peak_bytes"), "{:.1f}", scale=GB),
    "tpu_v4_8_gb": Figure(_PLAN, (1, "peak_bytes"), "{:.1f}", scale=GB),
    "tpu_v4_8_sum_params_gb": Figure(_PLAN, (2, "peak_bytes"), "{:.1f}", scale=GB),
    "tpu_v4_hbm_gb": Figure(_PLAN, (0, "hbm_bytes"), "{:.1f}", scale=GB),
    "tpu_v4_16_gb": Figure(_PLAN, (3, "peak_bytes"), "{:.1f}", scale=GB),
    "tpu_v5e_16_bf16_gb": Figure(_PLAN, (4, "peak_bytes"), "{:.1f}", scale=GB),
    "tpu_v5e_16_gb": Figure(_PLAN, (5, "peak_bytes"), "{:.1f}", scale=GB),
    "tpu_v5e_hbm_gb": Figure(_PLAN, (5, "hbm_bytes"), "{:.1f}", scale=GB),
    "tpu_v5p_8_gb": Figure(_PLAN, (6, "peak_bytes"), "{:.1f}", scale=GB),
    "tpu_v5p_8_b8_gb": Figure(_PLAN, (7, "peak_bytes"), "{:.1f}", scale=GB),
    "tpu_v5p_hbm_gb": Figure(_PLAN, (6, "hbm_bytes"), "{:.0f}", scale=GB),
    "tpu_v5p_32_gb": Figure(_PLAN, (8, "peak_bytes"), "{:.1f}", scale=GB),
    "tpu_v5p_8_roofline_s": Figure(_PLAN, (6, "roofline_compute_s")),
    "tpu_v5p_32_roofline_s": Figure(_PLAN, (8, "roofline_compute_s")),
}


def _load(file: str, results: Path, cache: dict[str, Any]) -> Any:
    if file not in cache:
        path = results / file
        if not path.is_file():
            raise FigureError(f"results file {path} does not exist")
        with open(path) as f:
            cache[file] = json.load(f)
    return cache[file]


def value(fig_id: str, results: Path = RESULTS, figures: dict[str, Figure] | None = None,
          cache: dict[str, Any] | None = None) -> float:
    """The number at figure `fig_id`'s key path in its results file. A missing file or
    key is a FigureError naming the figure, the file and the key path."""
    figures = FIGURES if figures is None else figures
    if fig_id not in figures:
        raise FigureError(f"unknown figure id {fig_id!r} (not in benchmarks/report.py's "
                          "FIGURES)")
    fig = figures[fig_id]
    node = _load(fig.file, results, {} if cache is None else cache)
    for depth, key in enumerate(fig.path):
        here = "/".join(str(k) for k in fig.path[:depth]) or "the top level"
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            have = (", ".join(map(str, node)) if isinstance(node, dict)
                    else f"a list of {len(node)}" if isinstance(node, list) else repr(node))
            raise FigureError(
                f"figure {fig_id}: {fig.file} has no key {'/'.join(map(str, fig.path))} "
                f"({key!r} is not under {here}, which has: {have[:300]})") from None
    if isinstance(node, bool) or not isinstance(node, int | float):
        raise FigureError(f"figure {fig_id}: {fig.file} at {'/'.join(map(str, fig.path))} "
                          f"is {node!r}, not a number")
    return float(node)


def render(fig_id: str, results: Path = RESULTS, figures: dict[str, Figure] | None = None,
           cache: dict[str, Any] | None = None) -> str:
    """The text of figure `fig_id` as the docs quote it."""
    fig = (FIGURES if figures is None else figures).get(fig_id)
    v = value(fig_id, results, figures, cache)
    if fig is not None and fig.invert:
        v = 1.0 / v
    return fig.fmt.format(v * fig.scale)


def mismatches(docs: Sequence[Path], results: Path = RESULTS,
               figures: dict[str, Figure] | None = None) -> list[str]:
    """One line `doc:line: figure ID reads 'X', its JSON says 'Y'` per disagreeing
    figure; FigureError for a marker whose id or JSON does not resolve."""
    cache: dict[str, Any] = {}
    out = []
    for doc in docs:
        for n, line in enumerate(Path(doc).read_text().splitlines(), 1):
            for m in MARKER.finditer(line):
                want = render(m.group(1), results, figures, cache)
                if m.group(2) != want:
                    out.append(f"{doc}:{n}: figure {m.group(1)} reads {m.group(2)!r}, its "
                               f"JSON says {want!r}")
    return out


def write(docs: Sequence[Path], results: Path = RESULTS,
          figures: dict[str, Figure] | None = None) -> int:
    """Rewrite every marked figure of `docs` from its JSON; returns how many changed."""
    cache: dict[str, Any] = {}
    changed = 0

    def sub(m: re.Match) -> str:
        nonlocal changed
        want = render(m.group(1), results, figures, cache)
        changed += m.group(2) != want
        return f"<!-- fig:{m.group(1)} -->{want}<!-- /fig -->"

    for doc in docs:
        text = Path(doc).read_text()
        new = MARKER.sub(sub, text)
        if new != text:
            Path(doc).write_text(new)
    return changed


def unused(docs: Sequence[Path], figures: dict[str, Figure] | None = None) -> list[str]:
    """Ids of `figures` that no doc quotes."""
    used = {m.group(1) for doc in docs for m in MARKER.finditer(Path(doc).read_text())}
    return sorted(set(FIGURES if figures is None else figures) - used)


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_boolean("check", False, "exit 1, listing each marked figure that disagrees "
                         "with its JSON", flag_values=fv)
    flags.DEFINE_boolean("write", False, "rewrite the marked figures from the JSON",
                         flag_values=fv)
    flags.mark_bool_flags_as_mutual_exclusive(["check", "write"], required=True,
                                              flag_values=fv)
    flags.DEFINE_list("docs", [str(ROOT / d) for d in DOCS], "the Markdown files, "
                      "comma-separated (default: " + ",".join(DOCS) + ")", flag_values=fv)
    flags.DEFINE_string("results", str(RESULTS), "the results directory (default: "
                        "benchmarks/results)", flag_values=fv)


COMMAND = CommandLine.script("benchmarks/report.py",
                             " ".join(__doc__.split("\n\n")[0].split()), _define)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 agree (or written), 1 disagree, 2 bad input (one line)."""
    return COMMAND.main(_run, argv)


def _run(args: SimpleNamespace) -> int:
    docs, results = [Path(d) for d in args.docs], Path(args.results)
    try:
        if args.write:
            n = write(docs, results)
            print(f"{n} figure(s) rewritten")
            return 0
        bad = mismatches(docs, results)
        idle = unused(docs)
    except FigureError as e:
        print(f"{COMMAND.prog}: error: {e}", file=sys.stderr)
        return 2
    for line in bad:
        print(line)
    for fig_id in idle:
        print(f"figure {fig_id} is in FIGURES but quoted in none of the docs")
    if bad or idle:
        return 1
    print(f"all {len(FIGURES)} figures agree with benchmarks/results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
