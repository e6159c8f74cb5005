"""Plot step time against sequence length and n_ahead from a step_benchmark.py JSON.

    python benchmarks/plot.py benchmarks/results/step_cpu_cpu-small.json \
        --out benchmarks/step_scaling_cpu.png

Needs matplotlib, a benchmark-time tool only (not a core dependency): the `experiments`
extra, `pip install -e ".[experiments]"`.

Left: seconds per update step against sequence length (Quiet-STaR and plain steps),
with the Quiet-STaR step the analytic FLOP count predicts when scaled through the
measured point at the main configuration. Right: the same against n_ahead.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from types import SimpleNamespace

from absl import flags

from quietstar_jax.command_line import CommandLine, UsageError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _points(runs: list[dict], key: str, step: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in runs:
        if "error" in r or step not in r:
            continue
        xs.append(r["config"][key])
        ys.append(r[step]["median_s"])
    return xs, ys


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "the PNG path (default: the JSON's, .png)",
                        flag_values=fv)


COMMAND = CommandLine.script("benchmarks/plot.py", " ".join(__doc__.split("\n\n")[0].split()),
                             _define, positional=("json",))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; bad input ends with one `PROG: error: ...` line (exit 2)."""
    return COMMAND.main(_run, argv)


def _run(args: SimpleNamespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError('needs matplotlib: pip install -e ".[experiments]"') from None
    from flops import analytic_flops

    with open(args.json) as f:
        res = json.load(f)
    main_r = res["main"]
    c0 = main_r["config"]
    t0 = main_r["qs"]["median_s"]
    f0 = main_r["flops"]["qs_useful"]
    env = res.get("env", main_r.get("env", {}))
    sweeps = res.get("sweeps", {})

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, ("seq", "n_ahead"), strict=True):
        runs = sweeps.get(key, [])
        xq, yq = _points(runs, key, "qs")
        if xq:
            ax.plot(xq, yq, "o-", color="C0", label="Quiet-STaR step (measured)")
            pred = [t0 * analytic_flops(dict(c0, **{key: x}))["qs_useful"] / f0 for x in xq]
            ax.plot(xq, pred, "--", color="C0", alpha=0.6,
                    label="Quiet-STaR, FLOP-proportional\n(through the main config)")
        xp, yp = _points(runs, key, "plain")
        if key == "n_ahead" and not xp and "plain" in main_r:
            xp, yp = xq, [main_r["plain"]["median_s"]] * len(xq)
        if xp:
            ax.plot(xp, yp, "s-", color="C1", label="plain next-token step")
        for x, y in zip(xq, yq, strict=True):
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel({"seq": "sequence length (tokens)", "n_ahead": "n_ahead"}[key])
        ax.set_ylabel("seconds per update step")
        if key == "seq":
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xq or [64, 128, 256, 512])
            ax.set_xticklabels([str(x) for x in (xq or [64, 128, 256, 512])])
        else:
            ax.set_xticks(xq or [4, 8, 12, 16, 24])
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
        other = {"seq": f"n_ahead {c0['n_ahead']}", "n_ahead": f"seq {c0['seq']}"}[key]
        ax.set_title(f"vs {key} ({other}, n_ahead_talk {c0['n_ahead_talk']})", fontsize=10)
    fig.suptitle(
        f"{c0['layers']} layers, hidden {c0['hidden']}, {c0['batch']} seqs x "
        f"{c0['n_passes']} passes, {c0['dtype']}; {env.get('backend', '?')} "
        f"({env.get('cpu_model', env.get('device_kind', ''))}, "
        f"{env.get('cpu_affinity', '?')} cores), jax {env.get('jax', '?')}", fontsize=9)
    fig.tight_layout()
    out = args.out or os.path.splitext(args.json)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
