"""riverscape.report: figures draw exactly their inputs, the HTML page is one offline file."""
from __future__ import annotations

import math
import re

import numpy as np
import plotly.graph_objects as go
import pytest
from matplotlib.figure import Figure
from plotly.offline import get_plotlyjs

from riverscape.report import (
    ReportPage,
    accuracy_vs_bits_figure,
    alignment_figure,
    density_figure,
    path_figure,
    qat_curve_figure,
    save_figure,
    side_by_side_slices,
    slice_arrays,
    slice_figure,
    spectrum_figure,
    static,
)
from riverscape.report.inputs import color_values, log_ticks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture
def grid():
    """A quadratic bowl (FP) and a staircase (quantized) on a 9 x 7 grid, loss[i, j] at (alphas[i], betas[j])."""
    alphas, betas = np.linspace(-1, 1, 9), np.linspace(-0.5, 0.5, 7)
    a, b = np.meshgrid(alphas, betas, indexing="ij")
    fp = 0.01 + 3 * a**2 + 0.5 * b**2
    quantized = 0.2 + 3 * np.round(2 * a) ** 2 / 4 + 0.5 * np.round(4 * b) ** 2 / 16
    return alphas, betas, fp, quantized


MARKERS = {"θ_fp": (0.0, 0.0), "Q(θ_fp)": (0.25, -0.125), "QAT": (0.1, 0.05)}
PATHS = {"QAT trajectory": (np.array([0.25, 0.2, 0.1]), np.array([-0.125, -0.05, 0.05]))}
PROFILES = {
    "linear": (np.linspace(0, 1, 5), np.array([0.01, 0.1, 0.4, 0.9, 1.6]), np.array([0.2, 0.2, 0.5, 0.5, 2.0])),
    "bezier": (np.linspace(0, 1, 5), np.array([0.01, 0.02, 0.03, 0.02, 0.01])),
}
EIGS = {"θ_fp": np.array([3.0, 40.0, 10.0]), "Q(θ_fp)": np.array([90.0, 20.0, 5.0])}
DENSITIES = {"θ_fp": (np.linspace(-1, 10, 12), np.array([0.0, 1, 0.5, 1e-3, 1e-12, 0, 0, 0, 1e-4, 0, 0, 0]))}
ALIGNMENT = {
    "PTQ 2-bit": dict(cosine_to_fp=0.21, cosine_hill=0.43, cosine_river=0.05, random_baseline=1 / math.sqrt(2500), null_mean=0.16, null_sd=0.02),
    "PTQ 4-bit": dict(A_back=0.12, A_hill=0.3, A_river=0.02, dim=400, null_mean=0.12, null_sd=0.015),
}
BITS_ROWS = [
    dict(method="PTQ", bits=2, accuracy=0.18),
    dict(method="PTQ", bits=8, accuracy=0.97),
    dict(method="PTQ", bits=4, accuracy=0.93),
    dict(method="QAT", bits=4, accuracy=0.96),
    dict(method="QAT", bits=2, accuracy=0.91),
]
HISTORY = dict(
    step=np.arange(0, 50, 10),
    quantized_loss=np.array([2.3, 0.9, 0.2, 0.05, 0.04]),
    latent_loss=np.array([0.3, 0.2, 0.1, 0.05, 0.03]),
    accuracy=np.array([0.2, 0.6, 0.9, 0.95, 0.96]),
    flips=np.array([400, 200, 50, 10, 5]),
)


def traces_named(fig: go.Figure, name: str) -> list:
    return [t for t in fig.data if t.name == name]


# --------------------------------------------------------------------------------- slices
def test_slice_figure_contour_draws_log_loss_with_markers_and_paths(grid):
    alphas, betas, fp, _ = grid
    fig = slice_figure(alphas, betas, fp, markers=MARKERS, paths=PATHS, title="L(θ)")
    contour = fig.data[0]
    assert isinstance(contour, go.Contour) and contour.coloraxis == "coloraxis"
    # Plotly's z is indexed [row = beta, column = alpha]: the transpose of loss[i_alpha, j_beta].
    np.testing.assert_allclose(np.array(contour.z), np.log10(fp).T, rtol=0, atol=0)
    assert fig.layout.coloraxis.cmin == pytest.approx(np.log10(fp.min()), abs=0)
    assert fig.layout.coloraxis.cmax == pytest.approx(np.log10(fp.max()), abs=0)
    # hover shows the raw loss, not its log
    assert np.array(contour.text)[3, 4] == f"{fp[4, 3]:.5g}"
    for label, (x, y) in MARKERS.items():
        (trace,) = traces_named(fig, label)
        assert trace.mode == "markers" and (trace.x[0], trace.y[0]) == (x, y)
    (path,) = traces_named(fig, "QAT trajectory")
    np.testing.assert_array_equal(path.x, PATHS["QAT trajectory"][0])
    assert fig.layout.xaxis.title.text.startswith("α") and fig.layout.yaxis.title.text.startswith("β")


def test_slice_figure_surface_places_markers_on_nearest_node(grid):
    alphas, betas, fp, _ = grid
    fig = slice_figure(alphas, betas, fp, markers={"p": (0.5, 0.17), "given": (0.0, 0.0, 7.0)}, kind="surface", log=False)
    assert isinstance(fig.data[0], go.Surface)
    (p,) = traces_named(fig, "p")
    assert isinstance(p, go.Scatter3d)
    # nearest node of (0.5, 0.17): alphas[6] = 0.5, betas[4] = 1/6
    assert p.z[0] == fp[6, 4]
    assert traces_named(fig, "given")[0].z[0] == 7.0
    both = slice_figure(alphas, betas, fp, markers=MARKERS, kind="both")
    assert {type(t) for t in both.data} >= {go.Contour, go.Surface, go.Scatter, go.Scatter3d}
    assert sum(t.showlegend is not False for t in traces_named(both, "θ_fp")) == 1  # one legend entry


def test_slice_figure_rejects_bad_arguments(grid):
    alphas, betas, fp, _ = grid
    with pytest.raises(ValueError, match="contour.*surface.*both"):
        slice_figure(alphas, betas, fp, kind="heatmap")
    with pytest.raises(ValueError, match="shape"):
        slice_figure(alphas, betas, fp.T)
    shifted = slice_figure(alphas, betas, fp - 1.0)  # a non-positive loss never fails the figure
    assert "linear axis" in shifted.layout.title.text


def test_side_by_side_shares_one_colour_scale(grid):
    alphas, betas, fp, quantized = grid
    fig = side_by_side_slices(alphas, betas, fp, quantized, markers=MARKERS, paths=PATHS)
    contours = [t for t in fig.data if isinstance(t, go.Contour)]
    assert len(contours) == 2 and {c.coloraxis for c in contours} == {"coloraxis"}
    both = np.log10(np.concatenate([fp.ravel(), quantized.ravel()]))
    assert fig.layout.coloraxis.cmin == both.min() and fig.layout.coloraxis.cmax == both.max()
    assert not any(getattr(t, "showscale", False) for t in fig.data)  # the single colour bar is the axis'
    assert contours[0].contours.to_plotly_json() == contours[1].contours.to_plotly_json()  # same levels
    assert contours[0].xaxis == "x" and contours[1].xaxis == "x2"
    for label in MARKERS:  # drawn in both panels, listed once in the legend
        drawn = traces_named(fig, label)
        assert len(drawn) == 2 and [t.showlegend for t in drawn] == [True, False]
    assert [a.text for a in fig.layout.annotations] == ["L(θ): full precision", "L(Q(θ)): quantized"]
    linear = side_by_side_slices(alphas, betas, fp, quantized, log=False)
    assert linear.layout.coloraxis.cmin == min(fp.min(), quantized.min())
    assert linear.layout.coloraxis.cmax == max(fp.max(), quantized.max())


def test_excess_log_colours_use_common_minimum_and_half_smallest_excess():
    fp, quantized = np.array([[1.0, 1.5], [3.0, np.inf]]), np.array([[2.0, 2.0], [1.0, 11.0]])
    colors = color_values([fp, quantized], log=True, subtract_min=True)
    # excesses over the common minimum 1.0: fp [0, .5, 2, nan], q [1, 1, 0, 10]; zero drawn at 0.25
    np.testing.assert_allclose(colors.grids[0], np.log10([[0.25, 0.5], [2.0, np.nan]]))
    np.testing.assert_allclose(colors.grids[1], np.log10([[1.0, 1.0], [0.25, 10.0]]))
    assert (colors.zmin, colors.zmax) == (math.log10(0.25), 1.0)


def test_log_ticks_label_loss_values():
    ticks, labels = log_ticks(math.log10(0.03), math.log10(4.0))
    assert labels == ["0.05", "0.1", "0.2", "0.5", "1", "2"]
    np.testing.assert_allclose(ticks, np.log10([0.05, 0.1, 0.2, 0.5, 1, 2]))
    ticks, labels = log_ticks(-8.0, 0.0)  # many decades: whole decades only, at most 8 ticks
    assert len(ticks) <= 8 and all(float(t).is_integer() for t in ticks)


def test_slice_arrays_reads_any_slice_result(grid):
    alphas, betas, fp, _ = grid

    class Slice:  # the shape of riverscape.landscape's slice dataclass
        pass

    s = Slice()
    s.alphas, s.betas, s.loss, s.which = alphas, betas, fp, "L(theta)"
    a, b, z = slice_arrays(s)
    assert np.array_equal(a, alphas) and np.array_equal(z, fp)
    import torch  # results holding tensors draw the same as numpy arrays

    s.alphas, s.betas, s.loss = torch.from_numpy(alphas), torch.from_numpy(betas), torch.from_numpy(fp)
    from_tensors = slice_figure(*slice_arrays(s))
    np.testing.assert_array_equal(np.array(from_tensors.data[0].z), slice_figure(alphas, betas, fp).data[0].z)
    with pytest.raises(ValueError, match="alphas, betas, loss"):
        slice_arrays(object())


# ----------------------------------------------------------------------------- 1-D figures
def test_path_figure_fp_solid_quantized_dashed_same_colour():
    fig = path_figure(PROFILES)
    fp, q = traces_named(fig, "linear: L(θ)")[0], traces_named(fig, "linear: L(Q(θ))")[0]
    assert fp.line.dash == "solid" and q.line.dash == "dash" and fp.line.color == q.line.color
    np.testing.assert_array_equal(q.y, PROFILES["linear"][2])
    assert len(fig.data) == 3  # bezier has no quantized profile
    assert traces_named(fig, "bezier: L(θ)")[0].line.color != fp.line.color
    assert fig.layout.yaxis.type == "log"  # losses span 0.01 .. 2 (> 30x)
    assert path_figure({"flat": (np.arange(3), np.ones(3))}).layout.yaxis.type != "log"


def test_spectrum_figure_ranks_in_descending_order():
    fig = spectrum_figure(EIGS)
    np.testing.assert_array_equal(traces_named(fig, "θ_fp")[0].y, [40.0, 10.0, 3.0])
    np.testing.assert_array_equal(traces_named(fig, "θ_fp")[0].x, [1, 2, 3])
    assert fig.layout.yaxis.type == "log"
    assert spectrum_figure({"saddle": np.array([2.0, -1.0])}).layout.yaxis.type != "log"


def test_density_figure_is_log_with_a_floor():
    fig = density_figure(DENSITIES, floor=1e-6)
    (trace,) = fig.data
    np.testing.assert_array_equal(trace.y, np.maximum(DENSITIES["θ_fp"][1], 1e-6))
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.range[0] == pytest.approx(-6)


def test_alignment_figure_bars_bands_and_nulls():
    fig = alignment_figure(ALIGNMENT)
    back = traces_named(fig, "A(u_back): toward θ_fp")[0]
    assert isinstance(back, go.Bar) and list(back.y) == [0.21, 0.12]  # cosine_to_fp and the A_back alias
    bands = [t for t in fig.data if t.legendgroup == "band"]
    assert len(bands) == 2 and sum(t.showlegend is not False for t in bands) == 1
    # 1.96 * random_baseline = 1.96 / sqrt(2500); dim = 400 gives 1.96 / 20
    assert max(bands[0].y) == pytest.approx(1.96 / 50, rel=1e-12)
    assert max(bands[1].y) == pytest.approx(1.96 / 20, rel=1e-12)
    (null,) = [t for t in fig.data if t.name.startswith("matched null")]
    assert list(null.y) == [0.16, 0.12] and list(null.error_y.array) == [0.02, 0.015]
    assert list(fig.layout.xaxis.ticktext) == ["PTQ 2-bit", "PTQ 4-bit"]
    with pytest.raises(ValueError, match="cosine_to_fp"):
        alignment_figure({"empty": {"null_mean": 0.1}})

    class Result:  # a result dataclass is read through its to_dict()
        def to_dict(self):
            return ALIGNMENT["PTQ 2-bit"]

    from_object = alignment_figure({"PTQ 2-bit": Result(), "PTQ 4-bit": ALIGNMENT["PTQ 4-bit"]})
    assert from_object.to_plotly_json() == fig.to_plotly_json()


def test_accuracy_vs_bits_descending_bits_per_method():
    fig = accuracy_vs_bits_figure(BITS_ROWS, reference=0.972, chance=0.1)
    ptq = traces_named(fig, "PTQ")[0]
    assert list(ptq.x) == [8.0, 4.0, 2.0] and list(ptq.y) == [0.97, 0.93, 0.18]
    assert fig.layout.xaxis.autorange == "reversed"
    assert list(traces_named(fig, "full precision (0.972)")[0].y) == [0.972, 0.972]
    assert traces_named(fig, "chance (0.1)")[0].line.dash == "dot"
    with pytest.raises(ValueError, match="method"):
        accuracy_vs_bits_figure([{"bits": 2, "accuracy": 0.5}])


def test_qat_curve_figure_axes_and_history_forms():
    fig = qat_curve_figure(HISTORY, fp_loss=0.03, fp_accuracy=0.97)
    acc = traces_named(fig, "accuracy of Q(θ_t)")[0]
    loss = traces_named(fig, "L(Q(θ_t)) (deployed)")[0]
    flips = traces_named(fig, "grid flips per step")[0]
    assert acc.yaxis != loss.yaxis and flips.yaxis not in (acc.yaxis, loss.yaxis)
    assert fig.layout.yaxis.type == "log"  # 0.03 .. 2.3
    rows = [dict(zip(HISTORY, values)) for values in zip(*HISTORY.values())]
    from_rows = qat_curve_figure(rows, fp_loss=0.03, fp_accuracy=0.97)
    assert from_rows.to_plotly_json() == fig.to_plotly_json()
    with pytest.raises(ValueError, match="quantized loss"):
        qat_curve_figure({"step": [0, 1], "accuracy": [0.1, 0.2]})


# ------------------------------------------------------------------------ purity, statics
def _all_figure_calls(grid):
    alphas, betas, fp, quantized = grid
    return [
        ("slice_figure", (alphas, betas, quantized), dict(markers=MARKERS, paths=PATHS, kind="both", subtract_min=True)),
        ("side_by_side_slices", (alphas, betas, fp, quantized), dict(markers=MARKERS, paths=PATHS)),
        ("path_figure", (PROFILES,), {}),
        ("spectrum_figure", (EIGS,), {}),
        ("density_figure", (DENSITIES,), {}),
        ("alignment_figure", (ALIGNMENT,), {}),
        ("accuracy_vs_bits_figure", (BITS_ROWS,), dict(reference=0.97, chance=0.1)),
        ("qat_curve_figure", (HISTORY,), dict(fp_loss=0.03)),
    ]


def _arrays(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _arrays(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _arrays(value)


def test_figures_do_not_modify_their_inputs(grid):
    import riverscape.report.figures as plotly_figures

    calls = _all_figure_calls(grid)
    arrays = [a for _, args, kwargs in calls for a in _arrays((args, kwargs))]
    copies = [a.copy() for a in arrays]
    for array in arrays:
        array.flags.writeable = False  # an in-place write would raise
    try:
        for name, args, kwargs in calls:
            assert isinstance(getattr(plotly_figures, name)(*args, **kwargs), go.Figure)
            assert isinstance(getattr(static, name)(*args, **kwargs), Figure)
    finally:
        for array in arrays:
            array.flags.writeable = True
    for array, copy in zip(arrays, copies):
        np.testing.assert_array_equal(array, copy)


def test_static_twins_save_png_and_save_figure_writes_both(grid, tmp_path):
    alphas, betas, fp, quantized = grid
    fig = static.side_by_side_slices(alphas, betas, fp, quantized, markers=MARKERS)
    # one shared colour bar: two panels + one colour-bar axis
    assert len(fig.axes) == 3
    assert [im.get_clim() for ax in fig.axes[:2] for im in ax.collections[:1]] == [
        (np.log10(min(fp.min(), quantized.min())), np.log10(max(fp.max(), quantized.max())))
    ] * 2
    written = save_figure(side_by_side_slices(alphas, betas, fp, quantized, markers=MARKERS), tmp_path / "slices", static=fig)
    assert set(written) == {"html", "png"}
    png = written["png"].read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 20_000
    html_text = written["html"].read_text(encoding="utf-8")
    assert html_text.count(get_plotlyjs()) == 1 and "Plotly.newPlot" in html_text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slices.html", "slices.png"]  # no temporaries left


# ------------------------------------------------------------------------------------ html
def test_report_page_is_one_self_contained_file(grid, tmp_path):
    alphas, betas, fp, quantized = grid
    page = ReportPage("PTQ <vs> QAT", subtitle="digits & MLP")
    page.add_heading("Summary")
    page.add_text("Bits **2** & `Q(θ)`.\n\n- item <b>one</b>\n- item two\n\n<script>alert('x')</script>")
    page.add_table(
        [dict(method="PTQ", bits=2, accuracy=0.18123456), dict(method="<QAT>", bits=2, accuracy=None)],
        columns={"method": "method", "bits": "bits", "accuracy": "test accuracy"},
        caption="Deployed accuracy",
    )
    page.add_heading("Slices")
    page.add_figure(side_by_side_slices(alphas, betas, fp, quantized, markers=MARKERS), caption="One colour scale.")
    page.add_figure(path_figure(PROFILES), caption="Loss along paths.")
    page.add_heading("Summary")  # duplicate heading gets a unique anchor
    page.add_figure(static.path_figure(PROFILES), caption="A matplotlib figure.")
    path = page.save(tmp_path / "out" / "report.html")
    text = path.read_text(encoding="utf-8")

    plotly_js = get_plotlyjs()
    assert text.count(plotly_js) == 1 and text.index(plotly_js) < text.index("</head>")
    rest = text.replace(plotly_js, "")
    markup = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", rest)  # base64 may spell "cdn" by chance
    assert "http://" not in markup and "https://" not in markup and "cdn" not in markup.lower()
    assert not re.search(r"<script[^>]+src=", text) and not re.search(r"<link[^>]+href=", text)
    assert rest.count("Plotly.newPlot") == 2 and 'id="figure-1"' in rest and 'id="figure-2"' in rest
    assert 'src="data:image/png;base64,' in rest
    # escaping: user text never becomes markup
    assert "<script>alert" not in rest and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in rest
    assert "<title>PTQ &lt;vs&gt; QAT</title>" in rest and "&lt;QAT&gt;" in rest and "&lt;b&gt;one&lt;/b&gt;" in rest
    assert "<strong>2</strong>" in rest and "<code>Q(θ)</code>" in rest and "<li>item two</li>" in rest
    # table: numeric columns right-aligned, floats rounded, missing values as a dash, caption numbered
    assert "<th class=num scope=\"col\">test accuracy</th>" in rest and "<td class=num>0.1812</td>" in rest
    assert "<td class=num>–</td>" in rest and "<td>PTQ</td>" in rest
    assert "Table 1.</span> Deployed accuracy</caption>" in rest
    for n, caption in enumerate(["One colour scale.", "Loss along paths.", "A matplotlib figure."], start=1):
        assert f"Figure {n}.</span> {caption}</figcaption>" in rest
    # table of contents links every heading, with unique anchors
    assert re.findall(r'<a href="#([^"]+)">', rest) == ["summary", "slices", "summary-2"]
    assert 'id="summary"' in rest and 'id="summary-2"' in rest
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]


def test_report_page_without_plotly_has_no_script_and_rejects_bad_input():
    page = ReportPage("tables only")
    page.add_table([{"a": 1}], caption=None)
    assert "<script" not in page.to_html()
    with pytest.raises(ValueError, match="level"):
        page.add_heading("x", level=1)
    with pytest.raises(ValueError, match="plotly or matplotlib"):
        page.add_figure("not a figure")
