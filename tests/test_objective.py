"""Objective: values, gradients and HVPs against plain autograd in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian as autograd_hessian

import riverscape as rs
from riverscape.objective import cross_entropy, mse

from helpers import assert_close, tiny_cnn, tiny_mlp


def reference_loss(model: nn.Module, names, loss_fn, x, y):
    """Flat loss via a plain (mutating-free) functional_call, for autograd oracles."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def f(theta):
        chunks = torch.split(theta, sizes)
        new = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return loss_fn(torch.func.functional_call(model, new, (x,)), y)

    return f


CASES = [
    ("mlp-ce", lambda: tiny_mlp(0), cross_entropy, "classification"),
    ("mlp-nobias-ce", lambda: tiny_mlp(1, bias=False), cross_entropy, "classification"),
    ("mlp-mse", lambda: tiny_mlp(2), lambda o, y: mse(o, torch.nn.functional.one_hot(y, 3).double()), "classification"),
    ("cnn-bn-ce", lambda: tiny_cnn(0), cross_entropy, "image"),
]


def _data(kind, classification_data, image_data):
    return classification_data if kind == "classification" else image_data


@pytest.mark.parametrize("name,factory,loss_fn,kind", CASES, ids=[c[0] for c in CASES])
def test_loss_grad_hvp_match_autograd(name, factory, loss_fn, kind, classification_data, image_data):
    x, y = _data(kind, classification_data, image_data)
    model = factory()
    model.eval()
    obj = rs.Objective(model, loss_fn, (x, y), batch_size=4)  # 3 unequal batches for 10/23 samples
    names = obj.param_names
    f = reference_loss(model, names, loss_fn, x, y)
    theta = obj.theta0 + 0.1 * torch.randn(obj.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    # float64 throughout: 1e-12 leaves room for summation-order differences across batches
    assert abs(obj.loss(theta) - float(f(theta))) <= 1e-12 * max(1.0, abs(float(f(theta))))
    g_ref = torch.func.grad(f)(theta)
    assert_close(obj.grad(theta), g_ref, rtol=1e-10, atol=1e-13, what="grad")
    h_ref = autograd_hessian(f, theta)
    v = torch.randn(obj.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # the issue asks for 1e-8 relative; observed ~1e-15
    assert_close(obj.hvp(theta, v), h_ref @ v, rtol=1e-8, atol=1e-12, what="hvp forward-over-reverse")
    V = torch.randn(obj.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert_close(obj.hvps(theta, V), h_ref @ V, rtol=1e-8, atol=1e-12, what="hvps")
    assert_close(obj.dense_hessian(theta), h_ref, rtol=1e-8, atol=1e-12, what="dense hessian")
    for mode in ("reuse", "forward", "reverse"):
        op = obj.hessian(theta, mode=mode)
        out = op.matvec(v.numpy())
        assert_close(torch.from_numpy(out), h_ref @ v, rtol=1e-8, atol=1e-12, what=f"operator {mode}")
        assert op.matvecs == 1


def test_batch_split_does_not_change_results(classification_data):
    x, y = classification_data
    model = tiny_mlp(0)
    objs = [rs.Objective(model, "cross_entropy", (x, y), batch_size=b) for b in (None, 3, 7)]
    theta = objs[0].theta0
    v = torch.ones(objs[0].dim, dtype=torch.float64)
    ref_l, ref_g, ref_h = objs[0].loss(theta), objs[0].grad(theta), objs[0].hvp(theta, v)
    for obj in objs[1:]:
        assert abs(obj.loss(theta) - ref_l) < 1e-13
        assert_close(obj.grad(theta), ref_g, rtol=1e-11, atol=1e-14, what="grad across splits")
        assert_close(obj.hvp(theta, v), ref_h, rtol=1e-11, atol=1e-14, what="hvp across splits")


def test_iterable_of_batches_and_max_batches(classification_data):
    x, y = classification_data
    model = tiny_mlp(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    full = rs.Objective(model, "cross_entropy", loader)
    assert full.n_samples == 23 and full.batch_sizes == [5, 5, 5, 5, 3]
    assert abs(full.loss(full.theta0) - rs.Objective(model, "cross_entropy", (x, y)).loss(full.theta0)) < 1e-13
    sub = rs.Objective(model, "cross_entropy", loader, max_batches=2)
    assert sub.n_samples == 10
    assert abs(sub.loss(sub.theta0) - rs.Objective(model, "cross_entropy", (x[:10], y[:10])).loss(sub.theta0)) < 1e-13


def test_batched_losses_equal_looped(image_data):
    x, y = image_data
    obj = rs.Objective(tiny_cnn(0), "cross_entropy", (x, y), batch_size=4)
    g = torch.Generator().manual_seed(0)
    thetas = obj.theta0 + 0.3 * torch.randn(9, obj.dim, dtype=torch.float64, generator=g)
    batched, metrics = obj.evaluate(thetas, chunk_size=4)
    looped = torch.tensor([obj.loss(t) for t in thetas], dtype=torch.float64)
    assert_close(batched, looped, rtol=1e-12, atol=1e-14, what="batched vs looped")
    assert_close(metrics, torch.tensor([obj.metric(t) for t in thetas], dtype=torch.float64), rtol=0, atol=1e-12, what="metric")
    # chunk size 1 takes the plain-forward path (no vmap): same numbers, also with 9 % 4 != 0 chunks
    single, single_metrics = obj.evaluate(thetas, chunk_size=1)
    assert_close(single, looped, rtol=1e-12, atol=1e-14, what="chunk size 1 vs looped")
    assert_close(single_metrics, metrics, rtol=0, atol=1e-12, what="chunk size 1 metric")


def test_parameter_selection_names_globs_predicate(classification_data):
    model = tiny_mlp(0)
    by_glob = rs.Objective(model, "cross_entropy", classification_data, params="*.weight")
    assert by_glob.param_names == ["0.weight", "2.weight"] and by_glob.dim == 5 * 4 + 4 * 3
    by_name = rs.Objective(model, "cross_entropy", classification_data, params=["2.bias"])
    assert by_name.dim == 3
    by_pred = rs.Objective(model, "cross_entropy", classification_data, params=lambda n, p: p.ndim == 1)
    assert by_pred.param_names == ["0.bias", "2.bias"]
    with pytest.raises(ValueError, match="matches no parameter"):
        rs.Objective(model, "cross_entropy", classification_data, params=["nope.*"])
    # the subset Hessian is the corresponding block of the full one
    full = rs.Objective(model, "cross_entropy", classification_data)
    h_full = full.dense_hessian(full.theta0)
    idx = torch.cat([torch.arange(0, 20), torch.arange(24, 36)])
    assert_close(by_glob.dense_hessian(by_glob.theta0), h_full[idx][:, idx], rtol=1e-10, atol=1e-13, what="block")


def test_model_state_is_bit_identical_after_calls_and_errors(image_data):
    model = tiny_cnn(0)
    model.train()  # the Objective must not flip the user's mode either
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obj = rs.Objective(model, "cross_entropy", image_data)
    theta = obj.theta0 + 1.0
    obj.loss(theta), obj.grad(theta), obj.hvp(theta, theta), obj.losses(torch.stack([theta, theta]))
    obj.hessian(theta).matvec(np.ones(obj.dim))
    with pytest.raises(ValueError):
        obj.loss(torch.zeros(obj.dim + 1, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        bad = rs.Objective(model, "cross_entropy", (image_data[0][:, :, :2, :2], image_data[1]))
        bad.loss(bad.theta0)
    after = model.state_dict()
    assert model.training
    for k in before:
        assert torch.equal(before[k], after[k]), k
    for p in model.parameters():
        assert p.grad is None


def test_eval_mode_uses_running_stats(image_data):
    model = tiny_cnn(0)
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
    obj = rs.Objective(model, "cross_entropy", image_data)
    model.eval()
    with torch.no_grad():
        expected = float(cross_entropy(model(image_data[0]), image_data[1]))
    assert abs(obj.loss(obj.theta0) - expected) < 1e-13


def test_float32_and_dtype_override(classification_data):
    x, y = classification_data
    model32 = tiny_mlp(0).float()
    obj32 = rs.Objective(model32, "cross_entropy", (x.float(), y))
    obj64 = rs.Objective(model32, "cross_entropy", (x, y), dtype=torch.float64)
    assert obj32.theta0.dtype == torch.float32 and obj64.theta0.dtype == torch.float64
    v = torch.randn(obj64.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # float32 smoke: relative 1e-4 (single precision, a few accumulations)
    assert_close(obj32.hvp(obj32.theta0, v.float()), obj64.hvp(obj64.theta0, v), rtol=1e-4, atol=1e-5, what="f32")


def test_metric_is_accuracy_and_none_for_regression(classification_data):
    x, y = classification_data
    model = tiny_mlp(0)
    obj = rs.Objective(model, "cross_entropy", (x, y))
    expected = float((model(x).argmax(1) == y).double().mean())
    assert obj.metric(obj.theta0) == pytest.approx(expected, abs=1e-12)
    reg = rs.Objective(nn.Linear(5, 1).double(), "mse", (x, torch.randn(23, dtype=torch.float64)))
    assert reg.metric(reg.theta0) is None and not reg.has_metric


def test_bad_arguments_raise_clear_errors(classification_data):
    with pytest.raises(ValueError, match="unknown loss"):
        rs.Objective(tiny_mlp(0), "hinge", classification_data)
    with pytest.raises(ValueError, match="hvp_mode"):
        rs.Objective(tiny_mlp(0), "cross_entropy", classification_data, hvp_mode="fast")
    with pytest.raises(ValueError, match="disagree"):
        rs.Objective(tiny_mlp(0), "cross_entropy", (classification_data[0][:5], classification_data[1]))
    with pytest.raises(TypeError):
        rs.Objective(tiny_mlp(0), "cross_entropy", 3)


def test_parameter_views_come_from_one_split(classification_data):
    """The parameter views are outputs of one ``split`` of theta, not one slice each.

    With a slice per tensor, the backward of every gradient scatters each tensor's gradient
    into its own zero-filled D-vector and adds those up, O(tensors x D) work (it was 60 % of a
    gradient at 1e7 parameters); one split concatenates them once.
    """
    x, y = classification_data
    obj = rs.Objective(tiny_mlp(), "cross_entropy", (x, y))
    theta = obj.theta0.clone().requires_grad_()
    views = obj.unflatten(theta)
    assert len(views) >= 4
    sources = {view.grad_fn.next_functions[0][0] for view in views.values()}
    assert len(sources) == 1
    assert "Split" in type(next(iter(sources))).__name__
    grad = torch.autograd.grad(sum(v.sum() for v in views.values()), theta)[0]
    assert torch.equal(grad, torch.ones_like(theta))


class _RecordingTwice:
    """A reduction over two identical "processes" (each share counted twice) that records its messages' dtypes."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def sum(self, tensor):
        self.dtypes.append(tensor.dtype)
        return tensor.mul_(2)

    def agree(self, value):
        return value


def test_data_parallel_float32_loss_is_summed_in_float64(classification_data):
    """A float32 Objective accumulates its loss in float64; a data-parallel one must too.

    Sent inside the float32 gradient message, the loss was rounded to ~1e-7 relative, and the
    valley-floor line search on it took twice the evaluations of one process.
    """
    x, y = classification_data
    plain = rs.Objective(tiny_mlp().float(), "cross_entropy", (x.float(), y), batch_size=7)
    shared = rs.Objective(tiny_mlp().float(), "cross_entropy", (x.float(), y), batch_size=7)
    shared.reduction = _RecordingTwice()
    theta = plain.theta0
    value, grad = plain.value_and_grad(theta)
    shared_value, shared_grad = shared.value_and_grad(theta)
    assert shared_value == 2 * value  # exact: doubling a float64 is exact
    assert torch.equal(shared_grad, 2 * grad)
    assert shared.reduction.dtypes == [torch.float32, torch.float64]
