"""The numbers of ``riverscape analyze`` stay the same across refactors (same seed, same metrics).

``tests/data/pinned_demo_metrics.json`` was written by this test (``RIVERSCAPE_REPIN=1``) from
the code before the pipeline redesign; a refactor that is meant to keep behaviour must pass it
unchanged. Tolerances: losses, accuracies and norms are the same float32 sums in the same
order, so 1e-6 relative covers only summation-order rounding; eigenvalues and traces come from
ARPACK (tol 1e-5) and Hutch++ with a fixed seed, 1e-5 relative; counts are exact. Numbers built on
the eigenvectors (the hill fraction, the damage ratio rho_max) carry the eigensolver's tolerance
too: since float32 eigenpairs come from the torch thick-restart Lanczos (same tol 1e-5) instead of
ARPACK they moved by up to 1.5e-6 relative, so they are compared at 1e-5 as well.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from riverscape import cli

PINNED = Path(__file__).parent / "data" / "pinned_demo_metrics.json"
PATHS = [
    "fp.loss", "fp.accuracy", "fp.train_loss",
    "hessian.fp.top_eigenvalues", "hessian.fp.min_eigenvalue", "hessian.fp.trace",
] + [
    f"all_bits.{b}.{leaf}"
    for b in (4, 2)
    for leaf in (
        "ptq.loss", "ptq.accuracy", "ptq.train_loss", "ptq.delta_norm", "ptq.predicted_loss_increase",
        "hessian.quantized.top_eigenvalues", "hessian.quantized.trace",
        "qat.loss", "qat.accuracy", "qat.train_loss", "qat.total_grid_flips",
        "alignment.cosine_to_fp", "alignment.null_z", "damage.rho_max", "perturbation.hill_fraction",
    )
]
SPECTRAL = ("eigenvalue", "trace", "hill_fraction", "rho_max")


def _get(metrics: dict, path: str):
    value = metrics
    for part in path.split("."):
        value = value[part]
    return value


@pytest.mark.slow
def test_demo_model_metrics_are_pinned(tmp_path, capsys):
    ckpt, out = tmp_path / "demo.pt", tmp_path / "report"
    assert cli.main(["train", "--steps", "300", "--seed", "0", "--out", str(ckpt)]) == 0
    assert cli.main(["analyze", str(ckpt), "--bits", "4", "2", "--qat-steps", "20", "--grid-steps", "5", "--top-k", "3",
                     "--max-samples", "256", "--out", str(out)]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    now = {path: _get(metrics, path) for path in PATHS}
    if os.environ.get("RIVERSCAPE_REPIN"):
        PINNED.write_text(json.dumps(now, indent=1) + "\n")
    pinned = json.loads(PINNED.read_text())
    for path in PATHS:
        rel = 1e-5 if any(word in path for word in SPECTRAL) else 1e-6
        expected = pinned[path]
        if isinstance(expected, int):
            assert now[path] == expected, path
        else:
            assert now[path] == pytest.approx(expected, rel=rel, abs=1e-9), path
