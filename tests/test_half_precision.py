"""Half-precision models evaluated in their own dtype, with float32 vectors and accumulation.

The reference is the same model (its bf16/fp16 weights are exact in float64) on the same
half-representable inputs, evaluated in float64. The errors are bounded in units of the half
dtype's unit roundoff ``u`` (bfloat16: 8-bit significand, ``u = 2^-8``; float16: 11 bits,
``u = 2^-11``); measured over five seeds of the model below (484 parameters, three batches):

========================  ===========  ===========
relative error            bfloat16     float16
========================  ===========  ===========
loss                      7e-5 (0.02u) 9e-6 (0.02u)
gradient                  4.5e-3 (1.2u) 6e-4 (1.2u)
HVP reuse/forward/reverse 5.3e-3 (1.4u) 6.4e-4 (1.3u)
top eigenvalue (forward)  3e-4 (0.08u) 8e-5 (0.2u)
HVP finite differences    3.4e-2       7.4e-3
top eigenvalue (f. d.)    5.7e-2       1.7e-2
========================  ===========  ===========

The loss is averaged over many logits cast up to float32 before the cross-entropy, so its error
stays far below ``u``; gradients and HVPs carry the rounding of every bf16 matmul of the backward
pass (a few ``u``). Finite differences are limited by the step: ``eps^(2/3)`` with ``eps = 2u``
(0.04 in bfloat16, 0.006 in float16).
"""
from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch
from torch import nn

import riverscape as rs
from riverscape import cli
from riverscape.batching import upcast
from riverscape.linalg import eigenpairs
from riverscape.precision import resolve_precision

HALF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff u = 2^-(significand bits)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches(dtype: torch.dtype, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(96, 8, generator=g).to(dtype), torch.randint(0, 4, (96,), generator=g)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("half", list(HALF), ids=["bfloat16", "float16"])
def test_half_model_runs_natively_with_float32_vectors_within_its_rounding(half):
    u = HALF[half]
    model = _model().to(half)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _batches(half)
    exact = rs.Objective(model, "cross_entropy", data, dtype=torch.float64)
    native = rs.Objective(model, "cross_entropy", data)
    assert (native.dtype, native.compute_dtype, native.mixed_precision) == (torch.float32, half, True)
    assert all(p.dtype == half for p in native.module.parameters())
    t64, t32 = exact.theta0, native.theta0
    assert t32.dtype == torch.float32 and torch.equal(t32.double(), t64)  # half values are exact in float32
    loss64 = exact.loss(t64)
    assert abs(native.loss(t32) - loss64) / loss64 < u
    g = native.grad(t32)
    assert g.dtype == torch.float32
    # below 4u, and above u/64: the backward really ran in half precision (float32 would be ~1e-7)
    assert u / 64 < _rel(g, exact.grad(t64)) < 4 * u
    v = torch.randn(exact.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hv = exact.hvp(t64, v)
    for mode in ("reuse", "forward", "reverse"):
        op = native.hessian(t32, mode=mode)
        assert op.torch_dtype == torch.float32
        assert u / 64 < _rel(op @ v.float(), hv) < 4 * u, mode
    fd_accuracy = (2 * u) ** (2 / 3)  # eps^(2/3) of the compute dtype, eps = 2u
    assert native.finite_difference_accuracy == pytest.approx(fd_accuracy)
    assert _rel(native.hessian(t32, mode="finite_difference") @ v.float(), hv) < 4 * fd_accuracy
    top64 = float(eigenpairs(exact.hessian(t64), 1, ncv=20)[0][0])
    top = float(eigenpairs(native.hessian(t32, mode="forward"), 1, ncv=20)[0][0])
    assert abs(top - top64) / abs(top64) < u
    assert all(torch.equal(v, before[k]) and v.dtype == half for k, v in model.state_dict().items())  # caller's model untouched


def test_the_model_runs_in_the_compute_dtype_and_the_loss_sees_float32_outputs():
    model = _model(1)
    seen: dict[str, set] = {"layer": set(), "loss": set()}
    # copied with the model into the Objective's private module (autograd differentiates each op in
    # its forward dtype, so a bf16 forward means a bf16 backward and double backward)
    model[2].register_forward_hook(lambda mod, inp, out: seen["layer"].add(inp[0].dtype))

    def loss(outputs, targets):
        seen["loss"].add(outputs.dtype)
        return nn.functional.cross_entropy(outputs, targets)

    # a float32 model simulated in bfloat16: the private copy is cast, the caller's model is not
    obj = rs.Objective(model, loss, _batches(torch.float32), compute_dtype=torch.bfloat16)
    assert (obj.dtype, obj.compute_dtype) == (torch.float32, torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32
    obj.value_and_grad(obj.theta0)
    obj.loss(obj.theta0)  # the single-point path: a plain forward of the private module
    obj.losses(obj.theta0 + torch.zeros(3, obj.dim))  # the vmapped path
    obj.hvp(obj.theta0, obj.theta0)
    assert seen == {"layer": {torch.bfloat16}, "loss": {torch.float32}}


def test_dtype_arguments_keep_the_old_meaning_and_refuse_what_makes_no_sense():
    model = _model().to(torch.bfloat16)
    data = _batches(torch.float32)
    upcast_model = rs.Objective(model, "cross_entropy", data, dtype=torch.float32)  # today's "analysed in float32"
    assert (upcast_model.dtype, upcast_model.compute_dtype, upcast_model.mixed_precision) == (torch.float32, torch.float32, False)
    assert all(p.dtype == torch.float32 for p in upcast_model.module.parameters())
    half_vectors = rs.Objective(model, "cross_entropy", data, dtype=torch.bfloat16)  # never half-precision vectors
    assert (half_vectors.dtype, half_vectors.compute_dtype) == (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="wider than the vector dtype"):
        rs.Objective(model, "cross_entropy", data, dtype=torch.float32, compute_dtype=torch.float64)
    with pytest.raises(TypeError, match="compute_dtype must be a real floating"):
        rs.Objective(model, "cross_entropy", data, compute_dtype=torch.int32)
    float64 = rs.Objective(_model(), "cross_entropy", data, dtype=torch.float64)
    assert (float64.dtype, float64.compute_dtype) == (torch.float64, torch.float64)


def test_upcast_casts_narrow_floating_tensors_and_keeps_containers():
    Pair = namedtuple("Pair", "logits ids")
    h = torch.ones(2, dtype=torch.bfloat16)
    wide, ids = torch.ones(2, dtype=torch.float64), torch.arange(2)
    out = upcast({"logits": h, "rest": [Pair(h, ids), (wide, None)]}, torch.float32)
    pair, (kept, none) = out["rest"]
    assert out["logits"].dtype == torch.float32 and isinstance(pair, Pair) and pair.logits.dtype == torch.float32
    assert pair.ids is ids and kept is wide and none is None


@pytest.mark.parametrize(
    "mode, stored, loaded, expected",
    [
        ("auto", "bfloat16", torch.float32, (torch.bfloat16, torch.float32, torch.float32, {})),
        ("native", "bfloat16", torch.float32, (torch.bfloat16, torch.bfloat16, torch.float32,
                                               {"dtype": torch.float32, "compute_dtype": torch.bfloat16})),
        ("native", "float16", torch.float16, (torch.float16, torch.float16, torch.float32,
                                              {"dtype": torch.float32, "compute_dtype": torch.float16})),
        ("auto", None, torch.float16, (torch.float16, torch.float32, torch.float32, {"dtype": torch.float32, "compute_dtype": torch.float32})),
        ("native", "bfloat16+float32", torch.float32, (torch.float32, torch.float32, torch.float32, {})),
        ("float64", "bfloat16", torch.float32, (torch.bfloat16, torch.float64, torch.float64,
                                                {"dtype": torch.float64, "compute_dtype": torch.float64})),
        ("auto", "float64", torch.float64, (torch.float64, torch.float64, torch.float64, {})),
    ],
)
def test_resolve_precision(mode, stored, loaded, expected):
    p = resolve_precision(_model().to(loaded), mode, stored)
    assert (p.model, p.compute, p.accumulate, p.objective_kwargs()) == expected
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision(_model(), "half")


def test_cli_dtype_native_runs_a_bf16_checkpoint_in_bf16_and_records_it(tmp_path):
    import zoo_models as zoo

    torch.manual_seed(0)
    model = zoo.deep_mlp(depth=3, width=8).to(torch.bfloat16)
    checkpoint = tmp_path / "mlp_bf16.pt"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "report"
    args = ["analyze", str(checkpoint), "--model", f"{zoo.__file__}:deep_mlp", "--model-kwargs", '{"depth": 3, "width": 8}',
            "--data", f"{zoo.__file__}:features", "--data-kwargs", '{"width": 8}', "--budget", "quick", "--bits", "4",
            "--max-samples", "32", "--skip", "density,layers,damage,alignment,qat,slices,paths", "--dtype", "native", "--out", str(out)]
    assert cli.main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["run"]["precision"] == {"mode": "native", "model": "bfloat16", "compute": "bfloat16", "accumulate": "float32"}
    assert m["run"]["device"] == "cpu" and m["run"]["options"]["dtype"] == "native"
    note = "checkpoint weights stored as bfloat16; analysed in bfloat16 (native) with float32 accumulation on cpu"
    assert note in m["notes"] and note in (out / "report.html").read_text()
    x, y = zoo.features(width=8)
    x, y = x[:32], y[:32]  # --max-samples caps the evaluation split too (no test split: it is the training data)
    with torch.no_grad():
        logits = model(x.to(torch.bfloat16))
        native_loss = float(nn.functional.cross_entropy(logits.float(), y))
        float32_loss = float(nn.functional.cross_entropy(model.float()(x), y))
    # the report's loss is the bf16 model's (bf16 logits, float32 cross-entropy) to float32 summation order,
    # and it differs from the float32 evaluation of the same weights by bf16 rounding
    assert m["fp"]["loss"] == pytest.approx(native_loss, abs=1e-5)
    assert abs(native_loss - float32_loss) > 1e-5


def test_every_tensor_follows_the_objective_device():
    """No GPU here: the meta device (shapes, no values) stands in for cuda/mps. A CPU tensor created on the
    way and mixed in would fail or come back on the CPU; values (finite differences, float losses) are not checked."""
    model = _model(2).to(torch.bfloat16)
    obj = rs.Objective(model, "cross_entropy", _batches(torch.float32), device="meta")
    assert obj.device == torch.device("meta") and obj.theta0.device == obj.device and next(model.parameters()).device.type == "cpu"
    assert all(p.device == obj.device and p.dtype == torch.bfloat16 for p in obj.module.parameters())
    theta, v = obj.theta0, torch.ones(obj.dim, device="meta")
    results = {
        "grad": obj.grad(theta),
        "hvp": obj.hvp(theta, v),
        "hvps": obj.hvps(theta, torch.ones(obj.dim, 2, device="meta")),
        "losses": obj.losses(torch.stack([theta, theta])),
        **{mode: obj.hessian(theta, mode=mode) @ v for mode in ("reuse", "forward", "reverse")},
    }
    assert {k: (r.device.type, r.dtype) for k, r in results.items()} == {k: ("meta", torch.float32) for k in results}
