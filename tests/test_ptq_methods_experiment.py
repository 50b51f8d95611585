"""experiments/ptq_methods.py on a micro config, and the seed summaries of riverscape.ptq_study."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats as scipy_stats

from helpers import bn_study, experiment_script
from riverscape import ptq_study as ps
from riverscape import studies as st

PTQ_FIELDS = {"accuracy", "loss", "train_loss", "short_name", "range", "seconds", "calibration_loss", "calibration_samples",
              "calibration_indices", "calibration_source", "validation_loss", "validation_samples", "validation_indices"}
QAT_FIELDS = {"accuracy", "loss", "train_loss", "short_name", "range", "seconds", "qat_steps", "total_grid_flips"}


def _micro(quick: bool) -> dict:
    return {"models": {"digits_mlp": {"train_steps": 120, "qat_steps": 6, "qat_record_every": 3}}, "bits": [2], "group_sizes": [None, 16],
            "calibration_samples": 64, "validation_samples": 128, "seeds": 2, "adaround_iterations": 20, "flip_rounds": 3, "flip_candidates": 4, "flip_matvecs": 4}


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    script = experiment_script("ptq_methods")
    script.settings = _micro
    seen: list[tuple[str, torch.Tensor, object]] = []  # (method, calibration inputs the method received, study)
    search, measure = ps.greedy_flip_search, ps.measure_ptq

    def spy_search(objective, *args, **kwargs):
        seen.append(("nearby", torch.cat([x for x, _ in objective.batches]), objective))
        return search(objective, *args, **kwargs)

    def spy_measure(ref, qmap, *, calibration, **kwargs):
        seen.append((kwargs["method"].method, torch.cat([x for x, _ in calibration.batches]), calibration))
        return measure(ref, qmap, calibration=calibration, **kwargs)

    out = tmp_path_factory.mktemp("ptq_methods")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ps, "greedy_flip_search", spy_search)
        mp.setattr(ps, "measure_ptq", spy_measure)
        summary = script.main(["--out", str(out), "--no-progress", "--quick"])
    torch.set_num_threads(1)
    return out, summary, seen


def test_micro_run_records_every_method_with_its_fields(micro_run):
    out, summary, _ = micro_run
    records = json.loads((out / "results.json").read_text())["cells"]
    # per seed: fp, 5 PTQ methods x 2 granularities, STE x 2, LSQ per channel only
    assert len(records) == 2 * (1 + 5 * 2 + 2 + 1)
    assert not any(r["params"]["method"] == "qat_lsq" and r["params"]["group_size"] is not None for r in records)
    for rec in records:
        p, r = rec["params"], rec["result"]
        assert set(p) == {"model", "bits", "group_size", "method", "seed"}
        if p["method"] == "fp":
            continue
        assert (PTQ_FIELDS if p["method"] in ps.PTQ_COMPARED else QAT_FIELDS) <= set(r)
        assert r["short_name"] == ("W2" if p["group_size"] is None else "W2g16")
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"])
        if p["method"] in ps.PTQ_COMPARED:
            assert r["calibration_source"] == "train" and len(r["calibration_indices"]) == r["calibration_samples"] == 64
            assert len(r["validation_indices"]) == r["validation_samples"] == 128
            assert not set(r["calibration_indices"]) & set(r["validation_indices"])
    by = {(r["params"]["method"], r["params"]["group_size"], r["params"]["seed"]): r["result"] for r in records}
    for seed in (0, 1):
        # GPTQ/AdaRound/flips round on RTN-mse's grid; flips start from RTN-mse and only accept measured decreases
        assert by[("nearby", None, seed)]["calibration_loss"] <= by[("rtn_mse", None, seed)]["calibration_loss"]
        assert by[("rtn_minmax", None, seed)]["range"] == "minmax" and by[("gptq", None, seed)]["range"] == "mse"
        # one calibration draw per seed, shared by every data-aware method; seeds draw different rows
        assert len({tuple(by[(m, g, seed)]["calibration_indices"]) for m in ps.PTQ_COMPARED for g in (None, 16)}) == 1
    assert by[("gptq", None, 0)]["calibration_indices"] != by[("gptq", None, 1)]["calibration_indices"]
    text = (out / "tables.md").read_text()
    assert "n=2" in text and "best_ptq - qat_ste" in text
    assert (out / "accuracy_digits_mlp.html").exists() and (out / "loss_digits_mlp.png").exists()
    assert {c["a"] for c in summary["contrasts"]} == {"best_ptq", "qat_ste", "gptq", "adaround", "nearby"}


def test_data_aware_methods_only_saw_the_calibration_split_of_the_training_data(micro_run):
    out, _, seen = micro_run
    records = json.loads((out / "results.json").read_text())["cells"]
    assert {m for m, _, _ in seen} == {"rtn", "gptq", "adaround", "nearby"} and len(seen) == 2 * 5 * 2  # rtn twice (min-max, mse)
    spec = st.study_model("digits_mlp", **_micro(True)["models"]["digits_mlp"])
    for seed in (0, 1):
        study = st.load_study(spec, seed, out / "fp_models")
        x_train, x_test = study.dataset.x_train.double(), study.dataset.x_test.double()
        index = next(r["result"]["calibration_indices"] for r in records if r["params"]["seed"] == seed and r["params"]["method"] == "nearby")
        for _, inputs, objective in seen[seed * 10:(seed + 1) * 10]:
            # exactly the recorded training rows ...
            assert torch.equal(inputs.double(), x_train[index])
            # ... none of which is an evaluation (test) row: the smallest distance between digits images is > 0.4
            assert torch.cdist(inputs.double(), study.evaluation.batches[0][0].double()).min() > 0.1
            assert torch.cdist(inputs.double(), x_test).min() > 0.1
            assert objective.n_samples == 64 < study.analysis.n_samples


def _record(method: str, seed: int, accuracy: float, loss: float, validation_loss: float | None = None, group_size=None) -> dict:
    result = {"accuracy": accuracy, "loss": loss, "short_name": "W2"}
    if validation_loss is not None:
        result["validation_loss"] = validation_loss
    return {"params": {"model": "m", "bits": 2, "group_size": group_size, "method": method, "seed": seed}, "result": result}


def test_summary_rows_use_the_t_interval_and_best_ptq_is_chosen_on_validation_loss():
    acc = {"rtn_minmax": [0.2, 0.3, 0.25], "rtn_mse": [0.5, 0.6, 0.55], "gptq": [0.7, 0.9, 0.8], "adaround": [0.6, 0.95, 0.7],
           "nearby": [0.65, 0.7, 0.75], "qat_ste": [0.85, 0.8, 0.9]}
    # validation losses pick gptq, adaround, nearby for seeds 0, 1, 2 (not the best test accuracy on seeds 0 and 2)
    val = {"rtn_minmax": [3, 3, 3], "rtn_mse": [2, 2, 2], "gptq": [0.5, 0.9, 0.9], "adaround": [0.6, 0.4, 0.7], "nearby": [0.7, 0.8, 0.3]}
    records = [_record(m, s, acc[m][s], 1 - acc[m][s], val.get(m, [None] * 3)[s]) for m in acc for s in range(3)]
    rows = {r["method"]: r for r in ps.summary_rows(records)}
    x = np.array(acc["gptq"])
    half = scipy_stats.t.ppf(0.975, 2) * x.std(ddof=1) / math.sqrt(3)
    assert rows["gptq"]["accuracy"]["n"] == 3
    assert rows["gptq"]["accuracy"]["low"] == pytest.approx(x.mean() - half, rel=1e-12)
    assert rows["gptq"]["accuracy"]["high"] == pytest.approx(x.mean() + half, rel=1e-12)
    assert rows["best_ptq"]["selected"] == {"gptq": 1, "adaround": 1, "nearby": 1}
    assert rows["best_ptq"]["accuracy"]["estimate"] == pytest.approx((0.7 + 0.95 + 0.75) / 3, rel=1e-12)
    contrasts = {(c["a"], c["b"]): c for c in ps.paired_contrasts(records)}
    assert ("best_ptq", "qat_lsq") not in contrasts  # no LSQ arm: skipped, not an error
    diff = contrasts[("best_ptq", "qat_ste")]
    assert diff["n"] == 3 and diff["accuracy"]["estimate"] == pytest.approx(np.mean([0.7 - 0.85, 0.95 - 0.8, 0.75 - 0.9]), rel=1e-12)
    assert diff["loss"]["estimate"] == pytest.approx(-diff["accuracy"]["estimate"], rel=1e-12)
    assert ps.format_interval(rows["gptq"]["accuracy"]) == f"0.800 [{x.mean() - half:.3f}, {x.mean() + half:.3f}] n=3"
    single = ps.seed_interval([0.5], 0.95)
    assert single["n"] == 1 and math.isnan(single["low"]) and ps.format_interval(single) == "0.500 n=1"


def test_method_quantizer_ranges_and_names():
    with pytest.raises(ValueError, match="unknown method"):
        ps.method_quantizer("awq", 4, None)
    assert ps.method_quantizer("gptq", 3, 16).short_name == "W3g16"


def test_a_batchnorm_cell_is_evaluated_with_statistics_reestimated_on_its_calibration_split():
    study = bn_study()
    fresh = ps.ptq_method_cell(study, 2, None, "rtn_minmax", seed=3, calibration_samples=8, validation_samples=10, bn_reestimate=True)
    stale = ps.ptq_method_cell(study, 2, None, "rtn_minmax", seed=3, calibration_samples=8, validation_samples=10)
    assert fresh["bn_reestimation"] == {"samples": 8, "batches": 1} and "bn_reestimation" not in stale
    assert fresh["stale_bn_loss"] == stale["loss"] and fresh["stale_bn_accuracy"] == stale["accuracy"]
    # by hand: Q(theta_fp) in a copy of the model, one train-mode pass over the 8 calibration rows, then eval on test / validation
    net = copy.deepcopy(study.model)
    qmap = study.reference.quant_map(ps.method_quantizer("rtn_minmax", 2, None))
    point = qmap(study.theta_fp)
    with torch.no_grad():
        for name, value in study.analysis.unflatten(point).items():
            dict(net.named_parameters())[name].copy_(value)
        net[1].reset_running_stats()
        net[1].momentum = None
        net.train()(study.dataset.x_train[fresh["calibration_indices"]])
        net.eval()
        test_loss = float(F.cross_entropy(net(study.dataset.x_test), study.dataset.y_test))
        val_loss = float(F.cross_entropy(net(study.dataset.x_train[fresh["validation_indices"]]),
                                         study.dataset.y_train[fresh["validation_indices"]]))
    assert fresh["loss"] == pytest.approx(test_loss, rel=1e-12) and fresh["validation_loss"] == pytest.approx(val_loss, rel=1e-12)
    assert abs(fresh["loss"] - stale["loss"]) > 1e-4
    rows = ps.summary_rows([{"params": {"model": "m", "bits": 2, "group_size": None, "method": "rtn_minmax", "seed": 3}, "result": fresh}])
    assert rows[0]["stale_bn_loss"]["estimate"] == stale["loss"]


def test_experiment_models_include_the_resnet():
    assert ps.experiment_model("resnet20_digits32", train_steps=3).train_steps == 3
    assert ps.experiment_model("digits_mlp") == st.study_model("digits_mlp")
    with pytest.raises(ValueError, match="unknown model"):
        ps.experiment_model("vgg")
    spec = ps.RESNET_STUDY
    assert spec.to_dict()["model_options"] == [["width", 8]] and "model_options" not in st.study_model("digits_mlp").to_dict()


def test_the_nearby_search_of_a_batchnorm_cell_runs_on_the_statistics_of_its_start(monkeypatch):
    """With re-estimation the flips are judged on the deployed loss: statistics re-estimated at the RTN-MSE start.

    The searched objective's loss at the start must equal the RTN-MSE cell's calibration loss (measured
    with statistics re-estimated at that point on the same rows); the stale FP statistics give another.
    """
    study = bn_study()
    searched = []
    real = ps.greedy_flip_search
    monkeypatch.setattr(ps, "greedy_flip_search", lambda objective, *a, **k: (searched.append(objective), real(objective, *a, **k))[1])
    options = dict(seed=3, calibration_samples=8, validation_samples=10, flip_rounds=2, flip_candidates=4, flip_matvecs=4)
    fresh = ps.ptq_method_cell(study, 2, None, "nearby", bn_reestimate=True, **options)
    stale = ps.ptq_method_cell(study, 2, None, "nearby", **options)
    rtn = ps.ptq_method_cell(study, 2, None, "rtn_mse", seed=3, calibration_samples=8, validation_samples=10, bn_reestimate=True)
    start = study.reference.quant_map(ps.method_quantizer("nearby", 2, None))(study.theta_fp)
    assert fresh["search_bn"] == "re-estimated at the RTN start" and "search_bn" not in stale
    assert searched[0].loss(start) == pytest.approx(rtn["calibration_loss"], rel=1e-12)
    assert abs(searched[1].loss(start) - rtn["calibration_loss"]) > 1e-4  # without re-estimation: the stale statistics
