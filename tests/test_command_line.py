"""command_line.CommandLine for the benchmark and experiment scripts: the script name in
usage and error lines, a positional argument of one or more values, comma-separated
integer lists, and one `PROG: error: ...` line with exit status 2 for bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from absl import flags

from quietstar_jax.command_line import CommandLine, UsageError, define_integer_list

ROOT = Path(__file__).resolve().parents[1]


def _define(fv: flags.FlagValues) -> None:
    define_integer_list("mesh", None, "three sizes", fv, length=3)
    define_integer_list("seq", [64, 128], "lengths", fv)
    flags.DEFINE_multi_string("set", [], "NAME=VALUE (repeatable)", flag_values=fv)


COMMAND = CommandLine.script("benchmarks/x.py", "A test command.", _define, variadic="files")


def test_script_name_lists_and_repeatable_flags() -> None:
    assert COMMAND.prog == "python benchmarks/x.py"
    assert COMMAND.usage() == "usage: python benchmarks/x.py FILES... [--flag=value ...]"
    a = COMMAND.parse(["a.json", "--mesh=1,4,2", "b.json", "--set", "x=", "--set=y=1,2"])
    assert a.files == ["a.json", "b.json"] and a.mesh == [1, 4, 2] and a.seq == [64, 128]
    assert a.set == ["x=", "y=1,2"]
    assert COMMAND.parse(["a", "--seq", "8"]).seq == [8]


@pytest.mark.parametrize("argv, message", [
    ([], "expected FILES..., got none"),
    (["a", "--mesh=1,4"], "'1,4': expected 3 comma-separated integers"),
    (["a", "--seq=8,x"], "'8,x' is not a comma-separated list of integers"),
])
def test_bad_input_is_a_usage_error(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        COMMAND.parse(argv)


def test_main_reports_one_line_and_status_2(capsys) -> None:
    def run(args):
        if args.mesh is None:
            raise UsageError("--mesh is needed here")
        return 0

    assert COMMAND.main(run, ["a"]) == 2
    assert capsys.readouterr().err == "python benchmarks/x.py: error: --mesh is needed here\n"
    assert COMMAND.main(run, ["a", "--mesh=1,1,1"]) == 0
    assert COMMAND.main(run, ["--mesh", "1", "4", "2"]) == 2  # the old `nargs` syntax
    assert "'1': expected 3 comma-separated integers" in capsys.readouterr().err


def test_memory_plan_takes_the_documented_lists() -> None:
    """BENCHMARKS.md's memory_plan command lines parse to what argparse gave."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_plan

    a = memory_plan.COMMAND.parse(["--variants=2,5", "--mesh=1,4,2", "--layers=2,4",
                                   "--extrapolate", "32"])
    assert (a.variants, a.mesh, a.layers, a.extrapolate) == (["2", "5"], [1, 4, 2], [2, 4], 32)
