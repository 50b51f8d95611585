"""BatchNorm folding: merge eval-mode BatchNorm layers into the Conv/Linear layer before them.

A BatchNorm layer in eval mode is the per-channel affine map
``y = gamma * (x - mu) / sqrt(var + eps) + beta``. When ``x = W * a + b`` is the output of a
Conv/Linear layer used only by that BatchNorm, the composition is again a Conv/Linear layer
with ``W' = s W`` (``s = gamma / sqrt(var + eps)`` along the output channels) and
``b' = s (b - mu) + beta``: the network function is unchanged and the BatchNorm becomes an
``Identity``. Deployed integer models quantize ``W'``, not ``W`` (Jacob et al. 2018, section
3.2; Nagel et al. 2021, arXiv 2106.08295, section 2.3), so a PTQ study of a BatchNorm
network should quantize the folded weights (docs/ptq_search.md §1).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["FoldedPair", "UnfoldedBatchNorm", "BatchNormFolding", "fold_batchnorm", "FOLDABLE_LAYERS"]

FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Layer types a following BatchNorm is folded into (output channels on weight axis 0)."""


@dataclass(frozen=True)
class FoldedPair:
    """One folded ``layer -> batchnorm`` pair (qualified module names)."""

    layer: str
    batchnorm: str
    bias_created: bool

    def to_dict(self) -> dict:
        return {"layer": self.layer, "batchnorm": self.batchnorm, "bias_created": self.bias_created}


@dataclass(frozen=True)
class UnfoldedBatchNorm:
    """A BatchNorm layer left in place, and why."""

    batchnorm: str
    reason: str

    def to_dict(self) -> dict:
        return {"batchnorm": self.batchnorm, "reason": self.reason}


@dataclass(frozen=True)
class BatchNormFolding:
    """What :func:`fold_batchnorm` did.

    Attributes
    ----------
    pairs : tuple of FoldedPair
        The folded pairs, in module order.
    unfolded : tuple of UnfoldedBatchNorm
        Every BatchNorm layer left in place with the reason.
    tracer : {"fx", "sequential"}
        How the pairs were found: the ``torch.fx`` graph, or adjacency inside
        ``nn.Sequential`` containers when the model does not trace.
    """

    pairs: tuple[FoldedPair, ...]
    unfolded: tuple[UnfoldedBatchNorm, ...]
    tracer: str

    def to_dict(self) -> dict:
        return {
            "pairs": [p.to_dict() for p in self.pairs],
            "unfolded": [u.to_dict() for u in self.unfolded],
            "tracer": self.tracer,
        }


def _batchnorm_problem(bn: _BatchNorm) -> Optional[str]:
    """Why ``bn`` cannot be folded on its own (``None`` if it can)."""
    if bn.training:
        return "in train mode (normalises with batch statistics)"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "no running statistics (normalises with batch statistics)"
    return None


def _fx_candidates(model: nn.Module) -> Optional[dict[str, tuple[Optional[str], Optional[str]]]]:
    """``{bn name: (layer name or None, reason or None)}`` from the fx graph; ``None`` if tracing fails."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure means: use the Sequential fallback
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(model.named_modules())
    out: dict[str, tuple[Optional[str], Optional[str]]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        source = node.args[0] if node.args else None
        if calls[node.target] > 1:
            out[node.target] = (None, "called more than once in the forward")
        elif not (isinstance(source, torch.fx.Node) and source.op == "call_module"
                  and isinstance(modules.get(source.target), FOLDABLE_LAYERS)):
            out[node.target] = (None, "input is not the output of a Conv/Linear layer")
        elif len(source.users) > 1:
            out[node.target] = (None, f"the output of {source.target} is also used elsewhere")
        elif calls[source.target] > 1:
            out[node.target] = (None, f"{source.target} is called more than once in the forward")
        else:
            out[node.target] = (source.target, None)
    return out


def _sequential_candidates(model: nn.Module) -> dict[str, tuple[Optional[str], Optional[str]]]:
    """``{bn name: (layer name or None, reason or None)}`` from adjacency inside ``nn.Sequential``."""
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    out: dict[str, tuple[Optional[str], Optional[str]]] = {}
    for name, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        for i, (child_name, child) in enumerate(children):
            if not isinstance(child, _BatchNorm):
                continue
            full = f"{name}.{child_name}" if name else child_name
            previous = children[i - 1] if i > 0 else None
            if previous is None or not isinstance(previous[1], FOLDABLE_LAYERS):
                out[full] = (None, "not directly after a Conv/Linear layer in an nn.Sequential")
            elif counts[id(previous[1])] > 1 or counts[id(child)] > 1:
                out[full] = (None, "a module of the pair is shared (used in several places)")
            else:
                out[full] = (f"{name}.{previous[0]}" if name else previous[0], None)
    return out


def _fold_into(layer: nn.Module, bn: _BatchNorm) -> bool:
    """Fold ``bn`` into ``layer`` in place (computed in float64); returns whether a bias was created."""
    weight = layer.weight
    with torch.no_grad():
        mean = bn.running_mean.detach().double()
        var = bn.running_var.detach().double()
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
        s = gamma / torch.sqrt(var + bn.eps)
        bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)
        new_weight = weight.detach().double() * s.reshape([-1] + [1] * (weight.ndim - 1))
        new_bias = s * (bias - mean) + beta
        weight.copy_(new_weight.to(weight.dtype))
        created = layer.bias is None
        if created:
            layer.bias = nn.Parameter(new_bias.to(device=weight.device, dtype=weight.dtype), requires_grad=weight.requires_grad)
        else:
            layer.bias.copy_(new_bias.to(layer.bias.dtype))
    return created


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, BatchNormFolding]:
    """Fold every foldable eval-mode BatchNorm into the Conv/Linear layer before it.

    Pairs are found on the ``torch.fx`` graph (``symbolic_trace``) when the model traces, else
    by adjacency inside ``nn.Sequential`` containers. A BatchNorm1d/2d/3d is folded into the
    Conv1d/2d/3d or Linear layer that produces its input when the layer's output is used by
    nothing else, neither module is called twice (weights shared), and the BatchNorm is in
    eval mode with running statistics. The layer's weight becomes ``s W`` and its bias
    ``s (b - mu) + beta`` (a bias is created when absent), ``s = gamma / sqrt(var + eps)``
    per output channel, computed in float64; the BatchNorm is replaced by ``nn.Identity``.
    A Linear followed by a BatchNorm1d is folded on the usual assumption that the Linear's
    output is ``(N, features)`` (BatchNorm1d normalises dim 1) and checked only in that the
    feature counts agree. The Sequential fallback cannot see a layer's output used outside the
    container (e.g. stored by a hook) and assumes it is not. docs/ptq_search.md §1.

    Parameters
    ----------
    model : nn.Module
        Not modified.

    Returns
    -------
    folded : nn.Module
        A deep copy with the pairs folded (same class; training flags kept).
    report : BatchNormFolding
        The folded pairs and every BatchNorm left in place with its reason.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
    >>> folded, report = fold_batchnorm(net)
    >>> [(p.layer, p.batchnorm) for p in report.pairs], type(folded[1]).__name__
    ([('0', '1')], 'Identity')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = copy.deepcopy(model)
    candidates = _fx_candidates(out)
    tracer = "fx"
    if candidates is None:
        candidates, tracer = _sequential_candidates(out), "sequential"
    pairs, unfolded = [], []
    for name, module in out.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        layer_name, reason = candidates.get(name, (None, "not reached by the traced forward"))
        if reason is None:
            reason = _batchnorm_problem(module)
        if reason is None:
            layer = out.get_submodule(layer_name)
            if layer.weight.shape[0] != module.num_features:
                reason = f"{layer_name} has {layer.weight.shape[0]} output channels, the BatchNorm {module.num_features}"
        if reason is not None:
            unfolded.append(UnfoldedBatchNorm(name, reason))
            continue
        pairs.append(FoldedPair(layer_name, name, _fold_into(layer, module)))
    for pair in pairs:
        _replace(out, pair.batchnorm, nn.Identity())
    return out, BatchNormFolding(tuple(pairs), tuple(unfolded), tracer)
