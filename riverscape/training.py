"""Full-precision training that records its trajectory (the raw material of the river)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import Dataset
from .objective import LossFn, resolve_loss

__all__ = ["TrainResult", "train", "flat_parameters", "OPTIMIZERS", "build_optimizer"]

OPTIMIZERS = ("adam", "sgd")


def build_optimizer(
    name: str, params: Sequence[Tensor], lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimiser called ``name`` (one of :data:`OPTIMIZERS`) over ``params``.

    The one place where riverscape turns an optimiser name into a ``torch.optim`` object
    (full-precision training and QAT use it).

    Parameters
    ----------
    name : {"adam", "sgd"}
        ``"adam"``: :class:`torch.optim.Adam`; ``"sgd"``: :class:`torch.optim.SGD`, heavy
        ball with ``momentum``.
    params : sequence of Tensor
        Leaf tensors to optimise.
    lr : float
        Learning rate (positive).
    momentum : float
        SGD momentum (ignored by Adam).
    weight_decay : float
        L2 penalty coefficient of either optimiser.

    Returns
    -------
    torch.optim.Optimizer

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists :data:`OPTIMIZERS`).

    Examples
    --------
    >>> w = torch.zeros(3, requires_grad=True)
    >>> type(build_optimizer("sgd", [w], 0.1)).__name__
    'SGD'
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def flat_parameters(model: nn.Module) -> Tensor:
    """All trainable parameters of ``model`` as one flat detached vector (model order).

    This is ``Objective(model, ...).theta0`` for the default parameter selection.
    """
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).clone()


@dataclass
class TrainResult:
    """A trained model and the path it took.

    Attributes
    ----------
    model : nn.Module
        The trained model (a copy; the caller's module is untouched), in eval mode.
    trajectory : Tensor, shape (n_checkpoints, D)
        Flat trainable parameters at the recorded ``steps`` (step 0 = initialisation).
    steps : list of int
        Optimiser step of each trajectory row.
    loss_history : list of float
        Mini-batch training loss at every step.
    """

    model: nn.Module
    trajectory: Tensor
    steps: list[int]
    loss_history: list[float] = field(default_factory=list)

    @property
    def theta(self) -> Tensor:
        """Final flat parameters."""
        return self.trajectory[-1]


def _record_set(steps: int, record_every: int | None, record_steps: Sequence[int] | None) -> set[int]:
    if record_steps is not None:
        chosen = {int(s) for s in record_steps if 0 <= s <= steps}
    else:
        every = record_every or max(1, steps // 20)
        chosen = set(range(0, steps + 1, every))
    return chosen | {0, steps}


def train(
    model: nn.Module,
    data: Union[Dataset, tuple[Tensor, Tensor]],
    *,
    loss_fn: Union[str, LossFn, None] = None,
    steps: int = 1000,
    lr: float = 1e-2,
    optimizer: str = "adam",
    momentum: float = 0.9,
    batch_size: int | None = 128,
    weight_decay: float = 0.0,
    record_every: int | None = None,
    record_steps: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> TrainResult:
    """Train a full-precision model with mini-batch SGD or Adam, recording its trajectory.

    Parameters
    ----------
    model : nn.Module
        Initial model. It is deep-copied: the caller's module is not modified.
    data : Dataset or (inputs, targets)
        Training data (a :class:`~riverscape.data.Dataset` uses its training split and loss).
    loss_fn : str or callable, optional
        Default: the dataset's loss, else ``"cross_entropy"``.
    steps : int
        Optimiser steps.
    lr, optimizer, momentum, weight_decay
        ``optimizer`` is ``"adam"`` or ``"sgd"`` (with ``momentum``).
    batch_size : int or None
        Mini-batch size (sampled without replacement each epoch); ``None`` = full batch.
    record_every : int, optional
        Record theta every this many steps (default: 20 records over the run).
    record_steps : sequence of int, optional
        Record exactly at these steps (overrides ``record_every``); 0 and the last step
        are always recorded.
    seed : int
        Seeds the mini-batch order (a private generator; the global RNG is not touched).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    TrainResult
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if isinstance(data, Dataset):
        x, y = data.train
        loss_fn = loss_fn or data.loss
    else:
        x, y = data
    loss = resolve_loss(loss_fn or "cross_entropy")
    net = copy.deepcopy(model)
    net.train()
    device = next(net.parameters()).device
    x, y = x.to(device), y.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, params, lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    bs = n if batch_size is None else min(batch_size, n)
    record = _record_set(steps, record_every, record_steps)
    trajectory, recorded, history = [flat_parameters(net)], [0], []
    order, cursor = torch.randperm(n, generator=gen), 0
    for step in tqdm(range(1, steps + 1), disable=not progress, desc="training", leave=False):
        if cursor + bs > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + bs].to(device)
        cursor += bs
        opt.zero_grad(set_to_none=True)
        value = loss(net(x[idx]), y[idx])
        if not torch.isfinite(value.detach()):
            raise FloatingPointError(f"training loss became {float(value)} at step {step}; lower the learning rate")
        value.backward()
        opt.step()
        history.append(float(value.detach()))
        if step in record:
            trajectory.append(flat_parameters(net))
            recorded.append(step)
    net.eval()
    for p in net.parameters():
        p.grad = None
    return TrainResult(net, torch.stack(trajectory), recorded, history)
