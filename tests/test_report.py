"""benchmarks/report.py: the figures README.md and BENCHMARKS.md quote agree with the
results JSON, an altered figure fails the check (and --write restores it), and a figure
whose JSON does not resolve is a clear error."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _copy_docs(tmp_path: Path) -> list[Path]:
    out = []
    for name in report.DOCS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
        out.append(tmp_path / name)
    return out


def test_repository_docs_agree_with_their_json(capsys) -> None:
    assert report.main(["--check"]) == 0, capsys.readouterr().out


def test_quoted_figures_read_from_the_json_independently() -> None:
    """A few figures computed here from the raw JSON, as the docs state them."""
    with open(RESULTS / "step_cpu_smollm2_no_torch.json") as f:
        peak = json.load(f)["main"]["qs"]["peak_rss_process_bytes"]
    with open(RESULTS / "generation_smollm2.json") as f:
        gen = json.load(f)
    with open(RESULTS / "tpu_compile" / "plan_32_layers.json") as f:
        plan = json.load(f)
    v5p8 = next(p for p in plan if p["topology"] == "v5p:2x2x1" and p["micro_batch"] == 4)
    readme = (ROOT / "README.md").read_text()
    bench = (ROOT / "BENCHMARKS.md").read_text()
    want_peak = f"{peak / 1e9:.2f}"
    runs = gen["runs"]
    slowdown = runs["cached_base"]["tokens_per_s"] / runs["cached_thinking"]["tokens_per_s"]
    want_gen = f"1/{slowdown:.1f}"
    assert report.render("smollm2_peak_no_torch") == want_peak
    assert f"<!-- fig:smollm2_peak_no_torch -->{want_peak}<!-- /fig --> GB" in readme
    assert report.render("gen_greedy_over_base") == want_gen
    assert f"<!-- fig:gen_greedy_over_base -->{want_gen}<!-- /fig -->" in readme
    want_v5p8 = f"{v5p8['peak_bytes'] / 1e9:.1f}"
    assert report.render("tpu_v5p_8_gb") == want_v5p8
    assert f"<!-- fig:tpu_v5p_8_gb -->{want_v5p8}<!-- /fig --> GB of" in bench


def test_an_altered_figure_fails_the_check_and_write_restores_it(tmp_path, capsys) -> None:
    docs = _copy_docs(tmp_path)
    original = docs[0].read_text()
    good = report.render("smollm2_peak_no_torch")
    marked = f"<!-- fig:smollm2_peak_no_torch -->{good}<!-- /fig -->"
    assert marked in original
    docs[0].write_text(original.replace(marked, marked.replace(good, "9.99"), 1))
    args = ["--docs=" + ",".join(map(str, docs))]
    assert report.main(["--check", *args]) == 1
    out = capsys.readouterr().out
    assert "figure smollm2_peak_no_torch reads '9.99', its JSON says" in out
    assert str(docs[0]) in out
    assert len(out.strip().splitlines()) == 1  # only that figure
    assert report.main(["--write", *args]) == 0
    assert docs[0].read_text() == original
    assert report.main(["--check", *args]) == 0


def test_a_missing_json_key_is_a_clear_error(tmp_path, capsys) -> None:
    figures = {"bad": report.Figure("step_cpu_smollm2.json", ("main", "qs", "no_such_key"))}
    with pytest.raises(report.FigureError,
                       match=r"figure bad: step_cpu_smollm2.json has no key "
                             r"main/qs/no_such_key \('no_such_key' is not under main/qs"):
        report.value("bad", RESULTS, figures)
    gone = {"gone": report.Figure("no_such_file.json", ("x",))}
    with pytest.raises(report.FigureError, match="no_such_file.json does not exist"):
        report.value("gone", RESULTS, gone)
    doc = tmp_path / "doc.md"
    doc.write_text("peak <!-- fig:no_such_figure -->1.0<!-- /fig --> GB\n")
    assert report.main(["--check", "--docs", str(doc)]) == 2
    assert "unknown figure id 'no_such_figure'" in capsys.readouterr().err
