"""UniformQuantizer grids and granularities: Hypothesis properties and hand-computed grids."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import riverscape as rs
from riverscape.quant import QuantMap, UniformQuantizer, integer_grid, qat
from riverscape.quant.estimator_configs import LSQ, STE
from riverscape.quant.quantizers import tensor_eps

from helpers import tiny_cnn, tiny_mlp

GRID_BITS = {"symmetric": (1, 8), "full": (2, 8), "unsigned": (2, 8), "asymmetric": (1, 8), "ternary": (2, 2)}
SHAPES = [(1, 7), (3, 5), (4, 12), (2, 33), (5, 1), (3, 2, 3, 3), (2, 4, 3), (9,)]
PROPS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


@st.composite
def cases(draw):
    """A quantizer (grid, bits, granularity, range) and a float64 tensor to quantize."""
    grid = draw(st.sampled_from(sorted(GRID_BITS)))
    lo, hi = GRID_BITS[grid]
    bits = draw(st.integers(lo, hi))
    granularity = draw(st.sampled_from(["per-tensor", "per-channel", "per-group"]))
    group = draw(st.integers(1, 16)) if granularity == "per-group" else None
    range_method = draw(st.sampled_from(["minmax", "mse", "percentile"]))
    quant = UniformQuantizer(bits, grid=grid, per_channel=granularity != "per-tensor", group_size=group,
                             range=range_method, mse_grid=20)
    shape = draw(st.sampled_from(SHAPES))
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["normal", "positive", "sparse", "wide"]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "positive" or grid == "unsigned":
        w = w.abs()
    elif kind == "sparse":
        w = w * (torch.rand(shape, generator=g, dtype=torch.float64) < 0.3)
    elif kind == "wide":
        w = w * 10.0 ** torch.randint(-3, 4, shape, generator=g).to(torch.float64)
    return quant, w


def _step_and_range(quant: UniformQuantizer, qp):
    lo = qp.scale * (qp.qmin - qp.zero_point)
    hi = qp.scale * (qp.qmax - qp.zero_point)
    return lo, hi


@PROPS
@given(cases())
def test_quantized_values_are_fixed_points(case):
    quant, w = case
    qp = quant.qparams(w)
    out = quant.quantize_with(w, qp)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert torch.equal(quant.quantize_with(out, qp), out)  # Q(Q(x)) = Q(x) with the same parameters
    assert torch.equal(quant(w), out)


@PROPS
@given(cases())
def test_every_grid_point_is_a_fixed_point(case):
    quant, w = case
    qp = quant.qparams(w)
    g = torch.Generator().manual_seed(1)
    if quant.bits == 1:
        codes = torch.randint(0, 2, w.shape, generator=g).to(w.dtype) * 2 - 1
        points = qp.scale * codes
    else:
        codes = torch.randint(qp.qmin, qp.qmax + 1, w.shape, generator=g).to(w.dtype)
        points = qp.scale * (codes - qp.zero_point)
    if quant.grid == "ternary":
        points = torch.where(qp.scale > qp.threshold, points, torch.zeros_like(points))  # a <= Delta: only 0 is reachable
    assert torch.equal(quant.quantize_with(points, qp), points)


@PROPS
@given(cases())
def test_codes_and_values_stay_in_the_grid(case):
    quant, w = case
    qp = quant.qparams(w)
    codes = quant.codes(w, qp)
    lo, hi = integer_grid(quant.bits, quant.grid)
    assert (qp.qmin, qp.qmax) == (lo, hi) == quant.integer_range
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    out = quant.quantize_with(w, qp)
    if quant.bits == 1 or quant.grid == "ternary":
        expected = qp.scale * codes.to(w.dtype)
    else:
        expected = qp.scale * (codes.to(w.dtype) - qp.zero_point)
    assert torch.equal(out, expected)
    assert bool((qp.scale > 0).all())


@PROPS
@given(cases())
def test_error_at_most_half_a_step_inside_the_range(case):
    quant, w = case
    if quant.bits == 1 or quant.grid == "ternary":
        return  # no rounding range: sign / dead-zone grids
    qp = quant.qparams(w)
    lo, hi = _step_and_range(quant, qp)
    inside = (w >= lo) & (w <= hi)
    err = (quant.quantize_with(w, qp) - w).abs()
    half = (qp.scale / 2).expand_as(w)
    # exact up to the rounding of w / s and s * q: a few ulps of the larger of |w| and s/2
    slack = 8 * torch.finfo(w.dtype).eps * torch.maximum(w.abs(), half)
    assert bool((err[inside] <= half[inside] + slack[inside]).all())
    if quant.range == "minmax":
        # min-max ranges cover the tensor up to the rounding of the zero point (asymmetric: at most
        # half a step at one end), so the half-step bound holds everywhere (unsigned: for w >= 0)
        covered = w >= 0 if quant.grid == "unsigned" else torch.ones_like(inside)
        assert bool((err[covered] <= half[covered] + slack[covered]).all())


@PROPS
@given(cases())
def test_per_group_covering_the_input_is_per_channel_bit_for_bit(case):
    quant, w = case
    if w.ndim < 2 or not quant.per_channel:
        return
    n = w[0].numel()
    per_channel = UniformQuantizer(quant.bits, grid=quant.grid, range=quant.range, mse_grid=quant.mse_grid)
    for size in (n, n + 3):
        grouped = UniformQuantizer(quant.bits, grid=quant.grid, range=quant.range, mse_grid=quant.mse_grid, group_size=size)
        assert torch.equal(grouped(w), per_channel(w))
        assert torch.equal(grouped.codes(w), per_channel.codes(w))
        assert grouped.granularity_of(tuple(w.shape)) == "per-channel"


@PROPS
@given(cases())
def test_per_group_is_per_channel_on_each_group(case):
    """Each group (the last one possibly short) is quantized as its own channel slice."""
    quant, w = case
    if w.ndim < 2 or quant.group_size is None:
        return
    per_channel = UniformQuantizer(quant.bits, grid=quant.grid, range=quant.range, mse_grid=quant.mse_grid)
    out = quant.as_matrix(quant(w))
    m = quant.as_matrix(w)
    for start in range(0, m.shape[1], quant.group_size):
        piece = m[:, start : start + quant.group_size]
        # per channel on the slice, with the whole tensor's smallest scale (all-zero groups)
        expected = per_channel.quantize_with(piece, per_channel.row_qparams(piece, eps=tensor_eps(m)))
        assert torch.equal(out[:, start : start + quant.group_size], expected)


# ---------------------------------------------------------------------- hand-computed grids
def test_hand_computed_per_group_grid():
    w = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.3, 0.1, -1.0, 1.0]], dtype=torch.float64)
    q = UniformQuantizer(2, group_size=2)  # scales: [[2, 2, 4, 4], [0.3, 0.3, 1, 1]]
    qp = q.qparams(w)
    assert qp.scale.tolist() == [[2.0, 2.0, 4.0, 4.0], [0.3, 0.3, 1.0, 1.0]] and qp.group_size == 2
    assert q(w).tolist() == [[0.0, -2.0, 0.0, 4.0], [0.3, 0.0, -1.0, 1.0]]
    ragged = UniformQuantizer(2, group_size=3)  # groups [0:3] and [3:4]; row 0 scales 2 and 4
    assert ragged.qparams(w).scale.tolist() == [[2.0, 2.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]]
    assert ragged(w).tolist() == [[0.0, -2.0, 0.0, 4.0], [0.0, 0.0, -1.0, 1.0]]
    asym = UniformQuantizer(2, grid="asymmetric", group_size=2)  # row 0, group 0: alpha=-2, beta=1: s=1, z=2
    qp = asym.qparams(w)
    assert qp.scale[0, 0].item() == 1.0 and qp.zero_point[0, 0].item() == 2.0
    assert asym(w)[0, :2].tolist() == [1.0, -2.0]


def test_hand_computed_per_group_conv_layout():
    """Conv weights are grouped along the flattened ``in * kh * kw`` of each output channel."""
    w = torch.arange(1.0, 9.0, dtype=torch.float64).reshape(1, 2, 2, 2)  # in*kh*kw = 8: groups [1..4], [5..8]
    q = UniformQuantizer(3, group_size=4)  # s = 4/3 and 8/3
    assert torch.allclose(q.qparams(w).scale.reshape(-1), torch.tensor([4 / 3] * 4 + [8 / 3] * 4, dtype=torch.float64), rtol=0, atol=1e-15)
    # codes round(w / s): 0.75, 1.5, 2.25, 3 -> 1, 2, 2, 3 and 1.875, 2.25, 2.625, 3 -> 2, 2, 3, 3
    assert q.codes(w).reshape(-1).tolist() == [1, 2, 2, 3, 2, 2, 3, 3]


def test_hand_computed_ternary_grid():
    w = torch.tensor([[1.0, -2.0, 0.1, 3.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    q = UniformQuantizer(2, grid="ternary")  # row 0: Delta = 0.7 * 1.525 = 1.0675, a = (2 + 3) / 2
    qp = q.qparams(w)
    assert qp.threshold[0, 0].item() == pytest.approx(1.0675, abs=1e-15)
    assert qp.scale[0, 0].item() == 2.5
    assert q(w).tolist() == [[0.0, -2.5, 0.0, 2.5], [0.0, 0.0, 0.0, 0.0]]
    assert q.codes(w).tolist() == [[0, -1, 0, 1], [0, 0, 0, 0]]
    assert q.levels == 3 and q.short_name == "W2t"


def test_hand_computed_full_and_unsigned_grids():
    full = UniformQuantizer(3, grid="full", per_channel=False)  # [-4, 3]: s = max(4 / 4, 3 / 3) = 1
    assert full(torch.tensor([-4.0, 1.0, 3.0], dtype=torch.float64)).tolist() == [-4.0, 1.0, 3.0]
    assert full.integer_range == (-4, 3) and full.levels == 8 and full.symmetric
    unsigned = UniformQuantizer(2, grid="unsigned", per_channel=False)  # [0, 3]: s = 3 / 3
    assert unsigned(torch.tensor([0.0, 1.2, 2.0, 3.0, -1.0], dtype=torch.float64)).tolist() == [0.0, 1.0, 2.0, 3.0, 0.0]
    assert not unsigned.symmetric and unsigned.qparams(torch.tensor([1.0, 2.0])).zero_point.item() == 0.0


def test_grid_names_descriptions_and_validation():
    assert UniformQuantizer(4) == UniformQuantizer(4, symmetric=True) == UniformQuantizer(4, grid="symmetric")
    assert UniformQuantizer(4, symmetric=False).grid == "asymmetric"
    assert UniformQuantizer(2, symmetric=False, per_channel=False, range="mse").describe() == "2-bit asym per-tensor mse"
    assert UniformQuantizer(2, range="mse").describe() == "2-bit sym per-channel mse"
    assert UniformQuantizer(4, group_size=128).describe() == "4-bit sym per-group(128) minmax"
    assert UniformQuantizer(2, grid="ternary").describe() == "2-bit ternary per-channel"
    names = [UniformQuantizer(4).short_name, UniformQuantizer(4, group_size=128).short_name,
             UniformQuantizer(8, per_channel=False).short_name, UniformQuantizer(4, grid="full").short_name,
             UniformQuantizer(3, grid="asymmetric", group_size=32).short_name, UniformQuantizer(4, grid="unsigned").short_name]
    assert names == ["W4", "W4g128", "W8pt", "W4f", "W3g32a", "W4u"]
    for bad, match in [
        (dict(bits=3, grid="ternary"), "2-bit"),
        (dict(bits=1, grid="full"), "sign"),
        (dict(bits=4, grid="nf4"), "unknown grid"),
        (dict(bits=4, symmetric=True, grid="asymmetric"), "contradicts"),
        (dict(bits=4, group_size=0), "group_size"),
        (dict(bits=4, group_size=8, per_channel=False), "per_channel=True"),
    ]:
        with pytest.raises(ValueError, match=match):
            UniformQuantizer(**bad)


# ---------------------------------------------------------------------- callers
def _objective(model, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return rs.Objective(model, "cross_entropy", (x, torch.randint(0, 3, (shape[0],), generator=g)))


def test_quant_map_reports_per_group_rows_and_quantizes_per_group():
    obj = _objective(tiny_cnn(), (6, 1, 4, 4))
    qmap = QuantMap(obj, UniformQuantizer(2, group_size=4))
    rows = {row.name: row.granularity for row in qmap.status() if row.quantized}
    assert rows == {"0.weight": "per-group", "4.weight": "per-group"}  # in*kh*kw = 9 and 32 inputs
    theta_q = qmap(obj.theta0)
    for i, t in enumerate(qmap.targets):
        w = qmap.tensor(obj.theta0, t)
        assert torch.equal(qmap.tensor(theta_q, t), qmap.quantizer_for(i)(w))
    assert qmap.codes(obj.theta0).numel() == qmap.n_quantized


def test_qat_with_per_group_ste_runs_and_lsq_and_ternary_refuse():
    obj = _objective(tiny_mlp(), (16, 5))
    res = qat(obj, UniformQuantizer(2, group_size=2), steps=3, lr=1e-2, estimator=STE(), progress=False)
    final = res.latent_trajectory[-1]
    qmap = QuantMap(obj, UniformQuantizer(2, group_size=2))
    assert torch.equal(res.quantized_trajectory[-1], qmap(final, qmap.qparams(obj.theta0)))  # frozen per-group scales
    with pytest.raises(ValueError, match="group_size"):
        qat(obj, UniformQuantizer(2, group_size=2), steps=2, lr=1e-2, estimator=LSQ(), progress=False)
    with pytest.raises(ValueError, match="ternary"):
        qat(obj, UniformQuantizer(2, grid="ternary"), steps=2, lr=1e-2, estimator="ste", progress=False)
