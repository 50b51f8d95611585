"""QAT on flat vectors: exact one-step updates, scale modes, curricula, flips, hitting time, digits."""
from __future__ import annotations

import doctest
import math

import pytest
import torch

import riverscape as rs
from riverscape.quant import EWGS, LSQ, PEGE, QParams, QuantMap, UniformQuantizer, ptq
from riverscape.quant.estimators import lsq, lsq_grad_scale, pege_rho
import importlib

qat_module = importlib.import_module("riverscape.quant.qat")  # the package re-exports the function `qat` under that name
from riverscape.quant.qat import _MiniBatches, count_grid_flips, ewgs_deltas, first_hitting_time, qat
from riverscape.landscape import hessian_trace

from helpers import assert_close, tiny_mlp


@pytest.fixture
def tiny_objective(classification_data):
    return rs.Objective(tiny_mlp(), "cross_entropy", classification_data)


def _layers(objective, theta):
    return objective.unflatten(theta)


def test_one_sgd_step_matches_a_hand_built_autograd_step(tiny_objective, classification_data):
    """STE with frozen scales: theta_1 = theta_0 - lr * dL(Q(theta))/dQ (identity surrogate)."""
    obj, q = tiny_objective, UniformQuantizer(2)
    res = qat(obj, q, estimator="ste", steps=1, lr=0.1, optimizer="sgd", momentum=0.0, record_every=1, progress=False)
    qmap = QuantMap(obj, q)
    theta_q = qmap(obj.theta0)
    expected = obj.theta0 - 0.1 * obj.grad(theta_q)  # STE gradient = gradient at the quantized point
    assert_close(res.theta, expected, rtol=1e-13, atol=1e-15, what="one STE step")
    assert torch.equal(res.quantized_trajectory[0], theta_q)
    assert res.trajectory_steps == [0, 1]


def test_one_lsq_step_updates_weights_and_steps_by_the_lsq_gradient(tiny_objective, classification_data):
    obj, q = tiny_objective, UniformQuantizer(3)
    res = qat(obj, q, estimator="lsq", steps=1, lr=0.05, optimizer="sgd", momentum=0.0, progress=False)
    assert res.scale_mode == "learned"
    # independent oracle: plain autograd through the model's own modules, no QuantMap
    model = tiny_mlp()
    x, y = classification_data
    calibrated = QuantMap(obj, q).qparams(obj.theta0)
    scales = [qp.scale.clone().requires_grad_(True) for qp in calibrated]
    weights = [model[0].weight, model[2].weight]
    quantized = [
        lsq(w, QParams(s, qp.zero_point, -3, 3), grad_scale=lsq_grad_scale(w.shape[1], 3))
        for w, s, qp in zip(weights, scales, calibrated)
    ]
    h = torch.tanh(torch.nn.functional.linear(x, quantized[0], model[0].bias))
    loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, quantized[1], model[2].bias), y)
    loss.backward()
    for name, s, qp in zip(["0.weight", "2.weight"], scales, calibrated):
        assert_close(res.scales[name], qp.scale - 0.05 * s.grad, rtol=1e-12, what=f"LSQ step of {name}")
    expected = {
        "0.weight": model[0].weight - 0.05 * model[0].weight.grad,
        "2.weight": model[2].weight - 0.05 * model[2].weight.grad,
        "0.bias": model[0].bias - 0.05 * model[0].bias.grad,
    }
    got = _layers(obj, res.theta)
    for name, value in expected.items():
        assert_close(got[name], value.detach(), rtol=1e-12, atol=1e-15, what=f"LSQ latent {name}")
    assert torch.equal(res.theta_q, QuantMap(obj, q)(res.theta, res.qparams))


def test_frozen_scale_keeps_every_iterate_on_the_initial_grid(tiny_objective):
    obj, q = tiny_objective, UniformQuantizer(2)
    res = qat(obj, q, estimator="ste", steps=40, lr=0.05, record_every=1, progress=False)
    qmap = QuantMap(obj, q)
    initial = qmap.qparams(obj.theta0)
    for row in res.quantized_trajectory:
        for target, qp in zip(qmap.targets, initial):
            values = qmap.tensor(row, target)
            codes = torch.round(values / qp.scale)
            assert torch.equal(qp.scale * codes, values)  # exactly a grid point of the initial grid
            assert codes.abs().max() <= 1
    bias = obj.layout[1].slice  # "0.bias": trained in full precision, not quantized
    assert not torch.equal(res.theta[bias], obj.theta0[bias])
    assert torch.equal(res.theta_q[bias], res.theta[bias])
    assert all(torch.equal(res.scales[t.name], qp.scale) for t, qp in zip(qmap.targets, initial))


def test_recomputed_scale_is_chosen_from_each_latent_iterate(tiny_objective):
    obj, q = tiny_objective, UniformQuantizer(2, range="mse")
    res = qat(obj, q, estimator="clipped_ste", scale="recomputed", steps=15, lr=0.05, record_every=1, progress=False)
    qmap = QuantMap(obj, q)
    for latent, quantized in zip(res.latent_trajectory, res.quantized_trajectory):
        assert torch.equal(quantized, qmap(latent))  # Q with qparams re-chosen at that latent point
    final = qmap.qparams(res.theta)
    assert all(torch.equal(res.scales[t.name], qp.scale) for t, qp in zip(qmap.targets, final))
    assert not torch.equal(res.scales["0.weight"], qmap.qparams(obj.theta0)[0].scale)


def test_learned_scale_with_lsq_init(tiny_objective):
    obj, q = tiny_objective, UniformQuantizer(2)
    res = qat(obj, q, estimator=LSQ(init="lsq"), steps=1, lr=1e-12, progress=False)
    w = _layers(obj, obj.theta0)["0.weight"]
    s0 = 2 * w.abs().mean(dim=1, keepdim=True) / math.sqrt(1)  # 2 mean|w| / sqrt(Q_P), Q_P = 1 at 2 bits
    assert_close(res.scales["0.weight"], s0, rtol=1e-9, what="LSQ initial step")  # one step of lr 1e-12
    assert_close(res.quantized_trajectory[0][: 20].view(4, 5), s0 * torch.clamp(torch.round(w / s0), -1, 1), rtol=0, what="Q at init")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"estimator": "lsq", "scale": "frozen"}, "learned"),
        ({"estimator": "ste", "scale": "learned"}, "lsq"),
        ({"estimator": "dsq"}, "clipped_ste"),
        ({"scale": "ema"}, "recomputed"),
        ({"optimizer": "lbfgs"}, "adam"),
        ({"steps": 0}, "steps"),
        ({"estimator": lambda: LSQ(init="zero")}, "calibrated"),
        ({"estimator": lambda: PEGE(beta=1.0)}, "beta"),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny_objective, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kwargs = {k: v() if callable(v) else v for k, v in kwargs.items()}  # bad configs raise when built
        qat(tiny_objective, UniformQuantizer(2), progress=False, **kwargs)


def test_lsq_rejects_asymmetric_quantizer(tiny_objective):
    with pytest.raises(ValueError, match="symmetric"):
        qat(tiny_objective, UniformQuantizer(2, symmetric=False), estimator="lsq", progress=False)


def test_pege_replaced_fraction_follows_the_curriculum(tiny_objective):
    res = qat(tiny_objective, UniformQuantizer(2), estimator=PEGE(beta=10.0), steps=10, lr=0.01, record_every=1, progress=False)
    fractions = dict(zip(res.history["step"], res.history["replaced_fraction"]))
    # targets have 20 and 12 weights; per target k = floor(rho n + 1/2), rho(t) = log10(1 + 9 t / 10)
    assert pege_rho(1, 10) == pytest.approx(math.log10(1.9))  # 0.27875: k = 6 and 3
    assert pege_rho(5, 10) == pytest.approx(math.log10(5.5))  # 0.74036: k = 15 and 9
    assert fractions[0] == 0.0
    assert fractions[1] == 9 / 32
    assert fractions[5] == 24 / 32
    assert fractions[10] == 1.0


def test_grid_flips_and_hitting_time_helpers():
    assert count_grid_flips(torch.tensor([0, 1, -1, 1]), torch.tensor([0, 1, -1, 1])) == 0
    assert count_grid_flips(torch.tensor([0, 1, -1, 1]), torch.tensor([1, 1, 1, 0])) == 3
    with pytest.raises(ValueError):
        count_grid_flips(torch.zeros(3), torch.zeros(4))
    steps, losses = [0, 5, 10, 15, 20], [3.0, 1.2, 0.149, 0.09, 0.3]
    assert first_hitting_time(steps, losses, 0.1 + 0.05) == 10  # 0.149 <= 0.15: first entry
    assert first_hitting_time(steps, losses, 0.1) == 15
    assert first_hitting_time(steps, losses, 0.01) is None
    assert first_hitting_time(steps, losses, 3.0) == 0


def test_flips_and_hit_step_in_a_run_agree_with_the_trajectory(tiny_objective):
    obj, q = tiny_objective, UniformQuantizer(2)
    res = qat(obj, q, estimator="ste", steps=30, lr=0.05, record_every=1, tau=0.5, progress=False)
    qmap = QuantMap(obj, q)
    scales = qmap.qparams(obj.theta0)
    codes = [torch.cat([torch.round(qmap.tensor(row, t) / qp.scale).reshape(-1) for t, qp in zip(qmap.targets, scales)]) for row in res.quantized_trajectory]
    expected = [0] + [int((a != b).sum()) for a, b in zip(codes[:-1], codes[1:])]
    assert res.grid_flips == expected
    assert res.history["grid_flips"] == expected
    assert sum(expected) > 0
    losses = obj.losses(res.quantized_trajectory)
    assert_close(torch.tensor(res.history["loss"], dtype=torch.float64), losses, rtol=1e-12, what="recorded L(Q(theta_t))")
    threshold = obj.loss(obj.theta0) + 0.5
    hits = [t for t, value in zip(res.trajectory_steps, losses.tolist()) if value <= threshold]
    assert res.hit_step == (hits[0] if hits else None)
    best = int(torch.argmin(losses))
    assert res.best_step == best and torch.equal(res.best_theta_q, res.quantized_trajectory[best])
    errors = (res.latent_trajectory - res.quantized_trajectory).norm(dim=1)
    assert_close(torch.tensor(res.history["discretization_error"], dtype=torch.float64), errors, rtol=1e-12, what="||theta - Q(theta)||")
    d = res.to_dict()
    assert d["estimator"] == "ste" and d["history"]["step"] == list(range(31))


def test_minibatches_are_seeded(tiny_objective):
    runs = [qat(tiny_objective, UniformQuantizer(2), batch_size=7, steps=12, lr=0.05, seed=s, progress=False) for s in (1, 1, 2)]
    assert torch.equal(runs[0].latent_trajectory, runs[1].latent_trajectory)
    assert not torch.equal(runs[0].theta, runs[2].theta)


def test_ewgs_deltas_follow_the_formula_and_the_dense_block_trace(tiny_objective):
    obj = tiny_objective
    qmap = QuantMap(obj, UniformQuantizer(2))
    theta_q = qmap(obj.theta0)
    deltas = ewgs_deltas(obj, qmap, theta_q, matvecs=40, seed=5)
    g = obj.grad(theta_q)
    dense = obj.dense_hessian(theta_q)
    for i, target in enumerate(qmap.targets):
        s = target.spec.slice
        trace = hessian_trace(obj, theta_q, matvecs=40, method="hutchinson", block=target.name, seed=5 + i)
        expected = max(0.0, trace.value / target.spec.numel / (3 * float(g[s].std())))
        assert deltas[target.name] == pytest.approx(expected, rel=1e-12)  # same probes, same formula
        exact = float(torch.diagonal(dense[s, s]).sum())
        # Hutchinson with 40 probes: within 5 standard errors of the dense block trace
        assert abs(trace.value - exact) <= 5 * trace.stderr + 1e-12


def test_ewgs_run_logs_delta_updates(tiny_objective):
    res = qat(tiny_objective, UniformQuantizer(2), estimator=EWGS(update_every=4, matvecs=6), steps=10, progress=False)
    assert [entry["step"] for entry in res.ewgs_deltas] == [0, 4, 8]
    assert all(v >= 0 for entry in res.ewgs_deltas for v in entry["delta"].values())


def test_user_model_is_bit_identical_after_qat(trained_digits_mlp, digits_data):
    model = trained_digits_mlp.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = model.training
    obj = rs.Objective(model, "cross_entropy", digits_data.train)
    qat(obj, UniformQuantizer(2), estimator="lsq", steps=3, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training == training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_qat_beats_ptq_at_two_bits_on_digits(trained_digits_mlp, digits_data):
    model = trained_digits_mlp.model
    train_obj = rs.Objective(model, "cross_entropy", digits_data.train)
    test_obj = rs.Objective(model, "cross_entropy", digits_data.test)
    quantizer = UniformQuantizer(2, range="minmax", per_channel=True, symmetric=True)
    theta_ptq = ptq(train_obj, quantizer)
    ptq_acc, ptq_loss = test_obj.metric(theta_ptq), train_obj.loss(theta_ptq)
    print(f"\n2-bit minmax PTQ: test acc {ptq_acc:.3f}, train loss {ptq_loss:.3f}")
    for estimator, steps in (("ste", 300), ("lsq", 300), ("clipped_ste", 100), ("ewgs", 100), ("pege", 100)):
        res = qat(train_obj, quantizer, estimator=estimator, steps=steps, lr=1e-2, progress=False)
        acc = test_obj.metric(res.theta_q)
        print(f"2-bit QAT {estimator}: test acc {acc:.3f}, train loss {res.last_loss:.3f} ({res.wall_time:.1f} s)")
        assert res.last_loss < 0.5 * ptq_loss
        if estimator in ("ste", "lsq"):
            # PTQ sits near 0.37 here, QAT near 0.95: a 0.3 margin is far from both
            assert acc > ptq_acc + 0.3


def test_module_doctests():
    result = doctest.testmod(qat_module)
    assert result.attempted >= 3 and result.failed == 0


class _DictLM(torch.nn.Module):
    """A tiny model with HF-style keyword inputs and its own loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(12, 6)
        self.head = torch.nn.Linear(6, 12)

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.embed(input_ids)))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits.reshape(-1, 12), labels.reshape(-1))
        return {"logits": logits, "loss": loss}


def _dict_batches(n_batches: int = 3, size: int = 4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (n_batches * size, 5), generator=g)
    return [{"input_ids": ids[i : i + size], "labels": ids[i : i + size]} for i in range(0, n_batches * size, size)]


def test_minibatch_qat_on_dict_batches_with_the_models_own_loss():
    """Mini-batches are drawn from dict batches (every key sliced with the same samples); the step loss is the model's own."""
    torch.manual_seed(0)
    model = _DictLM().double()
    obj = rs.Objective(model, "model", _dict_batches(), dtype=torch.float64)
    res = qat(obj, UniformQuantizer(4), steps=6, lr=1e-2, batch_size=5, seed=3, progress=False)
    again = qat(obj, UniformQuantizer(4), steps=6, lr=1e-2, batch_size=5, seed=3, progress=False)
    assert torch.equal(res.theta_q, again.theta_q)  # seeded sampler
    assert not torch.equal(res.latent_trajectory[-1], obj.theta0)  # it trained
    sampler = _MiniBatches(obj, 5, torch.Generator().manual_seed(3))
    x, y = sampler.next()
    assert set(x) == {"input_ids", "labels"} and x["input_ids"].shape == (5, 5) and torch.equal(y, x["labels"])  # targets = labels
    rows = {tuple(r.tolist()) for b in _dict_batches() for r in b["input_ids"]}
    assert all(tuple(r.tolist()) in rows for r in x["input_ids"]) and torch.equal(x["input_ids"], x["labels"])


def test_qat_on_a_streaming_objective_is_full_batch_and_equals_the_in_memory_run():
    torch.manual_seed(0)
    model = _DictLM().double()
    batches = _dict_batches()
    held = rs.Objective(model, "model", batches, dtype=torch.float64)
    streamed = rs.Objective(model, "model", batches, dtype=torch.float64, stream=True)
    assert streamed.streaming
    a = qat(held, UniformQuantizer(4), steps=4, lr=1e-2, seed=0, progress=False)
    b = qat(streamed, UniformQuantizer(4), steps=4, lr=1e-2, seed=0, progress=False)
    torch.testing.assert_close(a.theta_q, b.theta_q, rtol=0, atol=1e-12)  # same batches, same sums; float64 reordering only
    with pytest.raises(ValueError, match="mini-batch QAT needs the analysis set in memory"):
        qat(streamed, UniformQuantizer(4), steps=2, batch_size=4, progress=False)
