"""The command line, run as a real subprocess (``python -m riverscape``), and atomic outputs."""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

import riverscape as rs
from riverscape import cli
from riverscape.checkpoint import LoadedCheckpoint, ResolvedData, make_spec, save_checkpoint
from riverscape.analysis_options import AnalyzeOptions
from riverscape.errors import InputError
from riverscape.outdir import MARKER_NAME, atomic_output_dir, atomic_output_file, check_output_dir

ROOT = Path(__file__).resolve().parents[1]
# Run this source tree (not whatever `riverscape` is installed), one thread per process.
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}
TIMEOUT = 180


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "riverscape", *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, phrase: str, code: int = 2) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("riverscape: error: ") and phrase in lines[0], lines[0]


def fill(template: list[str], names: dict[str, str]) -> list[str]:
    """Replace whole-argument placeholders such as "{ckpt}" by paths."""
    return [names[a[1:-1]] if a[:1] + a[-1:] == "{}" and a[1:-1] in names else a for a in template]


def listing(directory: Path) -> list[str]:
    """Everything below ``directory`` except riverscape's output markers (tested on their own)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.name != MARKER_NAME)


# ------------------------------------------------------------------------------- inputs


class _CreatesMarker:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint files, good and bad, built in-process (no subprocess needed)."""
    folder = tmp_path_factory.mktemp("inputs")
    ds = rs.load_dataset("digits")
    kwargs = ds.model_kwargs("mlp")
    torch.manual_seed(0)
    result = rs.train(rs.build_model("mlp", **kwargs), ds, steps=10, lr=1e-2, seed=0)
    paths = {name: folder / f"{name}.pt" for name in ("ckpt", "empty", "truncated", "text", "misfit", "nan", "module", "evil")}
    save_checkpoint(paths["ckpt"], result.model, model_spec=make_spec("mlp", kwargs), data_spec="digits", loss="cross_entropy",
                    train_result=result)
    paths["empty"].write_bytes(b"")
    paths["truncated"].write_bytes(paths["ckpt"].read_bytes()[:5000])
    paths["text"].write_text("this is not a checkpoint\n")
    torch.save(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).state_dict(), paths["misfit"])
    broken = rs.build_model("mlp", **kwargs)
    with torch.no_grad():
        broken[1].weight.fill_(float("nan"))
    save_checkpoint(paths["nan"], broken, model_spec=make_spec("mlp", kwargs), data_spec="digits", loss="cross_entropy")
    torch.save(broken, paths["module"])
    paths["marker"] = folder / "pwned"
    torch.save({"state_dict": broken.state_dict(), "payload": _CreatesMarker(str(paths["marker"]))}, paths["evil"])
    paths["existing"] = folder / "existing.pt"
    paths["existing"].write_bytes(b"keep me")
    return paths


# ------------------------------------------------------------------- basic commands


def test_version_and_help(tmp_path):
    version = run_cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"riverscape {rs.__version__}"
    main_help = run_cli("--help", cwd=tmp_path)
    assert main_help.returncode == 0
    assert all(word in main_help.stdout for word in ("train", "analyze", "demo", "examples:"))
    assert listing(tmp_path) == []


@pytest.mark.parametrize("command", ["train", "analyze", "demo"])
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0 and text.startswith(f"usage: riverscape {command}")
    expected = {
        "train": ("--out FILE", "--model SPEC", "--steps", "--hidden", "examples:", "weights_only=True"),
        "analyze": ("--bits", "--trust-checkpoint", "--model SPEC", "--data SPEC", "--out DIR", "--force", "--json",
                    "--qat-estimator", "--debug", "examples:", "security:"),
        "demo": ("--seed",),
    }[command]
    for option in expected:
        assert option in text, option


def test_train_writes_a_safe_checkpoint_with_trajectory(tmp_path):
    proc = run_cli("train", "--model", "mlp", "--data", "digits", "--steps", "30", "--record-every", "10", "--hidden", "16",
                   "--out", "mlp.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wrote mlp.pt: mlp on digits, 1210 parameters, 4 trajectory points, test loss ")
    checkpoint = torch.load(tmp_path / "mlp.pt", weights_only=True)
    assert checkpoint["format"] == "riverscape-checkpoint"
    assert checkpoint["model"] == {"name": "mlp", "kwargs": {"in_dim": 64, "out_dim": 10, "hidden": [16]}}
    assert checkpoint["data"] == {"name": "digits", "kwargs": {}} and checkpoint["loss"] == "cross_entropy"
    # 64*16+16 + 16*10+10 = 1210 trainable parameters, rows at steps 0, 10, 20, 30
    assert checkpoint["trajectory"].shape == (4, 1210) and checkpoint["trajectory_steps"] == [0, 10, 20, 30]
    assert checkpoint["train"] == {"steps": 30, "lr": 0.01, "optimizer": "adam", "batch_size": 128, "record_every": 10, "seed": 0}
    final = torch.cat([v.reshape(-1) for k, v in checkpoint["state_dict"].items()])
    assert torch.equal(final, checkpoint["trajectory"][-1])  # state dict order == parameter order (no buffers in the MLP)
    assert 0.0 <= checkpoint["metrics"]["test_accuracy"] <= 1.0 and len(checkpoint["loss_history"]) == 30
    assert listing(tmp_path) == ["mlp.pt"]


# ------------------------------------------------------------------------ bad inputs

BAD_INPUTS = {
    "missing": (["analyze", "nope.pt"], "checkpoint not found: 'nope.pt'"),
    "empty": (["analyze", "{empty}"], "is empty (0 bytes)"),
    "truncated": (["analyze", "{truncated}"], "is truncated or corrupt"),
    "not_a_checkpoint": (["analyze", "{text}"], "is a text file, not a checkpoint"),
    "state_dict_misfit": (
        ["analyze", "{misfit}", "--model", "mlp", "--data", "digits"],
        "state dict does not fit the model 'mlp': 4 missing keys (1.weight, 1.bias, 3.weight, 3.bias); "
        "4 unexpected keys (0.weight, 0.bias, 2.weight, 2.bias)",
    ),
    "bits_0": (["analyze", "{ckpt}", "--bits", "0"], "bits must be integers from 1 to 16, got 0"),
    "bits_99": (["analyze", "{ckpt}", "--bits", "4", "99"], "bits must be integers from 1 to 16, got 99"),
    "data_shape": (
        ["analyze", "{ckpt}", "--data", "mnist1d", "--data-kwargs", '{"num_samples": 200}'],
        "data shape does not fit the model: input batch (8, 40) float32",
    ),
    "nan_weights": (["analyze", "{nan}"], "the loss is nan on the first batch"),
    "existing_out_dir": (["analyze", "{ckpt}"], "output directory 'riverscape-report/ckpt' already exists; pass --force"),
    "pickled_module": (["analyze", "{module}", "--data", "digits"], "loading it could execute arbitrary code. If you trust its source, rerun with --trust-checkpoint"),
    "code_executing_pickle": (["analyze", "{evil}", "--model", "mlp", "--data", "digits"], "contains pickled Python objects (it needs io.open)"),
    "train_existing_out": (["train", "--out", "{existing}"], "already exists; pass --force to overwrite it"),
}


@pytest.fixture(scope="module")
def bad_input_runs(inputs, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Run every bad-input case once, two at a time, each in its own empty directory."""

    def run(case: str) -> tuple[Path, subprocess.CompletedProcess]:
        cwd = tmp_path_factory.mktemp(case)
        if case == "existing_out_dir":
            (cwd / "riverscape-report" / "ckpt").mkdir(parents=True)
            (cwd / "riverscape-report" / "ckpt" / "keep.txt").write_text("old report")
        return cwd, run_cli(*fill(BAD_INPUTS[case][0], {k: str(v) for k, v in inputs.items()}), cwd=cwd)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(BAD_INPUTS, pool.map(run, BAD_INPUTS)))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_exit_2_and_no_output(case, bad_input_runs, inputs):
    cwd, proc = bad_input_runs[case]
    assert_one_line_error(proc, BAD_INPUTS[case][1])
    assert proc.stdout == ""
    if case == "existing_out_dir":  # the old report is untouched
        assert listing(cwd) == ["riverscape-report", "riverscape-report/ckpt", "riverscape-report/ckpt/keep.txt"]
        assert (cwd / "riverscape-report/ckpt/keep.txt").read_text() == "old report"
    else:
        assert listing(cwd) == []
    if case == "code_executing_pickle":
        assert not inputs["marker"].exists()  # the payload never ran
    if case == "train_existing_out":
        assert inputs["existing"].read_bytes() == b"keep me"


IN_PROCESS_BAD_INPUTS = {
    "no_architecture": (["analyze", "{misfit}", "--data", "digits"], "holds weights but not the architecture: pass --model"),
    "unknown_model": (["analyze", "{misfit}", "--model", "mlpp", "--data", "digits"], "unknown model 'mlpp'; built-in models are"),
    "bad_json": (["analyze", "{ckpt}", "--model-kwargs", "{in_dim: 64}"], "--model-kwargs is not valid JSON"),
    "unknown_option": (["analyze", "{ckpt}", "--bitz", "2"], "unrecognized arguments: --bitz 2"),
    "bad_range": (["analyze", "{ckpt}", "--range", "max"], "argument --range: invalid choice: 'max'"),
    "trusted_module_misfit": (["analyze", "{module}", "--trust-checkpoint", "--data", "mnist1d", "--data-kwargs", '{"num_samples": 50}'],
                              "data shape does not fit the model"),
    "diverging_training": (["train", "--model", "linear", "--data", "teacher_linear", "--optimizer", "sgd", "--lr", "100",
                            "--steps", "200", "--out", "diverged.pt"], "training loss became inf"),
    "negative_steps": (["train", "--steps", "-3", "--out", "x.pt"], "--steps must be positive, got -3"),
}


@pytest.mark.parametrize("case", list(IN_PROCESS_BAD_INPUTS))
def test_more_bad_inputs_in_process(case, inputs, tmp_path, monkeypatch, capsys):
    """Same code path as the subprocess cases (cli.main), without paying a Python start-up each."""
    monkeypatch.chdir(tmp_path)
    argv = fill(IN_PROCESS_BAD_INPUTS[case][0], {k: str(v) for k, v in inputs.items()})
    try:
        with warnings.catch_warnings():
            # riverscape/train.py formats the diverged loss with float(value) on a tensor that
            # requires grad, which makes torch warn before the error is raised (see report)
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
            code = cli.main(argv)
    except SystemExit as exc:  # argparse errors exit from the parser
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("riverscape: error: ") and IN_PROCESS_BAD_INPUTS[case][1] in lines[0], captured.err
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------- signals

_ANNOUNCE_TRAIN = """
import sys
import riverscape.training as training
real_train = training.train
def announced(*args, **kwargs):
    print("READY", flush=True)
    return real_train(*args, **kwargs)
training.train = announced
from riverscape.cli import main
sys.exit(main(sys.argv[1:]))
"""

_FAKE_SLOW_ANALYSIS = """
import sys, time
import riverscape.cli as cli
def analyze(loaded, data, options, out_dir, cache=None):
    (out_dir / "report.html").write_text("<html>half written</html>")
    print("READY", flush=True)
    time.sleep(300)
cli.run_analysis = analyze
sys.exit(cli.main(sys.argv[1:]))
"""


def interrupt_when_ready(script: str, args: list[str], cwd: Path, signum: int) -> subprocess.CompletedProcess:
    """Start ``python -c script args``, wait for it to print READY, send ``signum``."""
    # a suite started in the background (`pytest &`) inherits SIGINT ignored, and Python then keeps
    # ignoring it: give the child the default disposition, as an interactive user's process has
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=TIMEOUT), "the command never became ready"
            line = proc.stdout.readline()
            assert line.strip() == "READY", line + proc.stderr.read()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_ctrl_c_during_training_exits_130_without_output(tmp_path):
    proc = interrupt_when_ready(_ANNOUNCE_TRAIN, ["train", "--steps", "100000000", "--out", "long.pt"], tmp_path, signal.SIGINT)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["riverscape: interrupted"]
    assert listing(tmp_path) == []


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupted_analysis_leaves_no_partial_report(tmp_path, inputs, signum, code, said):
    proc = interrupt_when_ready(_FAKE_SLOW_ANALYSIS, ["analyze", str(inputs["ckpt"])], tmp_path, signum)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"riverscape: {said}"]
    assert listing(tmp_path) == []  # neither riverscape-report/ckpt, nor a hidden .partial directory, nor the parent


# --------------------------------------------------------- the analysis seam (in-process)


def test_analyze_calls_the_analysis_and_writes_metrics_atomically(tmp_path, inputs, monkeypatch, capsys):
    seen = {}

    def analyze(loaded, data, options, out_dir, cache=None):
        seen.update(loaded=loaded, data=data, options=options, out_dir=out_dir)
        (out_dir / "report.html").write_text("<html></html>")
        return {"ptq": {"2": {"loss": 1.5, "accuracy": float("nan")}}, "eigenvalues": torch.tensor([3.0, 1.0])}

    monkeypatch.setattr(cli, "run_analysis", analyze)
    out = tmp_path / "reports" / "run1"
    code = cli.main(["analyze", str(inputs["ckpt"]), "--bits", "4,2", "--out", str(out), "--max-samples", "0", "--json"])
    assert code == 0
    assert isinstance(seen["loaded"], LoadedCheckpoint) and seen["loaded"].loss == "cross_entropy"
    assert seen["loaded"].trajectory.shape == (11, 2410)  # 10 steps, one row per step and not seen["loaded"].model.training
    assert isinstance(seen["data"], ResolvedData) and seen["data"].spec == {"name": "digits", "kwargs": {}}
    assert seen["options"] == AnalyzeOptions(bits=(4, 2), max_samples=0)
    assert seen["out_dir"] != out and seen["out_dir"].parent == out.parent and not seen["out_dir"].exists()
    assert listing(out) == ["metrics.json", "report.html"] and (out / MARKER_NAME).is_file()
    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(capsys.readouterr().out)  # --json prints exactly what was written
    assert written["ptq"] == {"2": {"loss": 1.5, "accuracy": None}} and written["eigenvalues"] == [3.0, 1.0]
    assert written["run"]["options"]["bits"] == [4, 2] and written["run"]["source_format"] == "riverscape"
    assert sorted(p.name for p in out.parent.iterdir()) == ["run1"]  # no temporary sibling left


def test_failing_analysis_leaves_nothing_and_points_to_debug(tmp_path, inputs, monkeypatch, capsys):
    def analyze(loaded, data, options, out_dir, cache=None):
        (out_dir / "report.html").write_text("half")
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli, "run_analysis", analyze)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["analyze", str(inputs["ckpt"])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "riverscape: error: unexpected ZeroDivisionError: boom; this is a riverscape bug: please report it with the output "
        "of the same command with --debug"
    ]
    assert listing(tmp_path) == []
    assert cli.main(["analyze", str(inputs["ckpt"]), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_force_replaces_an_existing_report(tmp_path, inputs, monkeypatch):
    monkeypatch.setattr(cli, "run_analysis", lambda *a, **k: {"x": 1})
    out = tmp_path / "report"
    out.mkdir()
    assert cli.main(["analyze", str(inputs["ckpt"]), "--out", str(out)]) == 0  # an empty folder is fine
    assert cli.main(["analyze", str(inputs["ckpt"]), "--out", str(out)]) == 2  # now it exists
    assert cli.main(["analyze", str(inputs["ckpt"]), "--out", str(out), "--force"]) == 0  # riverscape wrote it
    assert listing(out) == ["metrics.json"] and (out / MARKER_NAME).is_file()
    (out / "stale.txt").write_text("old")  # a file riverscape did not write: --force must not delete it
    assert cli.main(["analyze", str(inputs["ckpt"]), "--out", str(out), "--force"]) == 2
    assert listing(out) == ["metrics.json", "stale.txt"]


# ---------------------------------------------------------------------- atomic outputs


def test_atomic_dir_success_moves_files_into_place(tmp_path):
    target = tmp_path / "a" / "b" / "report"
    with atomic_output_dir(target) as work:
        assert work.parent == target.parent and work.name.startswith(".report.")
        (work / "metrics.json").write_text("{}")
        (work / "figs").mkdir()
        (work / "figs" / "x.png").write_bytes(b"png")
        assert not target.exists()
    assert listing(target) == ["figs", "figs/x.png", "metrics.json"]
    assert listing(tmp_path) == ["a", "a/b", "a/b/report", "a/b/report/figs", "a/b/report/figs/x.png", "a/b/report/metrics.json"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_dir_failure_leaves_nothing(tmp_path, error):
    target = tmp_path / "new_parent" / "report"
    with pytest.raises(type(error)):
        with atomic_output_dir(target) as work:
            (work / "half.html").write_text("x")
            raise error
    assert listing(tmp_path) == []  # not the report, not its temporary, not the parent it created


def test_atomic_dir_existing_needs_force(tmp_path):
    target = tmp_path / "report"
    with atomic_output_dir(target) as work:
        (work / "old.txt").write_text("old")
    entered = False
    with pytest.raises(InputError, match="already exists; pass --force"):
        with atomic_output_dir(target):
            entered = True
    assert not entered and listing(tmp_path) == ["report", "report/old.txt"]
    with atomic_output_dir(target, force=True) as work:
        (work / "new.txt").write_text("new")
    assert listing(tmp_path) == ["report", "report/new.txt"]
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target, force=True) as work:
            raise RuntimeError
    assert listing(tmp_path) == ["report", "report/new.txt"]  # a failed forced run keeps the old output
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file", force=True)


def test_atomic_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    with pytest.raises(ValueError):
        with atomic_output_file(target) as work:
            work.write_bytes(b"half")
            raise ValueError
    assert listing(tmp_path) == []
    with atomic_output_file(target) as work:
        work.write_bytes(b"done")
    assert target.read_bytes() == b"done" and listing(tmp_path) == ["ckpt.pt"]
    with pytest.raises(InputError, match="already exists; pass --force"):
        with atomic_output_file(target):
            pass
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
