"""docs/ALGORITHM.md cannot go stale: its defaults table matches `ThoughtConfig`, and
every `file.py: name` it cites exists."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path
from typing import Any

from quietstar_jax.thought import ThoughtConfig

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ALGORITHM.md"
HEADER = ("option", "default", "meaning")
# `quietstar_jax/loss.py: quietstar_objective`, `quietstar_jax/schedule.py: ThoughtSchedule.kind`
CITATION = re.compile(r"`((?:[A-Za-z_][\w]*/)*[A-Za-z_]\w*\.py): ([A-Za-z_][\w.]*)`")


def _cells(line: str) -> list[str]:
    """The cells of a markdown table row (`\\|` is a literal pipe, not a separator)."""
    parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [p.strip().replace("\\|", "|") for p in parts]


def _unquote(cell: str) -> str:
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


def defaults_table(text: str) -> dict[str, Any]:
    """The `| option | default | meaning |` table: {option: default (a Python literal)}."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines)
              if line.lstrip().startswith("|") and tuple(_cells(line)) == HEADER]
    assert len(starts) == 1, f"docs/ALGORITHM.md needs exactly one {HEADER} table"
    rows: dict[str, Any] = {}
    for line in lines[starts[0] + 2:]:
        if not line.lstrip().startswith("|"):
            break
        option, default, _ = _cells(line)
        option = _unquote(option)
        assert option not in rows, f"option {option} listed twice"
        rows[option] = ast.literal_eval(_unquote(default))
    return rows


def _same(a: Any, b: Any) -> bool:
    """Equal, and a bool only equals a bool (True == 1 otherwise)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _module(path: str) -> Any:
    """Import a cited file: a package module by name, any other file by its path."""
    if path.startswith("quietstar_jax/"):
        return importlib.import_module(path[:-3].replace("/", "."))
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    assert spec is not None and spec.loader is not None, path
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_defaults_table_matches_thought_config():
    table = defaults_table(DOC.read_text())
    fields = {f.name: f for f in dataclasses.fields(ThoughtConfig)}
    missing = sorted(set(fields) - set(table))
    assert not missing, f"ThoughtConfig fields missing from docs/ALGORITHM.md: {missing}"
    unknown = sorted(set(table) - set(fields))
    assert not unknown, f"docs/ALGORITHM.md lists options ThoughtConfig lacks: {unknown}"
    for name, f in fields.items():
        assert f.default is not dataclasses.MISSING, name
        assert _same(table[name], f.default), (
            f"docs/ALGORITHM.md gives {name} = {table[name]!r}, ThoughtConfig has "
            f"{f.default!r}")


def test_defaults_table_parser_catches_a_changed_default():
    text = DOC.read_text()
    changed = text.replace("| `n_ahead` | `12` |", "| `n_ahead` | `13` |")
    assert changed != text
    assert defaults_table(changed)["n_ahead"] == 13


def test_cited_functions_exist():
    cites = sorted(set(CITATION.findall(DOC.read_text())))
    assert len(cites) > 20, "docs/ALGORITHM.md should cite the code it describes"
    bad = []
    for path, name in cites:
        if not (ROOT / path).is_file():
            bad.append(f"{path} (no such file)")
            continue
        obj = _module(path)
        for part in name.split("."):
            if not hasattr(obj, part):
                bad.append(f"{path}: {name}")
                break
            obj = getattr(obj, part)
    assert not bad, f"docs/ALGORITHM.md cites what does not exist: {bad}"

