"""Make sure an Objective's Hessian-vector products work before the heavy computation starts.

riverscape's HVPs differentiate the gradient once more (forward-over-reverse ``jvp(grad)``
or reverse-over-reverse ``autograd.grad(create_graph=True)``). A few PyTorch ops have no
derivative of their backward and crash there with a raw error, for example

* ``nn.Hardsigmoid`` (MobileNetV3): ``derivative for aten::hardsigmoid_backward is not implemented``;
* ``F.scaled_dot_product_attention`` on CPU (HF/timm attention), which dispatches to a fused
  flash kernel: ``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
  is not implemented``.

:func:`ensure_twice_differentiable` runs one HVP on a few samples and, when it fails with
such an error, changes only the Objective's PRIVATE copy of the model (never the caller's):

1. activation modules whose op lacks a double backward are replaced by the same function
   written with differentiable primitives (:class:`Hardsigmoid`, :class:`Hardswish`);
2. every forward runs under the math backend of scaled dot-product attention
   (``sdpa_kernel(SDPBackend.MATH)``, a composition of matmul and softmax), and an HF-style
   ``config`` is switched to ``attn_implementation="eager"``.

If the HVP still fails, the Objective switches to finite-difference HVPs (central
differences of exact gradients, relative accuracy ~ ``eps^(2/3)``;
:meth:`riverscape.objective.Objective.finite_difference_hvp`). If even the gradient fails,
an :class:`~riverscape.errors.InputError` says so in one line. What was done comes back as
human-readable notes for the report.
"""
from __future__ import annotations

import functools
from typing import ContextManager, Optional

import torch
from torch import Tensor, nn
from torch.func import vmap

from .batching import take_samples
from .errors import InputError

__all__ = [
    "Hardsigmoid",
    "Hardswish",
    "is_missing_double_backward",
    "check_twice_differentiable",
    "replace_activations",
    "math_attention",
    "use_eager_attention",
    "prefer_eager_attention",
    "ensure_twice_differentiable",
]

#: fragments (lower case) of PyTorch's messages for an op without a (forward-mode) derivative of its backward
_MISSING_DERIVATIVE_HINTS = (
    "does not support double backward",
    "double backward",
    "double backwards",
    "forward ad",
    "forward mode ad",
    "forward-mode ad",
    "not implemented for forward",
)


def is_missing_double_backward(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch saying that an op cannot be differentiated twice.

    Recognises "derivative for aten::X_backward is not implemented", "Trying to use forward
    AD with X that does not support it", "... does not support double backward" and the like.
    """
    if not isinstance(err, (RuntimeError, NotImplementedError)):
        return False
    text = str(err).lower()
    if "derivative for" in text and "not implemented" in text:
        return True
    return any(hint in text for hint in _MISSING_DERIVATIVE_HINTS)


# ------------------------------------------------------------------------ replacement modules
class Hardsigmoid(nn.Module):
    """``clamp(x / 6 + 1 / 2, 0, 1)``: ``nn.Hardsigmoid`` from ops with a double backward."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


class Hardswish(nn.Module):
    """``x * clamp(x / 6 + 1 / 2, 0, 1)``: ``nn.Hardswish`` from ops with a double backward."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


#: native activation -> twice-differentiable twin (same function, no parameters or buffers)
_REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {nn.Hardsigmoid: Hardsigmoid, nn.Hardswish: Hardswish}


@functools.lru_cache(maxsize=None)
def _lacks_double_backward(cls: type[nn.Module]) -> bool:
    """Whether the native op of an activation class fails a double backward (tested once, on 6 numbers)."""
    module = cls()
    x = torch.linspace(-4.0, 4.0, 6, dtype=torch.float64, requires_grad=True)
    try:
        (g,) = torch.autograd.grad(module(x).pow(2).sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)
        torch.func.jvp(torch.func.grad(lambda t: module(t).pow(2).sum()), (x.detach(),), (torch.ones_like(x.detach()),))
    except (RuntimeError, NotImplementedError) as err:
        if is_missing_double_backward(err):
            return True
        raise
    return False


def replace_activations(module: nn.Module) -> dict[str, int]:
    """Replace, in place, activation submodules whose op has no double backward.

    Only classes listed in the replacement table whose native op actually fails a double
    backward in the installed PyTorch are replaced (``nn.Hardsigmoid`` in torch 2.x;
    ``nn.Hardswish`` only where it fails). Apply it to a private copy, never to a user's model.

    Parameters
    ----------
    module : nn.Module
        Modified in place; the replacements hold no parameters or buffers, so parameter names
        and state-dict keys do not change.

    Returns
    -------
    dict
        ``{class name: number replaced}``, empty if nothing was replaced.
    """
    counts: dict[str, int] = {}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            twin = _REPLACEMENTS.get(type(child))
            if twin is not None and _lacks_double_backward(type(child)):
                setattr(parent, name, twin())
                counts[type(child).__name__] = counts.get(type(child).__name__, 0) + 1
    return counts


def math_attention() -> ContextManager:
    """Context manager running ``scaled_dot_product_attention`` on its (twice-differentiable) math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def use_eager_attention(module: nn.Module) -> bool:
    """Set ``attn_implementation = "eager"`` on every HF-style ``config`` found in ``module``.

    Returns whether any config was changed. Apply it to a private copy only.
    """
    changed = False
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is None:
            continue
        for attribute in ("_attn_implementation", "attn_implementation"):
            if hasattr(config, attribute) and getattr(config, attribute) != "eager":
                try:
                    setattr(config, attribute, "eager")
                except (AttributeError, TypeError, ValueError):
                    continue
                changed = True
    return changed


def _attention_implementations(module: nn.Module) -> set[str]:
    found = set()
    for sub in module.modules():
        value = getattr(getattr(sub, "config", None), "_attn_implementation", None)
        if isinstance(value, str):
            found.add(value)
    return found


def prefer_eager_attention(module: nn.Module) -> list[str]:
    """Switch an HF model whose attention is not ``"eager"`` (``"sdpa"``, flash, flex) to eager attention.

    HF models pick ``attn_implementation="sdpa"`` by default, and the fused CPU kernel behind it
    has no double backward, so every HVP would fail. Eager attention computes the same function
    with matmul and softmax. Apply it to a private copy only (the Objective does, at construction).

    Returns
    -------
    list of str
        One note naming the switch, or nothing if the module has no non-eager HF attention.
    """
    fused = sorted(_attention_implementations(module) - {"eager"})
    if not fused:
        return []
    setter = getattr(module, "set_attn_implementation", None)
    try:
        if not callable(setter):
            raise AttributeError("set_attn_implementation")
        setter("eager")
    except (AttributeError, TypeError, ValueError, ImportError):
        use_eager_attention(module)
    if _attention_implementations(module) - {"eager"}:
        return []  # could not switch: ensure_twice_differentiable falls back to the math SDPA backend
    return [f"attention switched from {'/'.join(repr(f) for f in fused)} to 'eager' in riverscape's copy of the model: "
            "fused attention kernels have no double backward on CPU (same function, computed with matmul and softmax)"]


def _uses_attention(module: nn.Module, err: BaseException) -> bool:
    text = str(err).lower()
    if "scaled_dot_product" in text or "attention" in text:
        return True
    return any(isinstance(m, nn.MultiheadAttention) for m in module.modules())


# ------------------------------------------------------------------------------- the check
def _probe_batch(objective, samples: int) -> tuple:
    x, y = objective.first_batch()
    return take_samples(x, samples), take_samples(y, samples)


def _probe_direction(objective) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(objective.dim, generator=generator, dtype=torch.float64)
    return v.to(device=objective.device, dtype=objective.dtype)


def check_twice_differentiable(objective, *, samples: int = 4) -> Optional[BaseException]:
    """Run the Objective's exact HVP paths once on its first ``samples`` samples.

    Tries forward-over-reverse (what :meth:`~riverscape.objective.Objective.hvp` uses), its
    ``vmap`` over two vectors (:meth:`~riverscape.objective.Objective.hvps`) and
    reverse-over-reverse with a stored graph (:class:`~riverscape.objective.HessianOperator`
    in ``"reuse"`` mode).

    Returns
    -------
    BaseException or None
        The error of a missing double backward, ``None`` if every path works. Any other error
        (a genuine bug in the model or the loss) propagates.
    """
    x, y = _probe_batch(objective, samples)
    theta, v = objective.theta0, _probe_direction(objective)
    try:
        objective._hvp_batch(theta, v, x, y)
        try:
            vmap(lambda u: objective._hvp_batch(theta, u, x, y))(torch.stack([v, -v]))
        except (RuntimeError, NotImplementedError) as err:
            if is_missing_double_backward(err):
                raise
            # any other vmap failure is a batching problem, not a missing double backward
        leaf, g = objective._grad_graph(theta, x, y)
        torch.autograd.grad(g, leaf, v)
    except (RuntimeError, NotImplementedError) as err:
        if is_missing_double_backward(err):
            return err
        raise
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _finite_difference_accuracy(objective, samples: int) -> float:
    """Relative accuracy of a finite-difference HVP on the probe batch.

    The larger of the nominal ``eps^(2/3)`` and the measured change between steps ``h`` and
    ``2h`` (the O(h^2) truncation error quadruples from h to 2h, so the change is about three
    times the error at ``h``; rounding noise shows up in it as well).
    """
    x, y = _probe_batch(objective, samples)
    theta, v = objective.theta0, _probe_direction(objective)
    batches = [(x, y)]
    h = objective.finite_difference_step(theta, v)
    at_h = objective.finite_difference_hvp(theta, v, batches, step=h)
    at_2h = objective.finite_difference_hvp(theta, v, batches, step=2.0 * h)
    scale = float(at_h.norm())
    measured = float((at_h - at_2h).norm()) / scale if scale > 0 else 0.0
    return max(objective.finite_difference_accuracy, measured)


def ensure_twice_differentiable(objective, *, samples: int = 4, finite_difference: bool = True) -> list[str]:
    """Check the Objective's HVPs on a few samples and repair its private model if needed.

    Parameters
    ----------
    objective : Objective
        Its private module (``objective.module``) may be changed; the caller's model never is.
    samples : int
        Samples of the first batch used by the check (one HVP on them).
    finite_difference : bool
        Fall back to finite-difference HVPs when no twice-differentiable form is found;
        if ``False`` raise :class:`~riverscape.errors.InputError` instead.

    Returns
    -------
    list of str
        Human-readable notes on what was changed (empty when exact HVPs worked as is).

    Raises
    ------
    InputError
        Neither exact nor finite-difference HVPs work (the gradient itself fails), or the
        exact ones fail and ``finite_difference`` is ``False``.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Hardsigmoid(), torch.nn.Linear(4, 2))
    >>> obj = Objective(model, "cross_entropy", (torch.randn(8, 3), torch.randint(0, 2, (8,))))
    >>> ensure_twice_differentiable(obj)
    ['replaced 1 Hardsigmoid module by a twice-differentiable form (Hessian-vector products need a double backward)']
    """
    if objective.finite_difference:
        return [_finite_difference_note(objective, _finite_difference_accuracy(objective, samples))]
    err = check_twice_differentiable(objective, samples=samples)
    if err is None:
        return []
    notes = _repair_module(objective, err)
    retry = check_twice_differentiable(objective, samples=samples) if notes else err
    if retry is not None and _is_forward_mode(retry) and not objective._reverse_hvp:
        objective._reverse_hvp = True  # an op without a forward-mode derivative: reverse-over-reverse may still work
        retry = check_twice_differentiable(objective, samples=samples)
        if retry is None:
            notes.append("HVPs by reverse-over-reverse differentiation: an op has no forward-mode derivative")
    if retry is None:
        return notes
    if not finite_difference:
        raise InputError(f"Hessian-vector products need a double backward, which this model lacks ({_first_line(retry)})")
    objective.use_finite_difference()
    try:
        accuracy = _finite_difference_accuracy(objective, samples)
    except (RuntimeError, NotImplementedError) as grad_err:
        raise InputError(f"the model's loss cannot be differentiated, so no curvature can be computed ({_first_line(grad_err)})") from None
    notes.append(_finite_difference_note(objective, accuracy, reason=_first_line(retry)))
    return notes


def _repair_module(objective, err: BaseException) -> list[str]:
    """Switch the Objective's private model to twice-differentiable forms; notes on what changed."""
    notes: list[str] = []
    counts = replace_activations(objective.module)
    objective._selected = None  # submodules changed: re-read the parameter list on the next plain forward
    for name, count in counts.items():
        plural = "s" if count > 1 else ""
        notes.append(f"replaced {count} {name} module{plural} by a twice-differentiable form (Hessian-vector products need a double backward)")
    if _uses_attention(objective.module, err):
        objective.set_forward_context(math_attention)
        eager = use_eager_attention(objective.module)
        notes.append("attention runs on the math SDPA backend" + (" (attn_implementation='eager')" if eager else "") + ": the fused CPU/flash kernels have no double backward")
    return notes


def _is_forward_mode(err: BaseException) -> bool:
    text = str(err).lower()
    return "forward ad" in text or "forward mode ad" in text or "forward-mode ad" in text


def _finite_difference_note(objective, accuracy: float, reason: Optional[str] = None) -> str:
    why = f" because an op has no double backward ({reason})" if reason else ""
    return (
        f"HVPs by finite differences of exact gradients{why}: central differences, "
        f"h = eps^(1/3)·max(1, ‖θ‖)/‖v‖ in {str(objective.compute_dtype).replace('torch.', '')} (relative accuracy ~{accuracy:.0e})"
    )
