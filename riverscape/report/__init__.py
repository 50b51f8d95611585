"""Figures and the self-contained HTML report: functions of results that compute nothing.

* :mod:`.figures`: interactive Plotly figures (``slice_figure``, ``side_by_side_slices``,
  ``path_figure``, ``spectrum_figure``, ``density_figure``, ``alignment_figure``,
  ``accuracy_vs_bits_figure``, ``qat_curve_figure``), re-exported here.
* :mod:`.static`: matplotlib twins with the same names and arguments (PNG without kaleido).
* :mod:`.html`: :class:`ReportPage` (one offline HTML file) and :func:`save_figure`.
"""
from . import static
from .figures import (
    accuracy_vs_bits_figure,
    alignment_figure,
    density_figure,
    path_figure,
    side_by_side_slices,
    slice_figure,
    qat_curve_figure,
    spectrum_figure,
)
from .html import ReportPage, save_figure
from .inputs import FIGURE_NAMES, slice_arrays

__all__ = [*FIGURE_NAMES, "ReportPage", "save_figure", "slice_arrays", "static"]
