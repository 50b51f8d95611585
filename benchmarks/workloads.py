"""Benchmark workloads: one model, one batch of data and one loss, shared by every tool.

Every tool (riverscape and each peer) gets a fresh deep copy of the same eval-mode model,
the same tensors and the same loss, so differences in the tables come from the
algorithms, not from the inputs.

=================  =====================================================  ==============
name               model and data                                         reference
=================  =====================================================  ==============
``digits_mlp``     64-32-10 tanh MLP trained on digits, its 1348 samples  exact (dense)
``cifar_cnn``      3 conv + 2 fc CNN (81k) trained to fit 128 seeded     converged
                   CIFAR-shaped inputs with random labels (loss ~0.002)
``resnet20``       ResNet-20 with BatchNorm (eval mode, running stats     converged
                   set by train-mode passes on the data), 64 inputs
``transformer``    tiny causal transformer on stdlib text, 64 sequences   converged
=================  =====================================================  ==============
"""
from __future__ import annotations

import copy
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

import riverscape as rs
from riverscape.objective import cross_entropy

CACHE_DIR = Path(__file__).resolve().parent / "results" / "cache"

__all__ = ["Workload", "SequenceCrossEntropy", "WORKLOADS", "QUICK_WORKLOADS", "build_workload", "mlp_of_size"]


class SequenceCrossEntropy(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` (mean) over all leading dims: ``(N, C)`` or ``(N, T, C)`` logits.

    Peers need an ``nn.Module`` criterion (curvlinops reads ``.reduction``); this one computes
    exactly :func:`riverscape.objective.cross_entropy`.
    """

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        return cross_entropy(outputs, targets)


@dataclass
class Workload:
    """A model (eval mode, owned by the benchmark), one batch ``(x, y)`` and the loss.

    Attributes
    ----------
    name : str
    model : nn.Module
        Never handed to a tool directly: tools get :meth:`fresh_model` copies.
    x, y : Tensor
        Inputs ``(N, ...)`` and integer targets ``(N,)`` or ``(N, T)``.
    exact : bool
        Whether the dense float64 Hessian is affordable (exact references).
    description : str
    """

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    exact: bool
    description: str
    criterion: nn.Module = field(default_factory=SequenceCrossEntropy)
    _objectives: dict = field(default_factory=dict, repr=False)

    @property
    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The riverscape loss (identical values to :attr:`criterion`)."""
        return cross_entropy

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def fresh_model(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A deep copy in eval mode (optionally cast) for a tool that mutates its model."""
        model = copy.deepcopy(self.model)
        if dtype is not None:
            model = model.to(dtype)
        for p in model.parameters():
            p.requires_grad_(True)
        return model.eval()

    def data(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        x = self.x.to(dtype) if (dtype is not None and torch.is_floating_point(self.x)) else self.x
        return x, self.y

    def objective(self, dtype: torch.dtype | None = None, hvp_mode: str = "auto") -> rs.Objective:
        """The riverscape Objective (cached per dtype and mode)."""
        key = (dtype, hvp_mode)
        if key not in self._objectives:
            self._objectives[key] = rs.Objective(self.model, self.loss_fn, (self.x, self.y), dtype=dtype, hvp_mode=hvp_mode)
        return self._objectives[key]


def _seeded_model(seed: int, name: str, **kwargs) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return rs.build_model(name, **kwargs)


def _digits_mlp(seed: int) -> Workload:
    ds = rs.load_dataset("digits")
    trained = _trained(
        "digits_mlp", seed, _seeded_model(seed, "mlp", **ds.model_kwargs("mlp")),
        lambda m: rs.train(m, ds, steps=1500, lr=1e-2, batch_size=128, seed=seed).model,
    )
    x, y = ds.train
    return Workload("digits_mlp", trained, x, y, True, f"64-32-10 tanh MLP trained on digits, {len(x)} samples")


def _cifar_batch(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _trained(name: str, seed: int, model: nn.Module, train: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``train(model)`` once; later runs load the cached weights (training is deterministic)."""
    cache = CACHE_DIR / f"{name}-trained-seed{seed}-torch{torch.__version__}.pt"
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    trained = train(model).eval()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(trained.state_dict(), cache)
    return trained


def _cifar_cnn(seed: int) -> Workload:
    x, y = _cifar_batch(128, seed)
    model = _trained(
        "cifar_cnn", seed, _seeded_model(seed, "cifar_cnn"),
        lambda m: rs.train(m, (x, y), steps=150, lr=1e-3, batch_size=None, seed=seed).model,
    )
    return Workload("cifar_cnn", model, x, y, False, "3 conv + 2 fc CNN, no BN, trained (150 Adam steps) to fit 128 random CIFAR-shaped inputs with random labels")


def _resnet20(seed: int, batch: int = 64) -> Workload:
    x, y = _cifar_batch(batch, seed + 1)
    model = _seeded_model(seed, "resnet20")
    model.train()
    with torch.no_grad():  # non-trivial running statistics before the model is frozen
        for chunk in x.split(16):
            model(chunk * 1.5 + 0.2)
    return Workload("resnet20", model.eval(), x, y, False, f"ResNet-20 with BatchNorm (eval mode, running stats set), {batch} random inputs")


def _transformer(seed: int, batch: int = 64) -> Workload:
    ds = rs.load_dataset("text", seq_len=32)
    model = _seeded_model(seed, "transformer", **ds.model_kwargs("transformer")).eval()
    x, y = ds.x_train[:batch], ds.y_train[:batch]
    return Workload("transformer", model, x, y, False, f"tiny causal transformer, {batch} stdlib-text sequences of 32 characters")


_BUILDERS: dict[str, Callable[[int], Workload]] = {
    "digits_mlp": _digits_mlp,
    "cifar_cnn": _cifar_cnn,
    "resnet20": _resnet20,
    "transformer": _transformer,
}
WORKLOADS = tuple(_BUILDERS)
QUICK_WORKLOADS = ("digits_mlp", "cifar_cnn")


def build_workload(name: str, seed: int = 0) -> Workload:
    """Build a workload by name (see the module table)."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose one of {list(WORKLOADS)}") from None
    return builder(seed)


def mlp_of_size(num_params: int, *, samples: int = 512, in_dim: int = 64, seed: int = 0) -> Workload:
    """A 2-hidden-layer tanh MLP with about ``num_params`` parameters on fixed random data.

    Used by the cost-growth (scaling) mode: the data stay fixed while the width grows.
    """
    # params = in*h + h + h*h + h + 10*h + 10  ->  solve h^2 + (in + 12) h + 10 - P = 0
    b = in_dim + 12
    width = max(2, int(round((-b + (b * b + 4 * (num_params - 10)) ** 0.5) / 2)))
    model = _seeded_model(seed, "mlp", in_dim=in_dim, out_dim=10, hidden=(width, width)).eval()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(samples, in_dim, generator=g), torch.randint(0, 10, (samples,), generator=g)
    return Workload(f"mlp_{width}", model, x, y, False, f"64-{width}-{width}-10 tanh MLP, {samples} random samples")
