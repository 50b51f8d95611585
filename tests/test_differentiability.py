"""Twice-differentiability check: Hardsigmoid/Hardswish and SDPA attention, finite-difference fallback."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_close, tiny_mlp
from riverscape.differentiability import ensure_twice_differentiable, is_missing_double_backward
from riverscape.errors import InputError
from riverscape.landscape import hessian_eigs
from riverscape.objective import Objective

# Exact HVPs of two float64 models that compute the same function differ only by rounding in
# the order of operations: relative 1e-10 leaves a 1e6 margin over float64's 2.2e-16 per op.
EXACT_RTOL = 1e-10
# Finite-difference HVPs are accurate to C * eps^(2/3) (Objective.finite_difference_accuracy);
# on these models C measures 1 to 1.5 (float64 and float32), so 20 is a comfortable bound.
FD_FACTOR = 20.0


# ------------------------------------------------------------------------------------- models
class ReferenceHardsigmoid(nn.Module):
    """relu6(x + 3) / 6: the same function from ops with a double backward (not riverscape's clamp form)."""

    def forward(self, x):
        return F.relu6(x + 3.0) / 6.0


class ReferenceHardswish(nn.Module):
    def forward(self, x):
        return x * F.relu6(x + 3.0) / 6.0


def hard_mlp(reference: bool = False) -> nn.Module:
    """MobileNetV3-style activations; ``reference=True`` swaps in the twice-differentiable twins (same weights)."""
    torch.manual_seed(0)
    swish, sigmoid = (ReferenceHardswish, ReferenceHardsigmoid) if reference else (nn.Hardswish, nn.Hardsigmoid)
    return nn.Sequential(
        nn.Linear(5, 6), swish(), nn.Linear(6, 6), sigmoid(), nn.Linear(6, 6), swish(), nn.Linear(6, 3)
    ).double()


class Attention(nn.Module):
    """One multi-head self-attention block calling F.scaled_dot_product_attention (4-D q, k, v: the fused CPU kernel)."""

    def __init__(self, reference: bool = False, heads: int = 2, dim: int = 4):
        super().__init__()
        torch.manual_seed(1)
        self.heads, self.dim, self.reference = heads, dim, reference
        self.qkv = nn.Linear(6, 3 * heads * dim)
        self.out = nn.Linear(heads * dim, 3)

    def forward(self, x):  # x: (N, T, 6)
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.reference:
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dim), dim=-1) @ v
        else:
            att = F.scaled_dot_product_attention(q, k, v)
        return self.out(att.transpose(1, 2).reshape(n, t, -1).mean(1))


def attention(reference: bool = False) -> nn.Module:
    return Attention(reference).double()


class FunctionalHardsigmoid(nn.Module):
    """Calls F.hardsigmoid inside forward: no submodule to replace, so only finite differences help."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(F.hardsigmoid(self.a(x)))


class NoGradient(torch.autograd.Function):
    """An op whose (first) derivative is missing: neither exact nor finite-difference HVPs exist."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("derivative for aten::made_up is not implemented")


class Undifferentiable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)

    def forward(self, x):
        return NoGradient.apply(self.a(x))


def data(shape, n: int = 24, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def direction(dim: int, dtype=torch.float64):
    return torch.randn(dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)


def snapshot(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()], model.training)


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, types, training = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value) and after[key].dtype == value.dtype, key
    assert [type(m) for m in model.modules()] == types
    assert model.training == training


# ------------------------------------------------------------------------------------- tests
def test_missing_double_backward_errors_are_recognised():
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(F.hardsigmoid(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError) as info:
        torch.autograd.grad(g.sum(), x)
    assert is_missing_double_backward(info.value)
    assert not is_missing_double_backward(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.parametrize(
    "make, shape, expected",
    [
        (hard_mlp, (5,), "Hardsigmoid module by a twice-differentiable form"),
        (attention, (4, 6), "attention runs on the math SDPA backend"),
    ],
    ids=["hardswish-hardsigmoid", "sdpa"],
)
def test_repaired_hvps_equal_the_exact_hvps_of_the_primitive_model(make, shape, expected):
    model, reference = make(), make(reference=True)
    reference.load_state_dict(model.state_dict())
    x, y = data(shape)
    before = snapshot(model)
    obj = Objective(model, "cross_entropy", (x, y))
    with pytest.raises(RuntimeError, match="derivative|forward AD"):  # the raw PyTorch failure this module exists for
        obj.hvp(obj.theta0, direction(obj.dim))
    notes = ensure_twice_differentiable(obj)
    assert any(expected in note for note in notes), notes  # (Hardswish too, in a torch whose hardswish lacks one)
    assert obj.hvp_mode != "finite_difference"  # an exact repair, not the fallback
    assert ensure_twice_differentiable(obj) == []  # the repaired copy passes the check as is

    ref = Objective(reference, "cross_entropy", (x, y))
    v = direction(obj.dim)
    assert_close(obj.hvp(obj.theta0, v), ref.hvp(ref.theta0, v), rtol=EXACT_RTOL, atol=1e-14, what="hvp")
    block = torch.stack([v, v.flip(0)], dim=1)
    assert_close(obj.hvps(obj.theta0, block), ref.hvps(ref.theta0, block), rtol=EXACT_RTOL, atol=1e-14, what="hvps (vmap)")
    # hessian_eigs runs on a HessianOperator in graph-reuse mode (reverse-over-reverse)
    values, _ = hessian_eigs(obj, obj.theta0, 3)
    dense = torch.linalg.eigvalsh(ref.dense_hessian(ref.theta0)).flip(0)[:3]
    assert_close(values, dense, rtol=1e-8, atol=1e-12, what="top eigenvalues")  # ARPACK to machine precision, 1e-8 margin
    assert obj.loss(obj.theta0) == pytest.approx(ref.loss(ref.theta0), rel=1e-12)
    assert_unchanged(model, before)
    assert any(isinstance(m, nn.Hardsigmoid) for m in model.modules()) == (make is hard_mlp)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_finite_difference_hvp_matches_the_exact_hvp_to_its_stated_accuracy(dtype):
    x, y = data((5,), n=64)
    obj = Objective(tiny_mlp(0), "cross_entropy", (x, y), dtype=dtype)
    v = direction(obj.dim, dtype)
    exact = Objective(tiny_mlp(0), "cross_entropy", (x, y)).hvp(obj.theta0.double(), v.double())  # float64 truth
    fd = obj.finite_difference_hvp(obj.theta0, v).double()
    error = float((fd - exact).norm() / exact.norm())
    assert error < FD_FACTOR * obj.finite_difference_accuracy, (error, obj.finite_difference_accuracy)
    # the setting is owned by the Objective: every HVP path follows it
    obj.use_finite_difference()
    assert obj.hvp_mode == "finite_difference" and obj.hessian(obj.theta0).mode == "finite_difference"
    assert torch.equal(obj.hvp(obj.theta0, v), obj.finite_difference_hvp(obj.theta0, v))
    op = obj.hessian(obj.theta0, mode="reuse")  # an explicit mode cannot bring back the failing exact path
    assert np.allclose(op @ v.double().numpy(), fd.numpy(), rtol=0, atol=1e-12 * float(fd.abs().max()) if dtype == torch.float64 else 1e-6)


def test_fallback_to_finite_differences_when_nothing_can_be_replaced():
    model, x_y = FunctionalHardsigmoid(), data((5,))
    before = snapshot(model)
    obj = Objective(model, "cross_entropy", x_y)
    notes = ensure_twice_differentiable(obj)
    assert obj.hvp_mode == "finite_difference"
    assert len(notes) == 1 and notes[0].startswith("HVPs by finite differences") and "accuracy ~" in notes[0], notes

    class Reference(FunctionalHardsigmoid):
        def forward(self, x):
            return self.b(F.relu6(self.a(x) + 3.0) / 6.0)

    ref = Reference()
    ref.load_state_dict(model.state_dict())
    ref_obj = Objective(ref.double(), "cross_entropy", (x_y[0], x_y[1]))
    v = direction(obj.dim, obj.dtype)
    exact = ref_obj.hvp(ref_obj.theta0, v.double())
    error = float((obj.hvp(obj.theta0, v).double() - exact).norm() / exact.norm())
    assert error < FD_FACTOR * obj.finite_difference_accuracy
    values, _ = hessian_eigs(obj, obj.theta0, 2)
    assert np.all(np.isfinite(values.numpy()))
    assert_unchanged(model, before)


def test_clear_errors_instead_of_tracebacks():
    obj = Objective(FunctionalHardsigmoid(), "cross_entropy", data((5,)))
    with pytest.raises(InputError, match="need a double backward") as info:
        ensure_twice_differentiable(obj, finite_difference=False)
    assert "\n" not in str(info.value)
    obj = Objective(Undifferentiable().double(), "cross_entropy", data((5,)))
    with pytest.raises(InputError, match="cannot be differentiated") as info:
        ensure_twice_differentiable(obj)
    assert "\n" not in str(info.value)


def test_a_twice_differentiable_model_is_left_alone():
    obj = Objective(tiny_mlp(0), "cross_entropy", data((5,)))
    assert ensure_twice_differentiable(obj) == []
    assert obj.hvp_mode == "auto"


@pytest.mark.parametrize("make, shape, said", [(hard_mlp, (5,), "Hardsigmoid"), (attention, (5, 6), "SDPA")])
def test_analysis_reports_the_repair(tmp_path, make, shape, said):
    """The whole analysis (PTQ, spectra, slices, QAT) runs end to end on both kinds of model."""
    from riverscape.analysis import run_analysis
    from riverscape.analysis_options import AnalyzeOptions

    model = make().float()
    x, y = data(shape, n=64)
    x = x.float()
    before = snapshot(model)
    options = AnalyzeOptions(bits=(2,), top_k=2, grid_steps=3, qat_steps=5, max_samples=64)
    result = run_analysis(model, "cross_entropy", (x, y), (x, y), options, progress=False)
    notes = result.metrics()["notes"]
    assert any(said in note for note in notes), notes
    assert all(math.isfinite(v) for v in result.hessian_fp["top_eigenvalues"])
    assert_unchanged(model, before)


class SquareWithoutJvp(torch.autograd.Function):
    """x**2 with a (differentiable) backward but no jvp: forward-over-reverse fails, reverse-over-reverse works."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2.0 * x * g


def test_an_op_without_forward_mode_derivative_switches_to_reverse_over_reverse():
    class Net(nn.Module):
        def __init__(self, custom: bool):
            super().__init__()
            torch.manual_seed(5)
            self.a, self.b, self.custom = nn.Linear(5, 4), nn.Linear(4, 3), custom

        def forward(self, x):
            h = self.a(x)
            return self.b(SquareWithoutJvp.apply(h) if self.custom else h * h)

    model, reference = Net(True).double(), Net(False).double()
    x_y = data((5,))
    obj, ref = Objective(model, "cross_entropy", x_y), Objective(reference, "cross_entropy", x_y)
    assert ensure_twice_differentiable(obj) == ["HVPs by reverse-over-reverse differentiation: an op has no forward-mode derivative"]
    v = direction(obj.dim)
    assert_close(obj.hvp(obj.theta0, v), ref.hvp(ref.theta0, v), rtol=EXACT_RTOL, atol=1e-14, what="reverse-over-reverse hvp")
