"""Figures never fail on legitimate values: a loss of exactly 0 (or below) on a log axis falls back to linear."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from riverscape.report import figures, static
from riverscape.report.inputs import color_values

ALPHAS = np.linspace(-1.0, 1.0, 5)
BETAS = np.linspace(-1.0, 1.0, 4)


def _bowl(minimum: float) -> np.ndarray:
    """A quadratic bowl on the grid whose smallest value is exactly ``minimum``."""
    a, b = np.meshgrid(ALPHAS, BETAS, indexing="ij")
    z = a**2 + b**2
    return z - z.min() + minimum


def _plotly_title(fig) -> str:
    return fig.layout.title.text or ""


def _static_title(fig) -> str:
    return fig.get_suptitle()


@pytest.mark.parametrize("minimum, text", [(0.0, "linear axis: loss reaches 0"), (-0.25, "linear axis: loss is negative")])
def test_slices_with_non_positive_loss_render_in_both_backends(minimum, text, tmp_path):
    loss = _bowl(minimum)
    assert loss.min() == minimum
    quantized = loss + 0.5
    for backend, title_of in ((figures, _plotly_title), (static, _static_title)):
        one = backend.slice_figure(ALPHAS, BETAS, loss, markers={"θ_fp": (0.0, 0.0)}, kind="both", title="slice")
        both = backend.side_by_side_slices(ALPHAS, BETAS, loss, quantized, markers={"θ_fp": (0.0, 0.0)})
        for fig in (one, both):
            assert text in title_of(fig), (backend.__name__, title_of(fig))
        assert title_of(one).startswith("slice")  # the given title stays, the note is a second line
    # the static figures really draw (Agg), the Plotly ones serialise
    static.side_by_side_slices(ALPHAS, BETAS, loss, quantized).savefig(tmp_path / "s.png")
    figures.side_by_side_slices(ALPHAS, BETAS, loss, quantized).to_json()


def test_positive_loss_keeps_the_log_scale_without_a_note():
    loss = _bowl(0.1)
    fig = figures.slice_figure(ALPHAS, BETAS, loss)
    assert not _plotly_title(fig)
    assert fig.layout.coloraxis.colorbar.tickvals  # log ticks are set only on a log colour bar
    assert static.slice_figure(ALPHAS, BETAS, loss).get_suptitle() == ""


def test_linear_fallback_colours_are_the_raw_loss():
    loss = _bowl(0.0)
    colors = color_values([loss], log=True, subtract_min=False, fallback=True)
    assert not colors.log and colors.note == "linear axis: loss reaches 0"
    np.testing.assert_array_equal(colors.grids[0], loss)
    assert (colors.zmin, colors.zmax) == (0.0, float(loss.max()))


def test_the_library_function_still_refuses_an_explicit_log_of_zero():
    with pytest.raises(ValueError, match="needs a positive loss"):
        color_values([_bowl(0.0)], log=True, subtract_min=False)


def test_one_dimensional_figures_fall_back_when_log_is_requested():
    t = np.linspace(0.0, 1.0, 6)
    profile = {"path": (t, np.array([0.0, 0.1, 1.0, 3.0, 10.0, 30.0]))}
    history = {"step": [0, 1, 2], "quantized_loss": [1.0, 0.1, 0.0]}
    eigs = {"θ_fp": [3.0, 1.0, -0.5]}
    for backend, title_of in ((figures, _plotly_title), (static, _static_title)):
        assert "linear axis: the loss reaches 0" in title_of(backend.path_figure(profile, log_y=True))
        assert "linear axis: the loss reaches 0" in title_of(backend.qat_curve_figure(history, log_y=True))
        assert "linear axis: an eigenvalue is negative" in title_of(backend.spectrum_figure(eigs, log_y=True))
        assert not title_of(backend.path_figure(profile))  # the automatic choice is linear, nothing to explain
    assert figures.path_figure(profile, log_y=True).layout.yaxis.type != "log"
