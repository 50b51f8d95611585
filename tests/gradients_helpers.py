"""Helpers of the gradient/damage tests.

A model whose loss is an exact quadratic of its weights: L(w) = 1/2 (w - w*)^T A (w - w*).

Two bias-free Linear layers hold w (shapes (3, 4) and (2, 3): d = 18, two quantized tensors);
the forward pass ignores its input and returns the quadratic form, the loss is the output.
So grad L(w) = A (w - w*) and H = A exactly, in float64.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import riverscape as rs
from riverscape.landscape import hessian_eigs

SHAPES = ((3, 4), (2, 3))
DIM = sum(a * b for a, b in SHAPES)


class QuadraticModel(nn.Module):
    def __init__(self, matrix: Tensor, minimum: Tensor, start: Tensor, shapes=SHAPES) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False, dtype=torch.float64) for o, i in shapes)
        with torch.no_grad():
            offset = 0
            for layer in self.layers:
                n = layer.weight.numel()
                layer.weight.copy_(start[offset : offset + n].view_as(layer.weight))
                offset += n
        self.register_buffer("matrix", matrix)
        self.register_buffer("minimum", minimum)

    def forward(self, x: Tensor) -> Tensor:
        w = torch.cat([layer.weight.reshape(-1) for layer in self.layers])
        d = w - self.minimum
        return 0.5 * d @ (self.matrix @ d) + 0.0 * x.sum()


def output_as_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return outputs


def spd_matrix(dim: int, seed: int, low: float = 0.05, high: float = 20.0) -> tuple[Tensor, Tensor, Tensor]:
    """``A = U diag(lam) U^T`` with distinct log-spaced eigenvalues; returns (A, lam desc, U)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    lam = torch.logspace(torch.log10(torch.tensor(high)), torch.log10(torch.tensor(low)), dim, dtype=torch.float64)
    return basis @ torch.diag(lam) @ basis.T, lam, basis


def quadratic_objective(seed: int = 0, offset_scale: float = 0.0, shapes=SHAPES):
    """(objective, A, w*, theta_fp): theta_fp = w* + offset (offset 0 -> a minimum)."""
    dim = sum(a * b for a, b in shapes)
    A, _, _ = spd_matrix(dim, seed)
    g = torch.Generator().manual_seed(seed + 100)
    minimum = torch.randn(dim, generator=g, dtype=torch.float64)
    theta_fp = minimum + offset_scale * torch.randn(dim, generator=g, dtype=torch.float64)
    model = QuadraticModel(A, minimum, theta_fp, shapes).double()
    data = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    obj = rs.Objective(model, output_as_loss, data, dtype=torch.float64)
    return obj, A, minimum, obj.theta0.clone()


def top_eigenpairs(A: Tensor, k: int) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(A)
    return values.flip(0)[:k], vectors.flip(1)[:, :k]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread for the requesting module: these problems are tiny, and on a shared 2-core
    machine two threads per process oversubscribe the cores (measured 10-20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits_setup(single_thread, trained_digits_mlp, digits_data):
    """(user model, its state copy, float64 Objective on the train split over the weights,
    Hessian operator at theta0, top-10 eigenvalues, eigenvectors)."""
    model = trained_digits_mlp.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    obj = rs.Objective(model, digits_data.loss, digits_data.train, params="*.weight", dtype=torch.float64)
    op = obj.hessian(obj.theta0)
    values, vectors = hessian_eigs(obj, obj.theta0, k=10, operator=op)
    return model, state, obj, op, values, vectors
