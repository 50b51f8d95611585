"""Test helpers: tiny float64 models and an assert_close that explains disagreements."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def experiment_script(name: str) -> ModuleType:
    """``experiments/<name>.py`` loaded as a fresh module (its ``settings`` can then be replaced by a micro config)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_close(actual, expected, *, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """assert_close that says where and by how much two arrays disagree."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{what}: max violation at flat index {i}: actual {actual.reshape(-1)[i].item():.6e} "
            f"expected {expected.reshape(-1)[i].item():.6e} (abs err {err.reshape(-1)[i].item():.3e}, "
            f"rtol {rtol}, atol {atol}); max abs err {err.max().item():.3e}"
        )


def tiny_mlp(seed: int = 0, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).double()


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()


def digits_mlp_checkpoint(path, *, steps: int, seed: int = 0):
    """Train the built-in digits MLP for ``steps`` steps and save it as a riverscape checkpoint at ``path``.

    Returns the :class:`~riverscape.TrainResult` (its ``model`` is the saved network). The same seed
    gives the same checkpoint, so fixtures in different test files agree.
    """
    import riverscape as rs
    from riverscape.checkpoint import make_spec, save_checkpoint

    ds = rs.load_dataset("digits")
    kwargs = ds.model_kwargs("mlp")
    torch.manual_seed(seed)
    result = rs.train(rs.build_model("mlp", **kwargs), ds, steps=steps, lr=1e-2, seed=seed, progress=False)
    save_checkpoint(path, result.model, model_spec=make_spec("mlp", kwargs), data_spec="digits", loss="cross_entropy", train_result=result)
    return result


def bn_study(spec=None):
    """A small BatchNorm CNN on random 4x4 images (float64), wrapped as a :class:`riverscape.studies.Study` without training.

    ``spec`` (default ``riverscape.ptq_study.RESNET_STUDY``) supplies the budgets; 30 training rows, 10 test rows, 3 classes.
    """
    from riverscape import ptq_study as ps
    from riverscape import studies as st
    from riverscape.data import Dataset
    from riverscape.pipeline import build_reference
    from riverscape.quant import UniformQuantizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    data = Dataset("bn_toy", x[:30], y[:30], x[30:], y[30:], "cross_entropy", 3, (1, 4, 4))
    reference, _ = build_reference(model, "cross_entropy", data.train, data.test, quantizer=UniformQuantizer(8), dtype=torch.float64)
    return st.Study(spec=ps.RESNET_STUDY if spec is None else spec, seed=0, dataset=data, reference=reference)

