"""Resumable sweeps, tables, figures and the shared experiment CLI (riverscape.sweep)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from matplotlib.figure import Figure

from riverscape import sweep as sw


class Interrupt(Exception):
    pass


def test_results_json_contents(tmp_path):
    sweep = sw.Sweep(tmp_path, "demo", {"seed": 3, "sizes": (1, 2)}, progress=False)
    records = sweep.run([{"x": 1}, {"x": 2}], lambda c: {"y": np.array([c["x"], 2 * c["x"]]), "nan": float("nan")})
    assert [r["result"]["y"] for r in records] == [[1, 2], [2, 4]]
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["name"] == "demo" and stored["config"] == {"seed": 3, "sizes": [1, 2]}
    assert [c["params"] for c in stored["cells"]] == [{"x": 1}, {"x": 2}]
    assert stored["cells"][0]["result"]["nan"] is None  # JSON has no NaN
    assert set(stored["versions"]) == {"riverscape", "torch", "numpy", "python"}
    assert stored["runtime_seconds"] >= 0 and stored["cpu_seconds"] >= 0 and "timestamp" in stored


def test_resume_after_interrupt_skips_finished_cells(tmp_path):
    cells = [{"i": i} for i in range(5)]
    calls = []

    def failing(cell):
        calls.append(cell["i"])
        if cell["i"] == 2:
            raise Interrupt
        return {"sq": cell["i"] ** 2}

    with pytest.raises(Interrupt):
        sw.Sweep(tmp_path, "demo", {"a": 1}, progress=False).run(cells, failing)
    assert calls == [0, 1, 2]
    assert len(json.loads((tmp_path / "results.json").read_text())["cells"]) == 2  # saved after each cell

    calls.clear()
    records = sw.Sweep(tmp_path, "demo", {"a": 1}, progress=False).run(cells, lambda c: calls.append(c["i"]) or {"sq": c["i"] ** 2})
    assert calls == [2, 3, 4]  # cells 0 and 1 were not recomputed
    assert [r["result"]["sq"] for r in records] == [0, 1, 4, 9, 16]


def test_deleted_cell_is_recomputed_and_key_is_order_independent(tmp_path):
    sw.Sweep(tmp_path, "demo", {}, progress=False).run([{"a": 1, "b": 2}, {"a": 3, "b": 4}], lambda c: {"s": c["a"] + c["b"]})
    path = tmp_path / "results.json"
    data = json.loads(path.read_text())
    data["cells"] = data["cells"][1:]
    path.write_text(json.dumps(data))
    calls = []
    sweep = sw.Sweep(tmp_path, "demo", {}, progress=False)
    sweep.run([{"b": 2, "a": 1}, {"b": 4, "a": 3}], lambda c: calls.append(c) or {"s": c["a"] + c["b"]})
    assert calls == [{"b": 2, "a": 1}]
    assert sweep.result({"a": 3, "b": 4}) == {"s": 7} and {"a": 1, "b": 2} in sweep and len(sweep) == 2


def test_config_mismatch_raises_unless_fresh(tmp_path):
    sw.Sweep(tmp_path, "demo", {"seed": 0}, progress=False).run([{"i": 0}], lambda c: {"v": 1})
    with pytest.raises(sw.ConfigMismatchError, match="seed: stored 0 != requested 1.*--fresh"):
        sw.Sweep(tmp_path, "demo", {"seed": 1}, progress=False)
    fresh = sw.Sweep(tmp_path, "demo", {"seed": 1}, fresh=True, progress=False)
    assert len(fresh) == 0


def test_unserialisable_result_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="cannot store"):
        sw.Sweep(tmp_path, "demo", {}, progress=False).run([{"i": 0}], lambda c: {"v": object()})
    assert not (tmp_path / "results.json").exists()


def test_tables_text_and_markdown(capsys):
    md = sw.print_table([{"name": "a", "v": 1.23456, "n": None}, {"name": "bbb", "v": 10.0, "n": 2}], {"name": "model", "v": "value", "n": "count"}, title="T")
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "T" and text[1].split() == ["model", "value", "count"]
    assert text[3].split() == ["a", "1.235", "–"] and text[4].split() == ["bbb", "10", "2"]
    assert len(text[3]) == len(text[4])  # aligned columns
    assert md.splitlines()[2:5] == ["| model | value | count |", "| --- | ---: | ---: |", "| a | 1.235 | – |"]


def test_write_figure_html_is_self_contained_and_png_written(tmp_path):
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    static = Figure()
    static.subplots().plot([0, 1], [1, 0])
    written = sw.write_figure(fig, tmp_path / "sub" / "curve", static=static)
    assert [p.name for p in written] == ["curve.html", "curve.png"]
    html = (tmp_path / "sub" / "curve.html").read_text()
    assert "<script src=" not in html and len(html) > 1_000_000  # plotly.js embedded, no CDN
    assert (tmp_path / "sub" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiment_parser_defaults_and_options():
    parser = sw.experiment_parser("demo", name="exp")
    opts = parser.parse_args([])
    assert opts.out == Path("runs/exp") and not opts.quick and opts.seed == 0 and not opts.fresh and opts.progress
    opts = parser.parse_args(["--out", "x", "--quick", "--seed", "5", "--fresh", "--no-progress"])
    assert opts.out == Path("x") and opts.quick and opts.seed == 5 and opts.fresh and not opts.progress
