"""Per-layer tables stay readable for models with hundreds of layers."""
from __future__ import annotations

import math

from riverscape.report.analysis_page import MAX_LAYER_ROWS, _top_layer_rows


def _row(i: int, measured) -> dict:
    return {"layer": f"blocks.{i}.weight", "numel": 10 + i, "predicted_damage": 0.5 * i, "measured_damage": measured}


def test_short_tables_are_shown_whole_in_model_order():
    rows = [_row(i, float(i)) for i in range(5)]
    assert _top_layer_rows(rows) == (rows, "")


def test_long_tables_show_the_most_damaging_layers_and_count_the_rest():
    measured = [float((7 * i) % 200) for i in range(200)]  # a permutation of 0..199
    measured[3] = math.nan  # a layer whose damage could not be measured sorts last, not first
    rows = [_row(i, m) for i, m in enumerate(measured)]
    shown, note = _top_layer_rows(rows)
    assert len(shown) == MAX_LAYER_ROWS + 1
    top = [r["measured_damage"] for r in shown[:-1]]
    assert top == sorted((m for m in measured if m == m), reverse=True)[:MAX_LAYER_ROWS]
    assert shown[-1]["layer"] == f"… {200 - MAX_LAYER_ROWS} more layers" and set(shown[-1].values()) - {shown[-1]["layer"]} == {""}
    assert "30 most damaging of 200 layers" in note and "metrics.json" in note


def test_missing_measurements_fall_back_to_predicted_damage_then_size():
    rows = [{"layer": f"l{i}", "numel": i, "predicted_damage": None if i % 2 else float(i), "measured_damage": None} for i in range(40)]
    shown, _ = _top_layer_rows(rows, limit=3)
    assert [r["layer"] for r in shown[:3]] == ["l38", "l36", "l34"]


def test_a_language_models_perplexity_is_not_drawn_as_accuracy():
    from riverscape.report.analysis_page import _qat_history

    history = {"step": [0, 1], "loss": [2.0, 1.5], "grid_flips": [0, 3], "eval_metric": [7.4, 4.5]}
    assert _qat_history(history)["accuracy"] == [7.4, 4.5]  # a classifier's metric is its accuracy
    assert "accuracy" not in _qat_history(history, metric_is_accuracy=False)  # perplexity stays in metrics.json only
