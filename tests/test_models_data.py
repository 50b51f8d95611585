"""Built-in data sets and models: shapes, determinism, and training that records theta."""
from __future__ import annotations

import pytest
import torch

import riverscape as rs
from riverscape.data import DATASET_NAMES
from riverscape.models import MODEL_NAMES

SMALL = {
    "digits": {},
    "digits32": {},
    "mnist1d": {"num_samples": 600},
    "teacher_linear": {"dim": 20, "n_train": 50, "n_test": 10},
    "teacher_sign": {"dim": 20, "n_train": 50, "n_test": 10},
    "text": {},
}
PAIRS = [("digits", "mlp"), ("digits", "cnn"), ("digits", "resnet20"), ("digits32", "resnet20"), ("mnist1d", "cnn1d"), ("mnist1d", "mlp"),
         ("text", "transformer"), ("teacher_linear", "linear"), ("teacher_sign", "mlp")]


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_datasets_are_deterministic_and_well_formed(name):
    a, b = rs.load_dataset(name, **SMALL[name]), rs.load_dataset(name, **SMALL[name])
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape[1:] == a.input_shape and len(a.x_train) == len(a.y_train) > 0 and len(a.x_test) > 0
    if a.num_classes:
        assert int(a.y_train.max()) < a.num_classes


def test_teacher_student_labels_follow_the_teacher():
    ds = rs.load_dataset("teacher_linear", dim=30, n_train=40, n_test=5, noise=0.0)
    w = ds.info["teacher"]
    assert torch.allclose(ds.x_train @ w / 30**0.5, ds.y_train, atol=1e-5)
    sign = rs.load_dataset("teacher_sign", dim=30, n_train=40, n_test=5)
    assert set(sign.info["teacher"].unique().tolist()) == {-1.0, 1.0}
    assert torch.equal((sign.x_train @ sign.info["teacher"] >= 0).long(), sign.y_train)


@pytest.mark.parametrize("data_name,model_name", PAIRS)
def test_models_fit_their_data(data_name, model_name):
    ds = rs.load_dataset(data_name, **SMALL[data_name])
    model = rs.build_model(model_name, **ds.model_kwargs(model_name))
    out = model(ds.x_train[:4])
    expected_last = ds.num_classes or 1
    assert out.shape[0] == 4 and out.shape[-1] == expected_last


def test_model_registry_rejects_unknown_names():
    assert set(MODEL_NAMES) >= {"mlp", "cnn", "resnet20", "transformer"}
    with pytest.raises(ValueError, match="unknown model"):
        rs.build_model("vgg")
    with pytest.raises(ValueError, match="unknown dataset"):
        rs.load_dataset("cifar10")


def test_digits32_is_the_digits_split_as_standardised_colour_images():
    small, big = rs.load_dataset("digits"), rs.load_dataset("digits32")
    assert big.input_shape == (3, 32, 32) and big.x_train.shape == (1348, 3, 32, 32) and big.x_test.shape == (449, 3, 32, 32)
    assert torch.equal(big.y_train, small.y_train) and torch.equal(big.y_test, small.y_test)  # the same seeded split
    # standardised per channel on the training split (float32 of float64 statistics)
    assert torch.allclose(big.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(big.x_train.std((0, 2, 3)), torch.ones(3), atol=1e-4)
    # colour is a nuisance: the mean colour of an image does not predict its class better than chance by much
    colour = big.x_train.mean((2, 3))
    centroids = torch.stack([colour[big.y_train == c].mean(0) for c in range(10)])
    nearest = torch.cdist(big.x_test.mean((2, 3)), centroids).argmin(1)
    assert float((nearest == big.y_test).double().mean()) < 0.25
    assert rs.data.estimated_bytes("digits32") > big.x_train.numel() * 4


def test_resnet20_parameter_count():
    n = sum(p.numel() for p in rs.models.resnet20().parameters())
    assert 260_000 < n < 280_000  # He et al. report 0.27M


def test_train_records_trajectory_and_leaves_input_model_alone(digits_data):
    torch.manual_seed(0)
    model = rs.build_model("mlp", **digits_data.model_kwargs("mlp"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = rs.train(model, digits_data, steps=60, lr=1e-2, record_every=20, seed=1)
    assert result.steps == [0, 20, 40, 60]
    assert result.trajectory.shape == (4, 2410)
    assert torch.equal(result.trajectory[0], torch.cat([v.reshape(-1) for v in before.values()]))
    assert torch.equal(result.trajectory[-1], rs.Objective(result.model, "cross_entropy", digits_data.test).theta0)
    assert result.loss_history[-1] < result.loss_history[0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    again = rs.train(model, digits_data, steps=60, lr=1e-2, record_every=20, seed=1)
    assert torch.equal(again.trajectory, result.trajectory)  # seeded, reproducible
