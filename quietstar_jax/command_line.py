"""Command-line flags, one style for every command: absl flags, as the trainer's.

`CommandLine` gives each command its own `absl.flags.FlagValues` (never absl's global
registry, so commands can be imported together and called from code), `--help`, and
one `PROG: error: ...` line with exit status 2 for bad input (`UsageError`, `run_cli`).
Used by `quietstar-generate`, `quietstar-evaluate`, the benchmark and experiment
scripts; the trainer (`train/cli.py`) adds ml_collections' `--config.FIELD=VALUE`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

from absl import flags

from quietstar_jax.console import show_logs


def command_name(module: str, installed: str) -> str:
    """The name a command was called by, for its usage and error lines: its installed
    script name (e.g. `quietstar-generate`) when run as that script, else `python -m
    MODULE`."""
    called = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return installed if called == installed else f"python -m {module}"


class CommandLine:
    """One command line's flags, absl style (as the trainer's): its own
    `absl.flags.FlagValues`, so commands never share (or collide in) absl's global
    registry and can be called from code any number of times.

    `module` is what `python -m` runs, `installed` the script name (`[project.scripts]`);
    `prog`, when given, is the name instead (`CommandLine.script`: `python PATH`).
    `define(flag_values)` declares the flags (`flags.DEFINE_*(..., flag_values=...)`);
    `positional` names the arguments before or between them (e.g. `("model",)`), and
    `variadic` a last one that takes one or more values, as a list (e.g. `"files"`).
    `parse(argv)` returns the values as attributes, dashes in flag names read as
    underscores (`--max-new-tokens` -> `.max_new_tokens`); bad flags raise `UsageError`.
    `main(run, argv)` runs `run(args)` and reports a UsageError as one line (exit 2).
    """

    def __init__(self, module: str, installed: str, summary: str,
                 define: Callable[[flags.FlagValues], None],
                 positional: Sequence[str] = (), *, prog: str | None = None,
                 variadic: str | None = None) -> None:
        self.module, self.installed, self.summary = module, installed, summary
        self._define, self.positional = define, tuple(positional)
        self._prog, self.variadic = prog, variadic

    @classmethod
    def script(cls, path: str, summary: str, define: Callable[[flags.FlagValues], None],
               positional: Sequence[str] = (), *, variadic: str | None = None
               ) -> CommandLine:
        """The command line of a script run as `python PATH` (from the repository root),
        not a module: usage and error lines name it so."""
        return cls(path, "", summary, define, positional, prog=f"python {path}",
                   variadic=variadic)

    @property
    def prog(self) -> str:
        return self._prog or command_name(self.module, self.installed)

    def flag_values(self) -> flags.FlagValues:
        fv = flags.FlagValues()
        self._define(fv)
        return fv

    def _arguments(self) -> str:
        names = [p.upper() for p in self.positional]
        if self.variadic:
            names.append(f"{self.variadic.upper()}...")
        return " ".join(names)

    def usage(self) -> str:
        return f"usage: {self.prog} {self._arguments()} [--flag=value ...]".replace("  ", " ")

    def help(self) -> str:
        return (f"{self.usage()}\n\n{self.summary}\n\nflags:\n"
                + self.flag_values().get_help(include_special_flags=False))

    def parse(self, argv: Sequence[str] | None) -> SimpleNamespace:
        argv = list(sys.argv[1:] if argv is None else argv)
        if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
            print(self.help())
            raise SystemExit(0)
        fv = self.flag_values()
        try:
            rest = fv([self.prog, *argv])[1:]
        except flags.Error as e:
            raise UsageError(" ".join(str(e).split())) from None
        n = len(self.positional)
        extra = len(rest) - n  # 0 without `variadic`, at least 1 with it
        if extra < 0 or (extra > 0) != bool(self.variadic):
            want = self._arguments() or "no arguments"
            raise UsageError(f"expected {want}, got {rest or 'none'} ({self.usage()})")
        values = {name.replace("-", "_"): fv[name].value for name in fv}
        if self.variadic:
            values[self.variadic] = rest[n:]
        return SimpleNamespace(**values, **dict(zip(self.positional, rest[:n], strict=True)))

    def main(self, run: Callable[[SimpleNamespace], int | None],
             argv: Sequence[str] | None) -> int:
        """`run(parsed argv)`'s exit status (None: 0). A UsageError, from the flags or
        raised by `run` for a value it cannot use, ends with one `PROG: error: ...` line
        on stderr and exit status 2; any other error keeps its traceback."""
        try:
            return run(self.parse(argv)) or 0
        except UsageError as e:
            print(f"{self.prog}: error: {e}", file=sys.stderr)
            return 2


class _IntegerListParser(flags.ListParser):
    """Comma-separated integers (`1,4,2`), `length` of them when given."""

    def __init__(self, length: int | None = None) -> None:
        super().__init__()
        self.length = length
        self.syntactic_help = (f"{length} comma-separated integers" if length is not None
                               else "a comma-separated list of integers")

    def parse(self, argument: Any) -> list[int]:
        items = super().parse(argument)
        try:
            values = [int(x) for x in items]
        except (TypeError, ValueError):
            raise ValueError(f"{argument!r} is not a comma-separated list of integers"
                             ) from None
        if self.length is not None and len(values) != self.length:
            raise ValueError(f"{argument!r}: expected {self.length} comma-separated integers")
        return values


def define_integer_list(name: str, default: Sequence[int] | None, help: str,
                        flag_values: flags.FlagValues, *, length: int | None = None) -> None:
    """An absl flag of comma-separated integers (`--mesh=1,4,2`), read as a list of ints;
    with `length`, exactly that many."""
    # Listed in --help under the calling module, as absl names it (a script: its path).
    caller = sys._getframe(1).f_globals.get("__name__", "")
    flags.DEFINE(_IntegerListParser(length), name, None if default is None else list(default),
                 help, flag_values, flags.CsvListSerializer(","),
                 module_name=sys.argv[0] if caller == "__main__" else caller)


def flag_definer(flag_values: flags.FlagValues) -> Callable[..., None]:
    """`define(flags.DEFINE_x, name, default, help, **kw)`: declares a flag in
    `flag_values` (an enum's choices as `enum_values=[...]`), listed in `--help` under
    the module that asked for the definer (a script: its path)."""
    caller = sys._getframe(1).f_globals.get("__name__", "")
    module = sys.argv[0] if caller == "__main__" else caller

    def define(kind: Any, name: str, default: Any, help: str, **kw: Any) -> None:
        choices = (kw.pop("enum_values"),) if "enum_values" in kw else ()
        kind(name, default, *choices, help, flag_values=flag_values, module_name=module, **kw)

    return define


class UsageError(ValueError):
    """A command-line flag or argument that cannot be used (exit status 2)."""


def run_cli(run: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None,
            prog: str) -> int:
    """Run a command-line entry point; bad input ends with one `PROG: error: ...` line
    on stderr and exit status 2 instead of a traceback (as the trainer's). The
    library's log records are shown meanwhile (`console.show_logs`)."""
    try:
        with show_logs():
            return run(argv)
    except (ValueError, OSError, ImportError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
