"""GPTQ against round-to-nearest, against a slow textbook reference, and end to end on tiny models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import riverscape as rs
from riverscape.quant import QuantMap, UniformQuantizer, ptq, ptq_result
from riverscape.quant.ptq import GPTQ, RTN, collect_input_hessians, gptq_quantize
from riverscape.quant.quantizers import tensor_eps

from helpers import tiny_cnn, tiny_mlp

F64 = torch.float64


def _correlated(rows: int, n: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated columns (a random mixing of few latent factors plus noise)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, 4, generator=g, dtype=F64)
    return latent @ torch.randn(4, n, generator=g, dtype=F64) + 0.1 * torch.randn(rows, n, generator=g, dtype=F64)


def _recon(x, w, q) -> float:
    return float(((x @ (w - q).T) ** 2).sum())


def _slow_gptq(w, h, quantizer, *, percdamp, act_order):
    """Textbook OBQ/GPTQ (paper eqs. 2-3): explicit inverse, one column at a time, row/column removal.

    Per-group scales are chosen when the first column of a group is reached, from the group's
    current weights; the inverse of the remaining Hessian is updated by Gaussian elimination.
    """
    w = w.clone()
    h = h.clone()
    n = w.shape[1]
    eps = tensor_eps(w)
    size = quantizer.group_size
    params, fixed = {}, None
    if size is None or n <= size:  # per-channel/tensor scales: those of the original weights (as RTN)
        fixed = quantizer.row_qparams(w if quantizer.per_channel else w.reshape(1, -1), eps)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True).tolist() if act_order else list(range(n))
    hinv = torch.linalg.inv(h + percdamp * torch.diagonal(h).mean() * torch.eye(n, dtype=F64))
    q = torch.zeros_like(w)
    remaining = list(order)
    for j in order:
        if fixed is None:
            g = j // size
            if g not in params:
                params[g] = quantizer.row_qparams(w[:, g * size : (g + 1) * size], eps)
            qp = params[g]
        else:
            qp = fixed
        q[:, j] = quantizer.quantize_with(w[:, j : j + 1], qp)[:, 0]
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        remaining.remove(j)
        w[:, remaining] -= err[:, None] * hinv[j, remaining][None, :]
        w[:, j] = q[:, j]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return q


QUANTIZERS = [
    UniformQuantizer(3),
    UniformQuantizer(2, group_size=4),
    UniformQuantizer(4, grid="asymmetric", group_size=5),  # ragged last group (n = 12)
    UniformQuantizer(2, grid="ternary"),
    UniformQuantizer(1),
    UniformQuantizer(4, grid="full", per_channel=False),
]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 8])
def test_gptq_reconstructs_correlated_inputs_better_than_rtn(bits, group_size):
    x = _correlated(256, 32, seed=bits)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(10 + bits), dtype=F64)
    quant = UniformQuantizer(bits, group_size=group_size)
    q_gptq, _ = gptq_quantize(w, x.T @ x, quant)
    rtn = _recon(x, w, quant(w))
    # GPTQ is greedy, not optimal, but on correlated inputs it wins by a wide margin (measured: >2x)
    assert _recon(x, w, q_gptq) < 0.7 * rtn


@pytest.mark.parametrize("quant", QUANTIZERS, ids=lambda q: q.short_name)
def test_gptq_is_rtn_when_the_hessian_is_the_identity(quant):
    w = torch.randn(6, 12, generator=torch.Generator().manual_seed(3), dtype=F64)
    q, qp = gptq_quantize(w, torch.eye(12, dtype=F64), quant, percdamp=0.0, block_size=5)
    assert torch.equal(q, quant(w))  # bit for bit: no error is propagated through U = I
    expected = quant.qparams(w)
    assert torch.equal(qp.scale, expected.scale) and torch.equal(qp.zero_point, expected.zero_point)


@pytest.mark.parametrize("quant", QUANTIZERS, ids=lambda q: q.short_name)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_the_slow_textbook_reference(quant, act_order):
    x = _correlated(40, 12, seed=7)
    x[:, 5] = 0.0  # a dead input column
    h = x.T @ x
    w = torch.randn(6, 12, generator=torch.Generator().manual_seed(4), dtype=F64)
    expected = _slow_gptq(w, h, quant, percdamp=0.01, act_order=act_order)
    for block in (1, 5, 128):  # lazy block updates do not change the result
        q, qp = gptq_quantize(w, h, quant, percdamp=0.01, block_size=block, act_order=act_order)
        # same grid points; values equal up to the rounding of different (equivalent) float64 algebra
        assert torch.equal(quant.codes(q, qp), quant.codes(expected, qp))
        assert torch.allclose(q, expected, rtol=0, atol=1e-12)
        assert torch.equal(quant.quantize_with(q, qp), q)  # on the grid of the returned parameters
    if quant.bits > 1:  # the dead column is set to 0 before quantization, and 0 is a grid point
        assert torch.equal(q[:, 5], torch.zeros(6, dtype=F64))


def test_gptq_refuses_a_singular_hessian_without_damping():
    x = _correlated(3, 8, seed=0)  # rank 3 < 8
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(torch.randn(2, 8, dtype=F64), x.T @ x, UniformQuantizer(3), percdamp=0.0)
    with pytest.raises(ValueError, match=r"shape \(8, 8\)"):
        gptq_quantize(torch.randn(2, 8, dtype=F64), torch.eye(7, dtype=F64), UniformQuantizer(3))


def _snapshot(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("make, shape", [(tiny_mlp, (40, 5)), (tiny_cnn, (40, 1, 4, 4))])
@pytest.mark.parametrize("method", ["gptq", GPTQ(act_order=True, block_size=2, calibration_samples=16, seed=3)])
def test_ptq_gptq_end_to_end_leaves_the_models_untouched(make, shape, method):
    g = torch.Generator().manual_seed(0)
    model = make()
    x = torch.randn(shape, generator=g, dtype=F64)
    obj = rs.Objective(model, "cross_entropy", (x, torch.randint(0, 3, (shape[0],), generator=g)), batch_size=15)
    user, private = _snapshot(model), _snapshot(obj.module)
    res = ptq_result(obj, 2, method=method)
    assert all(torch.equal(user[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(private[k], v) for k, v in obj.module.state_dict().items())
    assert not any(m._forward_hooks for m in obj.module.modules())
    qmap = QuantMap(obj, UniformQuantizer(2))
    for i, t in enumerate(qmap.targets):
        w = qmap.tensor(res.theta_q, t)
        assert torch.equal(qmap.quantizer_for(i).quantize_with(w, res.qparams[t.name]), w)  # on the grid
    assert torch.equal(res.theta_q[~qmap.mask], obj.theta0[~qmap.mask])  # biases, BatchNorm untouched
    assert set(res.reconstruction_error) == {t.name for t in qmap.targets} and res.fallback == {}
    n = 40 if method == "gptq" else 16
    assert res.calibration["n_samples"] == n and res.calibration["seed"] == (0 if method == "gptq" else 3)
    assert torch.equal(ptq(obj, 2, method=method), res.theta_q)  # deterministic


def test_reconstruction_error_is_the_relative_output_error_of_each_layer():
    g = torch.Generator().manual_seed(1)
    x = _correlated(30, 6, seed=2)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    obj = rs.Objective(model, "cross_entropy", (x, torch.randint(0, 3, (30,), generator=g)))
    for method in (GPTQ(calibration_samples=30), RTN(calibration_samples=30)):
        res = ptq_result(obj, 3, method=method)
        w1 = obj.unflatten(obj.theta0)["0.weight"]
        q1 = obj.unflatten(res.theta_q)["0.weight"]
        direct = _recon(x, w1, q1) / float(((x @ w1.T) ** 2).sum())
        assert res.reconstruction_error["0.weight"] == pytest.approx(direct, rel=1e-10)  # tr(D H D^T) vs ||X D^T||^2
        hidden = torch.tanh(x @ w1.T + obj.unflatten(obj.theta0)["0.bias"])  # layer 2 sees the FP layer 1
        w2, q2 = obj.unflatten(obj.theta0)["2.weight"], obj.unflatten(res.theta_q)["2.weight"]
        direct2 = _recon(hidden, w2, q2) / float(((hidden @ w2.T) ** 2).sum())
        assert res.reconstruction_error["2.weight"] == pytest.approx(direct2, rel=1e-10)
    assert ptq_result(obj, 3).reconstruction_error is None  # RTN stays data-free by default


def test_unsupported_layers_fall_back_to_rtn_and_are_reported():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3)).double()
    x = torch.randn(12, 2, 4, 4, dtype=F64)
    obj = rs.Objective(model, "cross_entropy", (x, torch.randint(0, 3, (12,))))
    res = ptq_result(obj, 3, method="gptq", quantize_bias=True)
    assert "groups=2" in res.fallback["0.weight"] and "bias" in res.fallback["2.bias"]
    rtn = ptq(obj, 3, quantize_bias=True)
    qmap = QuantMap(obj, UniformQuantizer(3), quantize_bias=True)
    for name in ("0.weight", "0.bias", "2.bias"):
        t = next(t for t in qmap.targets if t.name == name)
        assert torch.equal(qmap.tensor(res.theta_q, t), qmap.tensor(rtn, t))
    assert set(res.reconstruction_error) == {"2.weight"}


def test_conv_patches_give_the_exact_hessian():
    """H of a conv layer from unfold patches equals the Gram matrix of per-position inputs."""
    conv = nn.Conv1d(2, 3, 3, stride=2, padding=1, padding_mode="reflect").double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 4, 2)).double()
    x = torch.randn(5, 2, 8, dtype=F64)
    obj = rs.Objective(model, "cross_entropy", (x, torch.randint(0, 2, (5,))))
    calib = collect_input_hessians(obj, QuantMap(obj, UniformQuantizer(2)), obj.theta0)
    padded = torch.nn.functional.pad(x, (1, 1), mode="reflect")
    rows = torch.stack([padded[:, :, p : p + 3].reshape(5, -1) for p in range(0, 8, 2)], dim=1).reshape(-1, 6)
    assert torch.allclose(calib.hessians["0.weight"], rows.T @ rows, rtol=1e-12, atol=1e-12)
    # the conv output is exactly rows @ W^T + b: the patch layout matches weight.reshape(out, -1)
    out = conv(x).transpose(1, 2).reshape(-1, 3)
    assert torch.allclose(out, rows @ conv.weight.reshape(3, -1).T + conv.bias, rtol=0, atol=1e-12)
    assert calib.rows["0.weight"] == 20 and calib.n_samples == 5


def test_gptq_config_validates_its_fields():
    for bad, match in [
        (dict(percdamp=-0.1), "percdamp"), (dict(percdamp=float("nan")), "percdamp"), (dict(block_size=0), "block_size"),
        (dict(act_order=1), "act_order"), (dict(calibration_samples=0), "calibration_samples"),
        (dict(calibration_samples=None), "calibration_samples"), (dict(seed=-1), "seed"), (dict(block_size=2.0), "block_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            GPTQ(**bad)
    assert GPTQ().to_dict() == {"method": "gptq", "percdamp": 0.01, "block_size": 128, "act_order": False,
                                "calibration_samples": 128, "seed": 0}
    with pytest.raises(ValueError, match="calibration_samples"):
        RTN(calibration_samples=0)


def test_measure_ptq_runs_the_data_aware_methods_on_a_reference():
    from riverscape.pipeline import build_reference, measure_ptq
    from riverscape.quant.ptq import AdaRound

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(30, 1, 4, 4, generator=g, dtype=F64), torch.randint(0, 3, (30,), generator=g)
    ref, qmap = build_reference(tiny_cnn(), "cross_entropy", (x, y), (x, y), quantizer=UniformQuantizer(3))
    ref_qmap = ref.quant_map(UniformQuantizer(3))
    rtn = measure_ptq(ref, ref_qmap)
    for method in ("gptq", AdaRound(iterations=20)):
        measured = measure_ptq(ref, ref_qmap, method=method)
        assert torch.equal(measured.point, ptq(ref.analysis, ref_qmap, method=method))
        assert measured.metrics["train_loss"] == pytest.approx(ref.analysis.loss(measured.point), rel=1e-12)
        assert measured.finite and not torch.equal(measured.point, rtn.point)
        assert torch.equal(ref_qmap(measured.point, ref_qmap.qparams(ref.theta_fp)), measured.point)  # RTN's grid


def test_a_handler_returning_something_else_than_diagnostics_is_refused():
    from dataclasses import dataclass
    from typing import ClassVar

    from riverscape.quant.ptq import PTQ_CONFIGS, PTQ_METHODS, PTQConfig, register_ptq_method

    @dataclass(frozen=True)
    class _Bad(PTQConfig):
        method: ClassVar[str] = "toy_bad_diagnostics"

    def handler(config, objective, qmap, theta):
        qparams = qmap.qparams(theta)
        return qmap(theta, qparams), qparams, {"reconstruction_error": {}}

    register_ptq_method("toy_bad_diagnostics", _Bad, handler)
    try:
        obj = rs.Objective(tiny_mlp(), "cross_entropy", (torch.randn(4, 5, dtype=F64), torch.randint(0, 3, (4,))))
        with pytest.raises(TypeError, match="PTQDiagnostics"):
            ptq(obj, 2, method="toy_bad_diagnostics")
    finally:
        PTQ_METHODS.pop("toy_bad_diagnostics")
        PTQ_CONFIGS.pop("toy_bad_diagnostics")
