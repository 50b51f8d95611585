"""The QAT-dynamics experiment on a BatchNorm model: every deployed evaluation and the alignment re-estimate the
statistics at Q(w_t) on a calibration split of the training data; the study's models keep their buffers."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import riverscape as rs
from riverscape import ptq_study as ps
from riverscape import qat_dynamics as qd
from riverscape import studies as st
from riverscape.gradients import floor_alignment
from riverscape.pipeline import LINE_POINTS, accuracy_tolerance, deployed_evaluate
from riverscape.quant import ptq

from helpers import bn_study, experiment_script

BITS, RANGE, SEED, CALIBRATION = 2, "minmax", 3, 8
SPEC = replace(ps.RESNET_STUDY, qat_steps=6, qat_lr=5e-2, qat_batch=None, qat_record_every=3)


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _by_hand(study: st.Study, point: torch.Tensor, rows: torch.Tensor) -> torch.nn.Module:
    """A copy of the model at ``point`` whose BatchNorm statistics are those of ``rows`` of the training split (one batch)."""
    net = copy.deepcopy(study.model)
    with torch.no_grad():
        for name, value in study.analysis.unflatten(point).items():
            dict(net.named_parameters())[name].copy_(value)
        net[1].reset_running_stats()
        net[1].momentum = None
        net.train()(study.dataset.x_train[rows])
    return net.eval()


def _test_metrics(net: torch.nn.Module, study: st.Study) -> tuple[float, float]:
    with torch.no_grad():
        logits = net(study.dataset.x_test)
    return float(F.cross_entropy(logits, study.dataset.y_test)), float((logits.argmax(1) == study.dataset.y_test).double().mean())


@pytest.fixture(scope="module")
def bn_cell():
    study = bn_study(SPEC)
    before = {"model": _state(study.model), **{name: _state(getattr(study, name).module) for name in ("analysis", "training", "evaluation")}}
    result = qd.dynamics_cell(study, BITS, RANGE, "ste", seed=SEED, record_every=3, alignment_fractions=[0.0, 1.0], n_null=4,
                              floor_steps=5, calibration_samples=CALIBRATION)
    run = st.run_qat(study, BITS, "ste", seed=SEED, record_every=3, range_method=RANGE)  # the same run again (seeded, deterministic)
    return study, before, result, run


def test_deployed_series_tolerance_and_best_iterate_use_statistics_reestimated_at_each_point(bn_cell):
    study, _, r, run = bn_cell
    rows = st.calibration_split(study, CALIBRATION, SEED)[1]
    assert r["bn_reestimation"] == {"samples": CALIBRATION, "batches": 1}
    assert r["steps"] == [0, 3, 6]
    # float64 throughout; the library evaluates through a copied module and an Objective, the reference by a direct forward: rounding only
    expected = [_test_metrics(_by_hand(study, q, rows), study) for q in run.quantized_trajectory]
    assert r["deployed_loss"] == pytest.approx([e[0] for e in expected], rel=1e-12)
    assert r["deployed_accuracy"] == pytest.approx([e[1] for e in expected], rel=1e-12)
    # the stale (FP-statistics) series is the QAT run's own, and the re-estimation changes the numbers
    assert r["stale_bn_deployed_loss"] == run.history["eval_loss"] and r["stale_bn_deployed_accuracy"] == run.history["eval_metric"]
    assert max(abs(a - b) for a, b in zip(r["deployed_loss"], r["stale_bn_deployed_loss"])) > 1e-3
    # final, best iterate and the hitting threshold follow the re-estimated series
    assert r["final_loss"] == r["deployed_loss"][-1] and r["best_loss"] == min(r["deployed_loss"])
    fp_loss, _ = _test_metrics(_by_hand(study, study.theta_fp, rows), study)
    ptq_loss, ptq_accuracy = _test_metrics(_by_hand(study, ptq(study.analysis, study.quant_map(BITS, RANGE)), rows), study)
    tol = r["tolerance"]
    assert tol["fp_loss"] == pytest.approx(fp_loss, rel=1e-12)
    assert (tol["ptq_loss"], tol["ptq_accuracy"]) == pytest.approx((ptq_loss, ptq_accuracy), rel=1e-12)
    # this untrained toy loses no test row anywhere on its 2-bit line (checked by hand): no tau, so every run "hits" at once
    assert _line(study, BITS, rows)[1] is None
    assert tol["tau"] is None and r["threshold"] == float("inf") and (r["hit"], r["hit_time"]) == (True, 0)
    below = [s for s, v in zip(r["steps"], r["deployed_loss"]) if v <= r["threshold"]]
    assert r["hit"] == bool(below) and r["hit_time"] == (below[0] if below else r["steps"][-1])


def _line(study: st.Study, bits: int, rows: torch.Tensor) -> tuple[list, int | None]:
    """Test metrics at every line point by hand, and the index of the first one losing at least one point of accuracy."""
    direction = ptq(study.analysis, study.quant_map(bits, RANGE)) - study.theta_fp
    line = [_test_metrics(_by_hand(study, study.theta_fp + t * direction, rows), study) for t in LINE_POINTS]
    return line, next((i for i, (_, acc) in enumerate(line) if acc <= line[0][1] - 0.01), None)


def test_the_tolerance_line_walk_stops_at_the_first_drop_with_the_result_of_every_point():
    study = bn_study(SPEC)
    calibration, rows = st.calibration_split(study, CALIBRATION, SEED)
    line, first = _line(study, 1, rows)
    assert first is not None and 0 < first < LINE_POINTS.index(1.0)  # at 1 bit the toy loses a test row on the way
    tol = accuracy_tolerance(study.reference, study.quant_map(1, RANGE), drop=0.01, calibration=calibration)
    assert tol.t_star == LINE_POINTS[first]
    # float64, copied module vs direct forward: rounding only
    assert tol.tau == pytest.approx(line[first][0] - line[0][0], rel=1e-9)
    assert (tol.fp_loss, tol.fp_accuracy, tol.ptq_loss, tol.ptq_accuracy) == pytest.approx(
        (*line[0], *line[LINE_POINTS.index(1.0)]), rel=1e-12)
    stale = accuracy_tolerance(study.reference, study.quant_map(1, RANGE), drop=0.01)
    assert stale.fp_loss == pytest.approx(float(study.evaluation.loss(study.theta_fp)), rel=1e-12) and stale.fp_loss != tol.fp_loss


def test_alignment_is_measured_at_statistics_reestimated_at_the_deployed_point(bn_cell):
    study, _, r, run = bn_cell
    rows = st.calibration_split(study, CALIBRATION, SEED)[1]
    qmap = study.quant_map(BITS, RANGE)
    vectors = study.basis().vectors
    for row in r["alignment"]:
        i = run.trajectory_steps.index(row["step"])
        w = run.latent_trajectory[i]
        net = _by_hand(study, qmap(w, run.qparams), rows)
        # the analysis loss at Q(w_t) with those statistics (analysis set = the 30 training rows)
        with torch.no_grad():
            analysis_loss = float(F.cross_entropy(net(study.dataset.x_train), study.dataset.y_train))
        assert row["deployed_loss"] == pytest.approx(analysis_loss, rel=1e-12)
        # the whole measurement (floor solve, arm gradient, null gradients) on an Objective built by hand around that module
        objective = rs.Objective(net, "cross_entropy", study.dataset.train, params=study.names, dtype=torch.float64)
        generator = torch.Generator().manual_seed(1_000_003 * SEED + row["step"])
        expected = floor_alignment(objective, qmap, w, run.qparams, vectors, arm="ste", reference=study.theta_fp, n_null=4, floor_steps=5,
                                   generator=generator).to_dict()
        # L-BFGS floor solve and gradients in float64 on the same data in the same order: agreement to rounding
        assert row["cosine"] == pytest.approx(expected["cosine"], rel=1e-9, abs=1e-12)
        assert row["null_mean"] == pytest.approx(expected["null_mean"], rel=1e-9, abs=1e-12)
        stale = floor_alignment(study.analysis, qmap, w, run.qparams, vectors, arm="ste", reference=study.theta_fp, n_null=4, floor_steps=5,
                                generator=torch.Generator().manual_seed(1_000_003 * SEED + row["step"])).to_dict()
        assert abs(stale["deployed_loss"] - row["deployed_loss"]) > 1e-3  # the FP statistics would have measured another point


def test_study_models_keep_their_batchnorm_buffers_bit_for_bit(bn_cell):
    study, before, _, _ = bn_cell
    after = {"model": _state(study.model), **{name: _state(getattr(study, name).module) for name in ("analysis", "training", "evaluation")}}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys()
        for key, value in before[name].items():
            assert torch.equal(value, after[name][key]), (name, key)
    assert "num_batches_tracked" in " ".join(before["model"])  # the buffers checked include the BatchNorm statistics


def test_only_a_batchnorm_model_with_calibration_data_reestimates():
    from riverscape.pipeline import build_reference, reestimates_bn
    from riverscape.quant import UniformQuantizer

    from helpers import tiny_mlp

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(23, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (23,), generator=g)
    ref, _ = build_reference(tiny_mlp(), "cross_entropy", (x, y), (x, y), quantizer=UniformQuantizer(2))
    assert not reestimates_bn(ref, rs.Objective(tiny_mlp(), "cross_entropy", (x[:5], y[:5]), params=list(ref.names)))
    study = bn_study()
    calibration = st.calibration_split(study, 8, 0)[0]
    assert reestimates_bn(study.reference, calibration) and not reestimates_bn(study.reference, None)
    assert qd.bn_calibration(study, 8, 0) is not None
    with pytest.raises(TypeError, match="calibration"):
        deployed_evaluate(study.reference, study.theta_fp[None], calibration=study.dataset.train)
    with pytest.raises(ValueError, match="dimension"):
        deployed_evaluate(study.reference, study.theta_fp[None], calibration=rs.Objective(tiny_mlp(), "cross_entropy", (x, y)))


def test_calibration_split_is_the_ptq_methods_calibration_split():
    study = bn_study()
    objective, index = st.calibration_split(study, 8, 5)
    splits = ps.training_splits(study, 8, 10, 5)
    assert torch.equal(index, splits.calibration_index) and torch.equal(objective.batches[0][0], splits.calibration.batches[0][0])
    assert not set(index.tolist()) & set(splits.validation_index.tolist())
    assert qd.bn_calibration(study, 8, 5) is qd.bn_calibration(study, 8, 5)  # the arms of one seed share it
    with pytest.raises(ValueError, match="calibration samples"):
        st.calibration_split(study, 30, 0)


def test_script_models_option_and_full_grid():
    script = experiment_script("qat_dynamics")
    full = script.settings(False)
    assert set(full["models"]) == {"digits_mlp", "mnist1d_cnn", "text_transformer", "resnet20_digits32"}
    assert set(script.settings(True)["models"]) == {"digits_mlp", "mnist1d_cnn"}
    assert set(script.specs(full)) == set(full["models"]) and script.specs(full)["resnet20_digits32"].model == "resnet20"
    parser_opts = type("Opts", (), {"models": ["resnet20_digits32", "text_transformer"], "quick": True})
    chosen = script.overrides(parser_opts)
    assert list(chosen["models"]) == ["resnet20_digits32", "text_transformer"] and set(chosen["grid"]) == set(chosen["models"])
    cfg = {**script.settings(True), **chosen}
    cells = script.cells(cfg, 0)
    per_model = {key: {c["seed"] for c in cells if c["model"] == key} for key in chosen["models"]}
    assert per_model["resnet20_digits32"] == set(range(min(cfg["seeds"], cfg["grid"]["resnet20_digits32"].get("max_seeds", 99))))
    assert per_model["text_transformer"] == set(range(cfg["seeds"]))
    assert script.overrides(type("Opts", (), {"models": None, "quick": False})) == {}
    with pytest.raises(SystemExit, match="unknown model"):
        script.overrides(type("Opts", (), {"models": ["vgg"], "quick": True}))


def test_a_run_may_log_no_alignment_step(tmp_path):
    """The full run's ResNet logs no alignment step: no hill frame, no rows, pooled z None, figures without the z panel."""
    study = bn_study(SPEC)
    r = qd.dynamics_cell(study, BITS, RANGE, "latent", seed=SEED, record_every=3, alignment_fractions=[], n_null=4, floor_steps=5,
                         calibration_samples=CALIBRATION)
    assert r["alignment"] == [] and r["alignment_z"] is None and r["alignment_point_z"] is None
    assert not [key for key in study.reference._cache if isinstance(key, tuple) and key[0] == "hill"]  # no hill frame was computed
    runs = [{**r, "seed": seed, "estimator": name, "arm": qd.ARM_LABELS[name]} for seed in (0, 1) for name in ("ste", "latent")]
    rows = qd.paired_comparisons(runs)
    assert rows[0]["alignment"]["A"] == {"z": None, "p": None, "n_z": 0, "point_z": None, "point_p": None, "n_point_z": 0}
    script = experiment_script("qat_dynamics")
    script.figures([r], tmp_path)
    assert (tmp_path / f"arms_{r['model']}_{BITS}bit_{RANGE}.html").exists()
