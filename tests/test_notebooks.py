"""Run every notebook in ``notebooks/`` top to bottom in a clean kernel, in quick mode, and check its outputs.

The kernel is started from a kernelspec written for *this* interpreter (``sys.executable``) in a
temporary directory, so the notebooks import the riverscape installed here even when a
``python3`` kernelspec elsewhere points at another Python. ``RIVERSCAPE_NOTEBOOK_QUICK=1`` makes
each notebook shrink its training steps, grids and sample counts; the repository root is the
working directory, as when a user runs ``jupyter`` there.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
KERNEL_NAME = "python3"
CELL_TIMEOUT = 300  # seconds per cell; quick cells take a few seconds, the slack is for a loaded CI machine
PLOTLY_MIME = "application/vnd.plotly.v1+json"
PROBE = "import sys\nprint('KERNEL_EXECUTABLE=' + sys.executable)"


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A directory holding a ``python3`` kernelspec that launches ``sys.executable``."""
    root = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(path=root / KERNEL_NAME)
    return [str(root)]


def run_notebook(name: str, kernel_dirs: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[nbformat.NotebookNode, str]:
    """Execute ``notebooks/<name>`` with a probe cell first; return the executed notebook and its stdout.

    Raises ``nbclient.exceptions.CellExecutionError`` (with the cell and traceback) on any cell error.
    """
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    check_stripped(nb, name)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    monkeypatch.setenv("RIVERSCAPE_NOTEBOOK_QUICK", "1")
    manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    client = NotebookClient(nb, km=manager, timeout=CELL_TIMEOUT, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(REPO)}})
    client.execute()
    stdout = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")
    match = re.search(r"KERNEL_EXECUTABLE=(.+)", stdout)
    assert match is not None, "the probe cell printed nothing"
    assert os.path.realpath(match.group(1).strip()) == os.path.realpath(sys.executable), "the kernel runs another interpreter"
    return nb, stdout


def check_stripped(nb: nbformat.NotebookNode, name: str) -> None:
    """Committed notebooks carry no outputs or execution counts and are valid nbformat."""
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.execution_count is None and cell.outputs == [], f"{name}: cell {index} has outputs; commit it stripped"


def plotly_outputs(nb: nbformat.NotebookNode) -> int:
    return sum(PLOTLY_MIME in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def result_fields(stdout: str, tag: str = "RESULT") -> dict[str, str]:
    """``key=value`` pairs of the last line starting with ``tag``."""
    lines = [line for line in stdout.splitlines() if line.startswith(tag + " ")]
    assert lines, f"no {tag} line in the notebook output"
    return dict(item.split("=", 1) for item in lines[-1].split()[1:])


def test_notebooks_are_all_tested() -> None:
    tested = {"01_quickstart.ipynb", "02_landscape_explorer.ipynb", "03_ptq_vs_qat.ipynb"}
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == tested


def test_quickstart(kernel_dirs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    nb, stdout = run_notebook("01_quickstart.ipynb", kernel_dirs, monkeypatch)
    assert "quick mode: True" in stdout
    fields = {k: float(v) for k, v in result_fields(stdout).items() if k != "bits"}
    # the story the notebook tells: 2-bit PTQ loses accuracy and a short QAT wins part of it back
    assert fields["ptq_accuracy"] < fields["fp_accuracy"]
    assert fields["qat_accuracy"] > fields["ptq_accuracy"]
    # float32 central difference with eps = 1e-3: rounding ~1e-7/1e-3 plus O(eps^2) truncation, far below 1e-2
    hvp_error = float(re.search(r"\|Hv - finite difference\| / \|Hv\| = (\S+)", stdout).group(1))
    assert hvp_error < 1e-2
    assert plotly_outputs(nb) == 4  # spectrum, density, side-by-side slices, QAT curve


def test_landscape_explorer(kernel_dirs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    nb, stdout = run_notebook("02_landscape_explorer.ipynb", kernel_dirs, monkeypatch)
    assert "11x11 grids" in stdout and "quick=True" in stdout
    # on the plane through θ_fp, Q(θ_fp) and QAT (basis scaled to |δ|), PTQ sits at (1, 0) on the plane
    ptq_rows = re.findall(r"Q\(θ_fp\) \(PTQ\)\s+α=\s*(\S+)\s+β=\s*(\S+)\s+distance from the plane (\S+)", stdout)
    alpha, beta, distance = (float(v) for v in ptq_rows[-1])
    assert abs(alpha - 1.0) < 1e-3 and abs(beta) < 1e-3 and distance < 1e-3
    # 2-bit PTQ of the digits MLP leaves the quadratic basin: the breakdown scale comes before t = 1
    t_b = float(re.search(r"t_b = (\S+)", stdout).group(1))
    assert 0.0 < t_b < 1.0
    assert plotly_outputs(nb) == 4  # three planes and the 1-D profile


def test_ptq_vs_qat(kernel_dirs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    nb, stdout = run_notebook("03_ptq_vs_qat.ipynb", kernel_dirs, monkeypatch)
    assert "running experiments/ptq_vs_qat.py --quick" in stdout  # quick mode never reads a stale runs/ directory
    fields = result_fields(stdout)
    assert int(fields["cells"]) > 0 and int(fields["models"]) >= 1
    # experiment 1's headline at its lowest bit-width: min-max PTQ collapses, QAT from the same point does not
    assert float(fields["qat_accuracy"]) > float(fields["ptq_minmax_accuracy"])
    # per model: accuracy, damage and alignment (and hill fraction) figures, plus QAT curves and stored slices
    assert plotly_outputs(nb) >= 4 * int(fields["models"])
