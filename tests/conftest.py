"""Shared fixtures: tiny float64 models with known Hessians, and a trained digits MLP."""
from __future__ import annotations

import pytest
import torch

import riverscape as rs

torch.set_num_threads(1)  # tiny models: one thread avoids oversubscription; heavier tests are still fast


from helpers import assert_close, tiny_cnn, tiny_mlp  # noqa: F401  (re-exported for fixtures)


@pytest.fixture
def classification_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(23, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (23,), generator=g)


@pytest.fixture
def image_data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(10, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)


@pytest.fixture(scope="session")
def digits_data():
    return rs.load_dataset("digits")


@pytest.fixture(scope="session")
def trained_digits_mlp(digits_data):
    """The 64-32-10 tanh MLP trained on digits (about 3 s on 2 cores)."""
    torch.manual_seed(0)
    model = rs.build_model("mlp", **digits_data.model_kwargs("mlp"))
    return rs.train(model, digits_data, steps=1500, lr=1e-2, batch_size=128, seed=0)
