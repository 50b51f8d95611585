"""Security and bad-input promises of the command line (README "Security" and "Bad input").

Each test reproduces one way an attacker or a careless user broke an earlier version:
code from the working directory, ``--force`` on folders riverscape did not write, files that
demand huge allocations, half/double precision checkpoints, interrupted swaps, early
signals, exit codes and noisy refusals.
"""
from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import digits_mlp_checkpoint

from riverscape import cli
from riverscape.checkpoint import load_checkpoint
from riverscape.errors import InputError
from riverscape.outdir import MARKER_NAME, atomic_output_dir
from riverscape.stage_cache import WORK_DIR

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}
QUICK = ["--bits", "2", "--qat-steps", "3", "--grid-steps", "3", "--top-k", "2", "--max-samples", "128"]
# names that sklearn, matplotlib, torch and their dependencies try to import optionally
PLANTED = ("pandas", "rich", "tabulate", "lz4", "pyarrow", "polars", "IPython", "yaml", "psutil", "cupy")


def _default_sigint() -> None:  # a suite started with `&` inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(args: list[str], cwd: Path, *, entry: str = "module", limit_bytes: int | None = None, env: dict | None = None):
    """Run the CLI as a user would: the console script (``entry="script"``) or ``python -m``."""
    script = Path(sys.executable).with_name("riverscape")
    command = [str(script)] if entry == "script" else [sys.executable, "-m", "riverscape"]

    def prepare() -> None:
        _default_sigint()
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return subprocess.run(command + args, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=300, preexec_fn=prepare)


PROGRESS_LINE = re.compile(r"^riverscape: (plan \((quick|standard|thorough)\): |budget [0-9.]+ min: preset |\[\d+/\d+\] .+: )")


def one_line_error(proc: subprocess.CompletedProcess | tuple, phrase: str, code: int = 2) -> str:
    returncode, stderr = (proc.returncode, proc.stderr) if isinstance(proc, subprocess.CompletedProcess) else proc
    assert returncode == code, f"exit {returncode}:\n{stderr}"
    # an error found after the heavy work started follows the plan and the finished-stage lines (progress, not errors)
    lines = [line for line in stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("riverscape: error: "), stderr
    assert stderr.strip().splitlines()[-1] == lines[0], stderr  # the error is the last word
    assert phrase in lines[0], lines[0]
    return lines[0]


def main_in(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(map(str, args)))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A riverscape checkpoint of the digits MLP (20 training steps, trajectory included)."""
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    digits_mlp_checkpoint(path, steps=20)
    return path


def variant(ckpt: Path, folder: Path, name: str, **changes) -> Path:
    """A copy of ``ckpt`` with top-level fields changed (``None`` removes one)."""
    content = torch.load(ckpt, weights_only=True)
    for key, value in changes.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    path = folder / name
    torch.save(content, path)
    return path


# ------------------------------------------------------------ 1. code from the working directory


def plant(folder: Path) -> Path:
    """Files named like optional dependencies that leave a marker when imported."""
    markers = folder / "markers"
    markers.mkdir()
    for name in PLANTED:
        (folder / f"{name}.py").write_text(
            f"import pathlib\npathlib.Path({str(markers)!r}, {name!r}).touch()\n"
            f"raise ModuleNotFoundError('planted', name={name!r})\n"
        )
    return markers


@pytest.mark.slow
def test_no_module_from_the_working_directory_runs(tmp_path, ckpt):
    markers = plant(tmp_path)
    shutil.copy(ckpt, tmp_path / "m.pt")
    trained = run(["train", "--steps", "20", "--out", "t.pt"], tmp_path, entry="script")
    assert trained.returncode == 0, trained.stderr
    for entry in ("script", "module"):
        proc = run(["analyze", "m.pt", *QUICK, "--out", f"report_{entry}"], tmp_path, entry=entry)
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in markers.iterdir()) == []  # not one planted file ran


def test_a_module_the_user_names_still_loads_from_the_working_directory(tmp_path, capsys, monkeypatch, ckpt):
    (tmp_path / "my_models.py").write_text(
        "import riverscape as rs\ndef make(**kw):\n    return rs.build_model('mlp', in_dim=64, out_dim=10)\n"
    )
    weights = tmp_path / "w.pt"
    torch.save(torch.load(ckpt, weights_only=True)["state_dict"], weights)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    code, err = main_in(capsys, "analyze", weights, "--model", "my_models:make", "--data", "digits", *QUICK, "--out", "r")
    assert code == 0, err
    assert sys.path == path_before  # searched for the named module only, never left on the path


# --------------------------------------------------------------------------------- 2. --force


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    fake = tmp_path / "home"
    fake.mkdir()
    monkeypatch.setenv("HOME", str(fake))
    return fake


@pytest.mark.parametrize("where", ["cwd", "parent_of_cwd", "home", "root", "user_folder", "checkpoint_folder", "parent_of_checkpoint"])
def test_force_refuses_folders_riverscape_did_not_write(tmp_path, monkeypatch, capsys, home, ckpt, where):
    work = tmp_path / "work"
    (work / "inner").mkdir(parents=True)
    user = work / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    inside = work / "inputs" / "deep"
    inside.mkdir(parents=True)
    shutil.copy(ckpt, inside / "m.pt")
    monkeypatch.chdir(work / "inner")
    out, reason = {
        "cwd": (".", "it is the working directory"),
        "parent_of_cwd": ("..", "it contains the working directory"),
        "home": (str(home), "it is the home directory"),
        "root": ("/", "it is the file-system root"),
        "user_folder": (str(user), "riverscape did not write it"),
        "checkpoint_folder": (str(inside), "it contains the input"),
        "parent_of_checkpoint": (str(work / "inputs"), "it contains the input"),
    }[where]
    (home / "keep.txt").write_text("keep")
    code, err = main_in(capsys, "analyze", inside / "m.pt", *QUICK, "--out", out, "--force")
    one_line_error((code, err), reason)
    assert (user / "thesis.tex").read_text() == "precious" and (inside / "m.pt").is_file() and (home / "keep.txt").is_file()


def test_force_replaces_only_its_own_untouched_reports(tmp_path, capsys, ckpt):
    out = tmp_path / "report"
    assert main_in(capsys, "analyze", ckpt, *QUICK, "--out", out)[0] == 0
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["writer"] == "riverscape" and "metrics.json" in marker["files"] and "report.html" in marker["files"]
    first = (out / "metrics.json").stat().st_mtime_ns
    assert main_in(capsys, "analyze", ckpt, *QUICK, "--out", out, "--force")[0] == 0
    assert (out / "metrics.json").stat().st_mtime_ns != first
    (out / "my_notes.md").write_text("mine")
    one_line_error(main_in(capsys, "analyze", ckpt, *QUICK, "--out", out, "--force"), "files riverscape did not write (my_notes.md)")
    (out / "my_notes.md").unlink()
    (out / MARKER_NAME).write_text('{"writer": "someone else", "files": []}')  # a forged or foreign marker
    one_line_error(main_in(capsys, "analyze", ckpt, *QUICK, "--out", out, "--force"), "riverscape did not write it")


def test_train_force_overwrites_only_checkpoints(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    one_line_error(main_in(capsys, "train", "--steps", "5", "--out", notes, "--force"), "it is not a PyTorch checkpoint")
    assert notes.read_text() == "precious"
    ckpt = tmp_path / "m.pt"
    assert main_in(capsys, "train", "--steps", "5", "--out", ckpt)[0] == 0
    assert main_in(capsys, "train", "--steps", "5", "--out", ckpt, "--force")[0] == 0  # its own kind of file


# ----------------------------------------------------------------------- 3. huge allocations

GB = 2**30


@pytest.fixture(scope="module")
def oversized(ckpt, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("oversized")
    big_model = {"name": "mlp", "kwargs": {"in_dim": 64, "out_dim": 10, "hidden": [160000, 160000]}}
    big_data = {"name": "teacher_linear", "kwargs": {"dim": 100000, "n_train": 1000000}}
    rows = torch.zeros(1, 2410).expand(4_000_000, 2410)  # 13 KB on disk, 38 GB once copied
    return {
        "model": variant(ckpt, folder, "model.pt", model=big_model),
        "data": variant(ckpt, folder, "data.pt", data=big_data),
        "trajectory": variant(ckpt, folder, "trajectory.pt", trajectory=rows, trajectory_steps=None),
    }


@pytest.mark.parametrize("case, phrase", [("model", "the model 'mlp' (25,612,160,010 parameters"), ("data", "the dataset 'teacher_linear'"),
                                          ("trajectory", "its trajectory (4000000, 2410)")])
def test_oversized_checkpoints_are_refused_before_allocating(oversized, tmp_path, case, phrase):
    assert oversized[case].stat().st_size < 2**20  # the file itself is small
    proc = run(["analyze", str(oversized[case]), *QUICK, "--out", "r"], tmp_path, limit_bytes=6 * GB)  # under a 6 GB address-space cap
    line = one_line_error(proc, phrase)
    assert "over the memory limit of 8.0 GB; raise it with --memory-limit" in line
    assert not (tmp_path / "r").exists()


def test_memory_limit_is_a_setting_not_a_wall(ckpt, tmp_path, capsys):
    one_line_error(main_in(capsys, "analyze", ckpt, *QUICK, "--memory-limit", "0.000001", "--out", tmp_path / "r"), "over the memory limit")
    assert main_in(capsys, "analyze", ckpt, *QUICK, "--memory-limit", "0", "--out", tmp_path / "r")[0] == 0  # 0 = no limit


def test_top_k_is_bounded_by_the_problem(ckpt, tmp_path, capsys):
    one_line_error(main_in(capsys, "analyze", ckpt, *QUICK, "--top-k", "100000000"), "top_k must be an integer from 1 to 500")
    one_line_error(main_in(capsys, "analyze", ckpt, *QUICK, "--top-k", "400", "--include", "3.weight", "--out", tmp_path / "r"),
                   "--top-k 400 asks for more eigenpairs than the 320 quantized parameters allow")


# ------------------------------------------------------------------ 4. half and double precision


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_precision_checkpoints_are_analysed(ckpt, tmp_path, capsys, dtype):
    content = torch.load(ckpt, weights_only=True)
    state = {k: v.to(dtype) for k, v in content["state_dict"].items()}
    name = str(dtype).removeprefix("torch.")
    pt = variant(ckpt, tmp_path, f"m_{name}.pt", state_dict=state, trajectory=content["trajectory"].to(dtype))
    st = tmp_path / f"m_{name}.safetensors"
    save_file(state, str(st))
    for path, extra in ((pt, []), (st, ["--model", "mlp", "--data", "digits"])):
        out = tmp_path / f"r_{path.name}"
        code, err = main_in(capsys, "analyze", path, *extra, *QUICK, "--out", out)
        assert code == 0, err
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["run"]["checkpoint_dtype"] == name and (out / "report.html").is_file()
        # the analysed weights are the stored ones: half precision is exact in float32, float64 stays float64
        loaded = load_checkpoint(pt)
        assert loaded.checkpoint_dtype == name
        assert next(loaded.model.parameters()).dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert all(torch.equal(p.to(dtype), state[k]) for k, p in loaded.model.state_dict().items())
        assert metrics["fp"]["accuracy"] > 0.5


# ------------------------------------------------------------------------ 5. the --force swap


def _written(target: Path, text: str) -> None:
    with atomic_output_dir(target, force=True) as work:
        (work / "report.html").write_text(text)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def interrupted_write(target: Path, text: str) -> None:
    """Write a report over ``target`` with Python's Ctrl-C handler; expect the interrupt to surface."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _written(target, text)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_signal_during_the_swap_leaves_old_or_new_and_nothing_else(tmp_path, monkeypatch):
    target = tmp_path / "report"
    _written(target, "old")
    real_replace = os.replace
    calls = []

    def interrupted_replace(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right while the old report is moved aside
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    interrupted_write(target, "new")
    assert len(calls) == 2  # the swap ran to its end, then the interrupt was delivered
    assert (target / "report.html").read_text() == "new" and leftovers(tmp_path) == []


def test_failed_rename_keeps_the_old_report(tmp_path, monkeypatch):
    target = tmp_path / "report"
    _written(target, "old")
    real_replace = os.replace

    def busy(src, dst):
        if Path(src) == target:
            raise OSError(errno.EBUSY, "Device or resource busy")  # e.g. a mount point
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(InputError, match="cannot replace .*Device or resource busy"):
        _written(target, "new")
    assert (target / "report.html").read_text() == "old" and leftovers(tmp_path) == []


def test_interrupt_while_deleting_the_old_report_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "report"
    _written(target, "old")
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted_rmtree)
    interrupted_write(target, "new")
    assert (target / "report.html").read_text() == "new" and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- 6. signals


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
@pytest.mark.parametrize("entry", ["script", "module"])
@pytest.mark.parametrize("delay", [0.06, 0.3, 1.0, 3.0])
def test_signals_give_one_exit_code_at_every_moment(ckpt, tmp_path, signum, code, said, entry, delay):
    """From the first imports to the analysis itself: 130 for SIGINT, 143 for SIGTERM, one line, no output."""
    command = [str(Path(sys.executable).with_name("riverscape"))] if entry == "script" else [sys.executable, "-m", "riverscape"]
    proc = subprocess.Popen([*command, "analyze", str(ckpt), "--bits", "8", "4", "2", "--out", "r"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    time.sleep(delay)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    if delay < 0.1 and ((proc.returncode == -signum and stderr == "") or
                        (proc.returncode != 0 and stderr.startswith("Fatal Python error: init_import_site"))):
        # the signal came while the interpreter itself was still starting (under load, tens of
        # milliseconds), before any riverscape code ran: the default action ends it silently,
        # which a shell reports as the same 130/143; or, a little later, Python's own KeyboardInterrupt
        # inside its site import (.pth files of the environment) ends it with Python's fatal-error
        # message. Neither is riverscape's code, and neither leaves output (checked below).
        pass
    else:
        assert proc.returncode == code, stderr
        assert stderr.strip().splitlines() == [f"riverscape: {said}"]
    left = sorted(p.name for p in tmp_path.iterdir())
    # no report; an interrupt after a finished stage keeps that stage for a re-run (riverscape.stage_cache), nothing else
    assert left == [] or (left == ["r"] and sorted(p.name for p in (tmp_path / "r").iterdir()) == [MARKER_NAME, WORK_DIR])


# ------------------------------------------------------------------------- 7. exit codes


FACTORIES = {
    "syntax": ("def make(:\n", "SyntaxError (bad.py, line 1)"),
    "import": ("import not_a_module_anywhere\ndef make(): pass\n", "raised ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    "raise": ("def make():\n    raise RuntimeError('the factory is broken')\n", "raised RuntimeError: the factory is broken"),
    "exit": ("import sys\ndef make():\n    sys.exit(0)\n", "called sys.exit(0)"),
    "not_a_module": ("def make():\n    return 42\n", "returned a int, not a torch.nn.Module"),
}


@pytest.mark.parametrize("case", sorted(FACTORIES))
def test_errors_in_the_users_factory_are_input_errors(ckpt, tmp_path, capsys, case):
    source, phrase = FACTORIES[case]
    (tmp_path / "bad.py").write_text(source)
    code, err = main_in(capsys, "analyze", ckpt, "--model", f"{tmp_path / 'bad.py'}:make", *QUICK, "--out", tmp_path / "r")
    one_line_error((code, err), phrase)
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def bad_files(ckpt, tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    folder = tmp_path_factory.mktemp("bad")
    state = torch.load(ckpt, weights_only=True)["state_dict"]

    def with_tensor(name: str, tensor: torch.Tensor) -> tuple[Path, list[str]]:
        path = folder / f"{name}.pt"
        torch.save({**state, "1.weight": tensor}, path)
        return path, ["--model", "mlp", "--data", "digits"]

    return {
        "meta": with_tensor("meta", torch.empty(32, 64, device="meta")),
        "sparse": with_tensor("sparse", state["1.weight"].to_sparse()),
        "quantized": with_tensor("quantized", torch.quantize_per_tensor(state["1.weight"], 0.1, 0, torch.qint8)),
        "complex": with_tensor("complex", state["1.weight"].to(torch.complex64)),
        "loss_type": (variant(ckpt, folder, "loss.pt", loss=5), []),
        "train_type": (variant(ckpt, folder, "train.pt", train="fast"), []),
        "steps_type": (variant(ckpt, folder, "steps.pt", trajectory_steps=["a"] * 21), []),
        "history_type": (variant(ckpt, folder, "history.pt", loss_history=["x"]), []),
        "zero_weights": (variant(ckpt, folder, "zero.pt", state_dict={k: torch.zeros_like(v) for k, v in state.items()}, trajectory=None), []),
        "saturated": (variant(ckpt, folder, "saturated.pt", state_dict={k: v * 1e4 for k, v in state.items()}, trajectory=None), []),
        "nan_trajectory": (variant(ckpt, folder, "nan_trajectory.pt", trajectory=torch.full((21, 2410), float("nan"))), []),
        "fifo": (_fifo(folder / "pipe.pt"), []),
    }


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


BAD_PHRASES = {
    "meta": "tensor '1.weight' is a meta tensor",
    "sparse": "tensor '1.weight' is a sparse tensor",
    "quantized": "tensor '1.weight' is a torch quantized tensor",
    "complex": "tensor '1.weight' is complex (complex64)",
    "loss_type": "field 'loss' must be a loss name",
    "train_type": "field 'train' must be a dict",
    "steps_type": "'trajectory_steps' must be a list of integers",
    "history_type": "field 'loss_history' must be a list of numbers",
    "zero_weights": "the Hessian eigensolver failed",
    "saturated": "the Hessian eigensolver failed",
    "nan_trajectory": "the training trajectory contains NaN or inf",
    "fifo": "is not a regular file",
}


@pytest.mark.parametrize("case", sorted(BAD_PHRASES))
def test_bad_checkpoints_are_input_errors(bad_files, tmp_path, capsys, case):
    path, extra = bad_files[case]
    one_line_error(main_in(capsys, "analyze", path, *extra, *QUICK, "--out", tmp_path / "r"), BAD_PHRASES[case])
    assert not (tmp_path / "r").exists()


def test_bad_arguments_are_input_errors(ckpt, tmp_path, capsys):
    one_line_error(main_in(capsys, "analyze", ckpt, *QUICK, "--device", "meta"), "device 'meta' holds no values")
    one_line_error(main_in(capsys, "analyze", ckpt, "--model", "mlp", "--model-kwargs", '{"in_dim": 64, "out_dim": 10, "hidden": [-5]}',
                           *QUICK), "negative dimension -5")
    one_line_error(main_in(capsys, "train", "--model-kwargs", '{"hidden": [160000, 160000]}', "--out", tmp_path / "t.pt"),
                   "over the memory limit")
    one_line_error(main_in(capsys, "analyze", ckpt, *QUICK, "--memory-limit", "-1"), "--memory-limit takes a size in GB")


@pytest.mark.parametrize("failure, phrase", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"),
     "no space left on the device"),
])
def test_a_full_disk_is_an_environment_error(ckpt, tmp_path, capsys, monkeypatch, failure, phrase):
    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(cli, "run_analysis", full_disk)
    one_line_error(main_in(capsys, "analyze", ckpt, *QUICK, "--out", tmp_path / "r"), phrase)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_riverscape_bug_says_so(ckpt, tmp_path, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "run_analysis", bug)
    line = one_line_error(main_in(capsys, "analyze", ckpt, *QUICK, "--out", tmp_path / "r"), "unexpected KeyError", code=1)
    assert "this is a riverscape bug: please report it" in line and "--debug" in line


# ----------------------------------------------------------------------------------- 8. noise


class _Payload:
    def __reduce__(self):
        return (print, ("this must never print",))


@pytest.mark.parametrize("protocol, zipped", [(2, True), (4, True), (5, False)])
def test_pickle_refusal_is_one_line_of_our_own_advice(ckpt, tmp_path, protocol, zipped):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": _Payload()}, path, pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
    proc = run(["analyze", str(path), "--model", "mlp", "--data", "digits", *QUICK], tmp_path)
    line = one_line_error(proc, "contains pickled Python objects")
    assert "--trust-checkpoint" in line and "weights_only" not in line and "this must never print" not in proc.stdout + proc.stderr
