"""The README's commands are what CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    # Besides the README's command, .ci/run may only set up the shell and run its helper scripts (`bash .ci/...`).
    ci_lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines()
                if l.strip() and not l.startswith(("#", "set ", "cd ", "export ", "bash .ci/"))]
    assert len(ci_lines) == 1, ci_lines
    assert ci_lines[0] in readme
    assert "pip install torch==2.13.0 -e . && riverscape demo" in readme


def test_readme_python_examples_run_in_order(tmp_path, monkeypatch):
    """Every ```python block of the README runs, in order, in one namespace (as a reader would)."""
    import re

    import torch

    monkeypatch.chdir(tmp_path)  # the examples save figures and pages: keep them out of the checkout

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 7
    namespace: dict = {}
    torch.manual_seed(0)
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
