"""Registries of PTQ methods and QAT estimators: name -> frozen config -> handler, validation, extension."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import riverscape as rs
from riverscape.quant import (
    ESTIMATOR_REGISTRY,
    ESTIMATORS,
    EWGS,
    LSQ,
    PEGE,
    PTQ_CONFIGS,
    PTQ_METHODS,
    RTN,
    STE,
    ClippedSTE,
    EstimatorConfig,
    EstimatorHandler,
    PTQConfig,
    QuantMap,
    UniformQuantizer,
    build_estimator,
    clipped_ste,
    estimator_config,
    get_estimator,
    ptq,
    ptq_config,
    ptq_result,
    qat,
    register_estimator,
    register_ptq_method,
    resolve_quant_map,
)
from riverscape.quant.estimator_configs import QATContext
from riverscape.training import OPTIMIZERS, build_optimizer

from helpers import tiny_mlp


@pytest.fixture
def obj(classification_data):
    return rs.Objective(tiny_mlp(), "cross_entropy", classification_data)


def _context(obj, quantizer=UniformQuantizer(2), scale_mode="frozen"):
    qmap = QuantMap(obj, quantizer)
    ranks = [torch.randperm(t.spec.numel).reshape(t.spec.shape) for t in qmap.targets]
    return QATContext(obj, qmap, 5, 0, scale_mode, qmap.qparams(obj.theta0), ranks)


# ---------------------------------------------------------------------- PTQ
@pytest.mark.parametrize("name", sorted(n for n in PTQ_METHODS if PTQ_CONFIGS[n].selectable_by_name))
def test_every_ptq_method_round_trips_name_config_handler(obj, name):
    config = ptq_config(name)
    assert type(config) is PTQ_CONFIGS[name] and config.method == name
    assert ptq_config(config) is config
    assert dataclasses.is_dataclass(config) and type(config).__dataclass_params__.frozen
    assert callable(PTQ_METHODS[config.method])
    by_name = ptq_result(obj, UniformQuantizer(3), method=name)
    by_config = ptq_result(obj, UniformQuantizer(3), method=config)
    assert by_name.method == name and by_name.config == config
    assert torch.equal(by_name.theta_q, by_config.theta_q)
    assert torch.equal(ptq(obj, UniformQuantizer(3), method=config), by_name.theta_q)


def test_methods_that_need_arguments_say_so_by_name(obj):
    unnamed = [n for n in PTQ_METHODS if not PTQ_CONFIGS[n].selectable_by_name]
    assert unnamed == ["external"]
    with pytest.raises(ValueError, match=r"PTQ method 'external' needs arguments: pass a External\(\.\.\.\) config"):
        ptq_result(obj, UniformQuantizer(3), method="external")


def test_rtn_is_round_to_nearest_unchanged(obj):
    q = UniformQuantizer(2, range="mse")
    qmap = QuantMap(obj, q)
    theta = obj.theta0 * 1.3
    assert torch.equal(ptq(obj, q, theta), qmap(theta))  # the default method
    res = ptq_result(obj, q, theta, method=RTN())
    assert torch.equal(res.theta_q, qmap(theta))
    assert list(res.qparams) == [t.name for t in qmap.targets]
    for expected, got in zip(qmap.qparams(theta), res.qparams.values()):
        assert torch.equal(expected.scale, got.scale) and torch.equal(expected.zero_point, got.zero_point)
    assert res.quantizer == q.describe() and RTN().to_dict() == {"method": "rtn", "calibration_samples": None, "seed": 0}
    assert res.reconstruction_error is None and res.fallback == {} and res.calibration is None  # data-free


def test_unknown_ptq_method_lists_the_registered_ones(obj):
    with pytest.raises(ValueError, match=r"unknown PTQ method 'awq'.*'rtn'"):
        ptq(obj, 2, method="awq")

    @dataclass(frozen=True)
    class Unregistered(PTQConfig):
        method: ClassVar[str] = "unregistered"

    with pytest.raises(ValueError, match="not registered.*'rtn'"):
        ptq(obj, 2, method=Unregistered())
    with pytest.raises(TypeError, match="PTQConfig"):
        ptq(obj, 2, method=3)


@dataclass(frozen=True)
class _Shrink(PTQConfig):
    """Toy method: round-to-nearest of ``factor * theta`` on the quantized tensors."""

    method: ClassVar[str] = "toy_shrink"
    factor: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.factor <= 1:
            raise ValueError(f"factor must be in (0, 1], got {self.factor!r}")


def _shrink(config, objective, qmap, theta):
    shrunk = torch.where(qmap.mask, config.factor * theta, theta)
    qparams = qmap.qparams(shrunk)
    return qmap(shrunk, qparams), qparams


@pytest.fixture
def toy_ptq_method():
    register_ptq_method("toy_shrink", _Shrink, _shrink)
    try:
        yield
    finally:
        PTQ_METHODS.pop("toy_shrink")
        PTQ_CONFIGS.pop("toy_shrink")


def test_a_registered_toy_ptq_method_runs_end_to_end(obj, toy_ptq_method):
    q = UniformQuantizer(3)
    qmap = QuantMap(obj, q)
    expected = qmap(torch.where(qmap.mask, 0.5 * obj.theta0, obj.theta0))
    assert torch.equal(ptq(obj, q, method="toy_shrink"), expected)
    quarter = ptq_result(obj, q, method=_Shrink(factor=0.25), keep_first_last=False)
    assert quarter.method == "toy_shrink" and quarter.config.factor == 0.25
    assert torch.equal(quarter.theta_q, qmap(torch.where(qmap.mask, 0.25 * obj.theta0, obj.theta0)))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        _Shrink(factor=2.0)
    with pytest.raises(ValueError, match="toy_shrink"):
        ptq(obj, q, method="nope")  # the message lists the new method too


def test_register_ptq_method_checks_its_arguments():
    with pytest.raises(ValueError, match="declares method 'rtn'"):
        register_ptq_method("other", RTN, _shrink)
    with pytest.raises(TypeError, match="PTQConfig"):
        register_ptq_method("rtn", dict, _shrink)
    with pytest.raises(TypeError, match="callable"):
        register_ptq_method("rtn", RTN, None)
    assert PTQ_CONFIGS["rtn"] is RTN  # nothing was replaced


# ---------------------------------------------------------------------- estimators
@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_estimator_round_trips_name_config_handler(obj, name):
    assert set(ESTIMATORS) <= set(ESTIMATOR_REGISTRY)
    config = estimator_config(name)
    assert type(config) is ESTIMATOR_REGISTRY[name].config_cls and config.name == name
    assert config == ESTIMATOR_REGISTRY[name].config_cls()  # a name means the default config
    assert estimator_config(config) is config
    assert type(config).__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.anything = 1
    handler = build_estimator(config, _context(obj, scale_mode="learned" if config.learns_scale else "frozen"))
    assert isinstance(handler, EstimatorHandler) and handler.config is config
    assert handler.function is get_estimator(name)
    assert config.to_dict()["name"] == name


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LSQ(init="zero"), r"\('calibrated', 'lsq'\)"),
        (lambda: EWGS(update_every=0), "integer >= 1"),
        (lambda: EWGS(matvecs=2), "integer >= 3"),
        (lambda: EWGS(update_every=2.5), "integer >= 1"),
        (lambda: EWGS(delta=-0.1), "None .* or a finite number >= 0"),
        (lambda: EWGS(delta=float("nan")), "finite number >= 0"),
        (lambda: PEGE(beta=1.0), "beta must be a finite number > 1"),
        (lambda: PEGE(penalty=-1e-3), "penalty must be a finite number >= 0"),
        (lambda: PEGE(beta=True), "> 1"),
    ],
)
def test_bad_config_values_raise_with_the_allowed_ones(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_unknown_estimator_lists_the_registered_ones(obj):
    with pytest.raises(ValueError, match=r"unknown estimator 'dsq'.*'ste', 'clipped_ste', 'lsq', 'ewgs', 'pege'"):
        estimator_config("dsq")
    with pytest.raises(ValueError, match="'pege'"):
        qat(obj, 2, estimator="dsq", steps=1, progress=False)

    @dataclass(frozen=True)
    class Unregistered(EstimatorConfig):
        name: ClassVar[str] = "ste"  # claims a registered name with another class

    with pytest.raises(ValueError, match="not registered"):
        qat(obj, 2, estimator=Unregistered(), steps=1, progress=False)
    with pytest.raises(TypeError, match="EstimatorConfig"):
        estimator_config(None)


def test_old_estimator_keywords_point_to_the_configs(obj):
    with pytest.raises(TypeError, match=r"EWGS\(update_every=...\).*PEGE\(beta=...\)"):
        qat(obj, 2, estimator="ewgs", ewgs_update_every=4, pege_beta=3.0, progress=False)


@pytest.mark.parametrize(
    "name, config, options",
    [
        ("ste", STE(), {"batch_size": 7}),
        ("clipped_ste", ClippedSTE(), {"scale": "recomputed"}),
        ("lsq", LSQ(), {"batch_size": 9}),
        ("lsq", LSQ(init="calibrated"), {}),
        ("ewgs", EWGS(update_every=50, matvecs=32), {}),
        ("pege", PEGE(beta=10.0, penalty=1e-4), {"batch_size": 7}),
    ],
)
def test_qat_with_a_config_equals_qat_with_the_name(obj, name, config, options):
    runs = [qat(obj, UniformQuantizer(2), estimator=e, steps=6, lr=0.05, record_every=1, seed=4, progress=False, **options)
            for e in (name, config)]
    by_name, by_config = runs
    assert by_name.history["loss"] == by_config.history["loss"]  # bit-identical floats
    assert torch.equal(by_name.latent_trajectory, by_config.latent_trajectory)
    assert torch.equal(by_name.theta_q, by_config.theta_q)
    assert by_name.estimator == by_config.estimator == name
    assert by_name.estimator_config == by_config.estimator_config == config
    assert by_name.ewgs_deltas == by_config.ewgs_deltas


def test_estimator_options_change_the_run(obj):
    base = qat(obj, 2, estimator="pege", steps=6, lr=0.05, record_every=1, progress=False)
    steep = qat(obj, 2, estimator=PEGE(beta=100.0), steps=6, lr=0.05, record_every=1, progress=False)
    assert steep.history["replaced_fraction"][1] > base.history["replaced_fraction"][1]
    fixed = qat(obj, 2, estimator=EWGS(delta=0.2), steps=4, lr=0.05, progress=False)
    assert fixed.ewgs_deltas == [] and fixed.estimator == "ewgs"  # a fixed delta needs no Hessian
    init = qat(obj, 2, estimator=LSQ(init="lsq"), steps=1, lr=1e-12, progress=False)
    calibrated = qat(obj, 2, estimator=LSQ(), steps=1, lr=1e-12, progress=False)
    assert not torch.equal(init.scales["0.weight"], calibrated.scales["0.weight"])


class _Clipped(EstimatorHandler):
    function = staticmethod(clipped_ste)


@dataclass(frozen=True)
class _ToyEstimator(EstimatorConfig):
    name: ClassVar[str] = "toy_clipped"


def test_a_registered_toy_estimator_runs_through_qat(obj):
    register_estimator("toy_clipped", _ToyEstimator, _Clipped)
    try:
        toy = qat(obj, 2, estimator="toy_clipped", steps=5, lr=0.05, record_every=1, progress=False)
        reference = qat(obj, 2, estimator="clipped_ste", steps=5, lr=0.05, record_every=1, progress=False)
        assert toy.estimator == "toy_clipped" and toy.history["loss"] == reference.history["loss"]
        with pytest.raises(ValueError, match="declares name"):
            register_estimator("other", _ToyEstimator, _Clipped)
    finally:
        ESTIMATOR_REGISTRY.pop("toy_clipped", None)


def test_scale_mode_rules_follow_the_config(obj):
    with pytest.raises(ValueError, match=r"learns it \(\['lsq'\]\)"):
        qat(obj, 2, estimator=STE(), scale="learned", progress=False)
    with pytest.raises(ValueError, match="symmetric"):
        qat(obj, UniformQuantizer(2, symmetric=False), estimator=LSQ(init="lsq"), progress=False)


# ---------------------------------------------------------------------- one coercion, one optimizer builder
def test_resolve_quant_map_takes_bits_quantizers_and_maps(obj):
    by_bits = resolve_quant_map(obj, 3, keep_first_last=False)
    by_quantizer = resolve_quant_map(obj, UniformQuantizer(3))
    assert by_bits.quantizer == by_quantizer.quantizer
    assert resolve_quant_map(obj, by_bits) is by_bits
    assert torch.equal(ptq(obj, 3), ptq(obj, UniformQuantizer(3)))
    with pytest.raises(TypeError, match="bit-width"):
        resolve_quant_map(obj, True)
    with pytest.raises(TypeError, match="bit-width"):
        resolve_quant_map(obj, "3")
    with pytest.raises(ValueError, match="only apply"):
        resolve_quant_map(obj, by_bits, include="0.weight")


def test_build_optimizer_is_the_one_builder():
    w = torch.zeros(2, requires_grad=True)
    assert OPTIMIZERS == ("adam", "sgd")
    assert isinstance(build_optimizer("adam", [w], 0.1), torch.optim.Adam)
    sgd = build_optimizer("sgd", [w], 0.1, momentum=0.5, weight_decay=0.01)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.5 and sgd.defaults["weight_decay"] == 0.01
    with pytest.raises(ValueError, match=r"\('adam', 'sgd'\)"):
        build_optimizer("lbfgs", [w], 0.1)


def test_module_doctests():
    import doctest
    import importlib

    for name in ("riverscape.quant.ptq.base", "riverscape.quant.estimator_configs", "riverscape.quant.qmap", "riverscape.training"):
        result = doctest.testmod(importlib.import_module(name))
        assert result.attempted >= 1 and result.failed == 0, name
