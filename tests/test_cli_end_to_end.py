"""End to end: the real ``riverscape`` console script with the real analysis, in subprocesses.

``tests/test_cli.py`` covers argument errors and atomic outputs with a fake analysis; here every
command runs the whole pipeline (load -> analyse -> report) on small settings. All subprocesses
are started by one module fixture, two at a time, so the file costs about one CPU-minute.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import riverscape as rs
from riverscape.budget import BUDGETS
from riverscape.outdir import MARKER_NAME

pytestmark = pytest.mark.slow  # ~100 CPU-seconds of subprocesses, two at a time

ROOT = Path(__file__).resolve().parents[1]
# Run this source tree (PYTHONPATH comes before site-packages), one intra-op thread per process.
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}
TIMEOUT = 300
WORKERS = max(1, min(2, os.cpu_count() or 1))
SAMPLES = 256
TOP_K = 3
SMALL = ["--qat-steps", "30", "--grid-steps", "9", "--max-samples", str(SAMPLES), "--top-k", str(TOP_K)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def console_script() -> list[str]:
    """The installed ``riverscape`` entry point next to this interpreter, else ``python -m riverscape``."""
    script = Path(sys.executable).parent / "riverscape"
    return [str(script)] if script.is_file() and os.access(script, os.X_OK) else [sys.executable, "-m", "riverscape"]


FACTORIES = '''
from torch import nn


def make_net():
    """The layout of riverscape's digits MLP (keys 1.weight ... 3.bias): 64 -> 32 -> 10, tanh."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


class NanOutput(nn.Module):
    """make_net() whose output is NaN for batches of at least ``min_batch`` samples."""

    def __init__(self, min_batch):
        super().__init__()
        self.net = make_net()
        self.min_batch = min_batch

    def forward(self, x):
        out = self.net(x)
        return out * float("nan") if x.shape[0] >= self.min_batch else out


def make_nan_net():
    return NanOutput(min_batch=1)


def make_nan_on_full_batches():
    """Finite on the CLI's 8-sample sanity check, NaN on the analysis set (caught inside the analysis)."""
    return NanOutput(min_batch=9)
'''


class _CreatesMarker:
    """Unpickling this object calls ``open(marker, "w")``: code execution that leaves a file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_module_with_payload(path: Path, marker: Path, net: nn.Module) -> None:
    module = nn.Sequential(*net)  # a whole nn.Module, pickled with a code-running attribute
    module.payload = _CreatesMarker(marker)
    torch.save(module, path)


# --------------------------------------------------------------------------- the runs


@dataclass
class Runs:
    work: Path
    procs: dict[str, subprocess.CompletedProcess]
    files: dict[str, Path]
    net: nn.Module  # the in-process trained make_net() behind the state-dict files

    def ok(self, name: str) -> subprocess.CompletedProcess:
        proc = self.procs[name]
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def metrics(self, name: str) -> dict:
        self.ok(name)
        return json.loads((self.work / name / "metrics.json").read_text())


def _make_inputs(work: Path) -> tuple[dict[str, Path], nn.Module]:
    """Factory file and checkpoint files in every supported format (built in-process, in seconds)."""
    from safetensors.torch import save_file

    factories = work / "nets.py"
    factories.write_text(FACTORIES)
    spec = importlib.util.spec_from_file_location("e2e_nets", factories)
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    ds = rs.load_dataset("digits")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = rs.train(nets.make_net(), ds, steps=300, lr=1e-2, seed=0, progress=False).model
        nan_nets = {name: getattr(nets, name)() for name in ("make_nan_net", "make_nan_on_full_batches")}
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    files = {name: work / name for name in ("bare.pt", "nested.pt", "weights.safetensors", "nan.pt", "nan_late.pt", "evil.pt", "control.pt")}
    torch.save(state, files["bare.pt"])
    torch.save({"model_state_dict": state, "epoch": 7, "optimizer_state_dict": {}}, files["nested.pt"])
    save_file(state, str(files["weights.safetensors"]))
    torch.save(nan_nets["make_nan_net"].state_dict(), files["nan.pt"])
    torch.save(nan_nets["make_nan_on_full_batches"].state_dict(), files["nan_late.pt"])
    files["marker"], files["control_marker"] = work / "pwned", work / "control_pwned"
    _pickled_module_with_payload(files["evil.pt"], files["marker"], net)
    _pickled_module_with_payload(files["control.pt"], files["control_marker"], net)
    return files, net


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*console_script(), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


MODEL_KWARGS = json.dumps({"in_dim": 64, "out_dim": 10})
# name -> arguments; the output directory of each analysis is its name
INDEPENDENT = {
    "demo": ["demo", "--out", "demo", "--qat-steps", "30"],
    "bare": ["analyze", "bare.pt", "--model", "nets.py:make_net", "--data", "digits", "--bits", "2", *SMALL, "--qat-steps", "0", "--out", "bare"],
    "nested": ["analyze", "nested.pt", "--model", "nets.py:make_net", "--data", "digits", "--bits", "2", *SMALL, "--out", "nested"],
    "safetensors": ["analyze", "weights.safetensors", "--model", "mlp", "--model-kwargs", MODEL_KWARGS, "--data", "digits", "--bits", "2", *SMALL,
                    "--out", "safetensors"],
    "nan": ["analyze", "nan.pt", "--model", "nets.py:make_nan_net", "--data", "digits", "--bits", "2", *SMALL, "--out", "nan"],
    "nan_late": ["analyze", "nan_late.pt", "--model", "nets.py:make_nan_on_full_batches", "--data", "digits", "--bits", "2", *SMALL,
                 "--out", "nan_late"],
    "evil": ["analyze", "evil.pt", "--data", "digits", "--bits", "2", *SMALL, "--out", "evil"],
}
TRAIN = ["train", "--model", "mlp", "--hidden", "16", "--data", "digits", "--steps", "200", "--record-every", "20", "--out", "trained.pt"]
ON_TRAINED = {  # need trained.pt
    "seed0": ["analyze", "trained.pt", "--bits", "4", "2", *SMALL, "--json", "--out", "seed0"],
    "seed0_again": ["analyze", "trained.pt", "--bits", "4", "2", *SMALL, "--out", "seed0_again"],
    "seed1": ["analyze", "trained.pt", "--bits", "4", "2", *SMALL, "--seed", "1", "--out", "seed1"],
    "quick": ["analyze", "trained.pt", "--bits", "2", "--budget", "quick", "--skip", "slices,density", "--skip", "paths", "--out", "quick"],
    "methods": ["analyze", "trained.pt", "--bits", "2", "--ptq", "gptq,rtn,adaround", *SMALL, "--qat-steps", "0", "--out", "methods"],
    "minutes": ["analyze", "trained.pt", "--bits", "2", "--budget", "0.25", "--top-k", "2", "--qat-steps", "0", "--out", "minutes"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    work = tmp_path_factory.mktemp("e2e")
    files, net = _make_inputs(work)
    futures = {}
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures["train"] = pool.submit(_run, TRAIN, work)
        for name, args in INDEPENDENT.items():
            futures[name] = pool.submit(_run, args, work)
        futures["train"].result()  # the analyses of trained.pt wait for it (and fail visibly if it failed)
        for name, args in ON_TRAINED.items():
            futures[name] = pool.submit(_run, args, work)
        done = {name: future.result() for name, future in futures.items()}
    return Runs(work, done, files, net)


# ----------------------------------------------------------------------------- checks


def get(metrics: dict, dotted: str) -> Any:
    value = metrics
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"metrics.json has no {dotted!r} (stopped at {part!r})"
        value = value[part]
    return value


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_metrics(m: dict, *, bits: int, n_params: int, n_quantized: int, qat: bool, samples: tuple[int, int] = (SAMPLES, SAMPLES),
                  top_k: int = TOP_K) -> None:
    """The documented keys of metrics.json, with types and ranges; ``samples`` = (analysis, evaluation) set sizes."""
    assert get(m, "bits") == bits and get(m, "n_params") == n_params and m["n_quantized"] == n_quantized
    assert (m["analysis_samples"], m["eval_samples"]) == samples and m["eval_split"] == "test"
    for key in ("fp.loss", "ptq.loss", "ptq.predicted_loss_increase", "hessian.fp.trace", "alignment.cosine_to_fp"):
        assert finite(get(m, key)), (key, get(m, key))
    assert get(m, "fp.loss") > 0 and get(m, "ptq.loss") > 0
    for key in ("fp.accuracy", "ptq.accuracy", "perturbation.hill_fraction"):
        assert finite(get(m, key)) and 0.0 <= get(m, key) <= 1.0, (key, get(m, key))
    # accuracies are counts over the evaluation samples
    correct = get(m, "fp.accuracy") * samples[1]
    assert abs(correct - round(correct)) < 1e-4  # a float32 mean: relative error ~6e-8, times <= 1024 samples
    for point in ("fp", "quantized"):
        eigenvalues = get(m, f"hessian.{point}.top_eigenvalues")
        assert len(eigenvalues) == top_k and all(map(finite, eigenvalues)), eigenvalues
        assert eigenvalues == sorted(eigenvalues, reverse=True), eigenvalues
    # A trained net sits near a minimum: a positive top eigenvalue, and a trace (sum over
    # ~1000 mostly non-negative eigenvalues) well above it (measured: trace 10, lambda_1 1.7).
    top_fp = get(m, "hessian.fp.top_eigenvalues")[0]
    assert top_fp > 0 and get(m, "hessian.fp.trace") > top_fp
    assert -1.0 <= get(m, "alignment.cosine_to_fp") <= 1.0
    assert abs(get(m, "alignment.random_baseline") - 1.0 / math.sqrt(n_quantized)) <= 1e-9
    if qat:
        assert finite(get(m, "qat.accuracy")) and 0.0 <= get(m, "qat.accuracy") <= 1.0
        assert get(m, "qat.steps") == 30
    else:
        assert "qat" not in m and all("qat" not in per_bits for per_bits in m["all_bits"].values())
    assert m["all_bits"][str(bits)]["ptq"] == m["ptq"]
    assert set(m["timings"]) >= {"total"} and m["run"]["riverscape_version"] == rs.__version__


def reference_loss_and_accuracy(net: nn.Module) -> tuple[float, float]:
    """Oracle for fp.loss / fp.accuracy: a plain forward pass on the first SAMPLES test samples."""
    ds = rs.load_dataset("digits")
    x, y = ds.x_test[:SAMPLES], ds.y_test[:SAMPLES]
    with torch.no_grad():
        logits = net(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def check_fp_matches(m: dict, net: nn.Module) -> None:
    loss, accuracy = reference_loss_and_accuracy(net)
    # float32 forward passes batched differently (functional_call vs module call): ~1e-7 relative
    assert get(m, "fp.loss") == pytest.approx(loss, rel=1e-5)
    assert get(m, "fp.accuracy") == pytest.approx(accuracy, abs=1e-12)


def check_report_files(directory: Path, bits: list[int], *, river: bool) -> str:
    """report.html is self-contained (plotly.js inlined once, nothing from the network); PNGs are PNGs."""
    names = {p.name for p in directory.iterdir()}
    expected_png = {"accuracy_vs_bits.png", "spectrum.png", "density.png", "alignment.png"}
    expected_png |= {f"{kind}_{b}bit.png" for b in bits for kind in ("slices", "paths")}
    assert names == {"report.html", "metrics.json", MARKER_NAME, *expected_png}, sorted(names)
    for name in expected_png:
        data = (directory / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name
    page = (directory / "report.html").read_text(encoding="utf-8")
    assert page.count("* plotly.js v") == 1  # the bundle's licence header
    assert not re.search(r"<script[^>]*\ssrc\s*=", page, re.I)  # every script inline
    assert not re.search(r"<link[^>]*href\s*=\s*[\"']https?:", page, re.I)
    assert all(src.startswith("data:") for src in re.findall(r"<img[^>]*\ssrc\s*=\s*[\"']([^\"']*)", page))
    assert page.count("Plotly.newPlot") >= 5
    assert ("river (FP training)" in page) == river
    assert "t_b = n/a" not in page and not re.search(r"\de[+-]\d+×", page)  # readable reading: no "1e+02×"
    return page


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("riverscape: error: "), proc.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def leftovers(work: Path, name: str) -> list[str]:
    """The report directory or its hidden temporary siblings (.NAME.*.partial)."""
    return sorted(p.name for p in work.iterdir() if p.name == name or p.name.startswith(f".{name}."))


# ------------------------------------------------------------------------------ tests


def test_demo_writes_a_self_contained_report(runs):
    out = runs.ok("demo").stdout
    report = (runs.work / "demo" / "report.html").resolve()
    assert re.search(rf"^report: {re.escape(str(report))}  \(\d+ s\)$", out, re.M), out
    assert re.search(r"^test accuracy: full precision 0\.\d{3}, PTQ 0\.\d{3}, QAT 0\.\d{3} at 2 bits", out, re.M), out
    check_report_files(runs.work / "demo", [2], river=True)
    m = runs.metrics("demo")
    # 64-32-10 MLP: 64*32 + 32 + 32*10 + 10 parameters, the two weight matrices quantized
    # the demo keeps the defaults --max-samples 1024 (1024 of digits' 1348 training and all 449 test samples), --top-k 5
    check_metrics(m, bits=2, n_params=2410, n_quantized=64 * 32 + 32 * 10, qat=True, samples=(1024, 449), top_k=5)
    assert m["fp"]["accuracy"] > 0.9  # 1500 Adam steps on digits reach ~97%


def test_analyze_of_a_trained_checkpoint_shows_the_river(runs):
    runs.ok("train")
    page = check_report_files(runs.work / "seed0_again", [4, 2], river=True)
    assert "wrote seed0_again/ (accuracy_vs_bits.png, alignment.png, " in runs.ok("seed0_again").stdout
    m = runs.metrics("seed0_again")
    # 64-16-10 MLP: 64*16 + 16 + 16*10 + 10 = 1210 parameters, 1184 of them in weight matrices
    check_metrics(m, bits=2, n_params=1210, n_quantized=64 * 16 + 16 * 10, qat=True)
    assert m["run"]["source_format"] == "riverscape" and m["run"]["model"]["kwargs"]["hidden"] == [16]
    checkpoint = torch.load(runs.work / "trained.pt", weights_only=True)
    net = rs.build_model("mlp", **checkpoint["model"]["kwargs"])
    net.load_state_dict(checkpoint["state_dict"])
    net.eval()
    check_fp_matches(m, net)
    assert "Loss along paths" in page


@pytest.mark.parametrize(
    "name, source_format, qat",
    [("bare", "state_dict", False), ("nested", "nested:model_state_dict", True), ("safetensors", "safetensors", True)],
)
def test_analyze_weights_without_architecture(runs, name, source_format, qat):
    m = runs.metrics(name)
    check_metrics(m, bits=2, n_params=2410, n_quantized=64 * 32 + 32 * 10, qat=qat)
    assert m["run"]["source_format"] == source_format
    check_fp_matches(m, runs.net)  # the weights arrived intact through every format
    check_report_files(runs.work / name, [2], river=False)


def test_weight_formats_agree(runs):
    """Same weights, same data, same seed: bare, nested and safetensors give the same PTQ numbers."""
    bare, nested, st = (runs.metrics(n) for n in ("bare", "nested", "safetensors"))
    for key in ("fp.loss", "ptq.loss", "ptq.predicted_loss_increase", "hessian.fp.top_eigenvalues", "alignment.cosine_to_fp"):
        assert get(bare, key) == get(nested, key) == get(st, key), key


def _comparable(m: dict) -> dict:
    """metrics.json without wall times (also the plan's timed gradient and estimates), and without what says how it was printed (--json) or where from."""
    options = {k: v for k, v in m["run"]["options"].items() if k != "json"}
    run = {**{k: v for k, v in m["run"].items() if k != "checkpoint"}, "options": options}
    plan = {k: v for k, v in m["plan"].items() if k not in ("timing", "estimated_seconds")}
    return {**{k: v for k, v in m.items() if k not in ("timings", "run", "plan")}, "run": run, "plan": plan}


def test_same_seed_same_numbers_other_seed_other_null(runs):
    first, again, other = (runs.metrics(n) for n in ("seed0", "seed0_again", "seed1"))
    assert "total" in first["timings"] and "total" in again["timings"]  # wall times: free to differ
    assert _comparable(first) == _comparable(again)
    # the seed draws probes, null perturbations and directions, never the data or the PTQ point
    assert other["fp"] == first["fp"] and other["ptq"]["loss"] == first["ptq"]["loss"]
    assert other["run"]["options"]["seed"] == 1
    for bits in ("4", "2"):
        a, b = first["all_bits"][bits]["alignment"], other["all_bits"][bits]["alignment"]
        assert (a["null_mean"], a["null_sd"]) != (b["null_mean"], b["null_sd"]), bits


def test_json_flag_prints_metrics_json(runs):
    printed = json.loads(runs.ok("seed0").stdout)
    assert printed["run"]["options"]["json"] is True
    assert printed == json.loads((runs.work / "seed0" / "metrics.json").read_text())


def test_several_bit_widths(runs):
    m = runs.metrics("seed0")
    assert m["bits_analyzed"] == [4, 2] and set(m["all_bits"]) == {"4", "2"}
    assert m["bits"] == 2 and {k: m[k] for k in ("ptq", "alignment", "qat")} == {k: m["all_bits"]["2"][k] for k in ("ptq", "alignment", "qat")}
    assert m["hessian"]["quantized"] == m["all_bits"]["2"]["hessian"]["quantized"]
    assert m["all_bits"]["4"]["bits"] == 4 and "4-bit" in m["all_bits"]["4"]["quantizer"]
    # a 4-bit grid has 15 levels vs 3: its rounding perturbation is much smaller
    assert m["all_bits"]["4"]["ptq"]["delta_norm"] < 0.5 * m["all_bits"]["2"]["ptq"]["delta_norm"]
    assert m["all_bits"]["4"]["ptq"]["loss"] < m["all_bits"]["2"]["ptq"]["loss"]


@pytest.mark.parametrize("name", ["nan", "nan_late"])
def test_nan_loss_is_one_line_and_leaves_nothing(runs, name):
    """``nan``: caught by the CLI's first-batch check; ``nan_late``: by the analysis, after the report directory exists."""
    assert_one_line_error(runs.procs[name], r"loss .*\bnan\b")
    assert leftovers(runs.work, name) == []


def test_pickled_module_with_code_is_refused(runs):
    assert_one_line_error(runs.procs["evil"], r"--trust-checkpoint")
    assert not runs.files["marker"].exists(), "unpickling ran the payload"
    assert leftovers(runs.work, "evil") == []
    # control: the payload is live, so the check above can fail
    torch.load(runs.files["control.pt"], weights_only=False)
    assert runs.files["control_marker"].exists()


STAGE_LINE = re.compile(r"^riverscape: \[(\d+)/(\d+)\] (.+): ([0-9.]+ (ms|s|min|h)( \(estimated [^)]+\))?|skipped); (about .+ left|done)$")


def test_budget_quick_scales_the_run_prints_the_plan_and_a_line_per_stage(runs):
    proc, m = runs.ok("quick"), runs.metrics("quick")
    quick = BUDGETS["quick"]
    assert m["plan"]["budget"] == quick.to_dict() and m["plan"]["skip"] == ["slices", "density", "paths"]
    options = m["run"]["options"]
    assert (options["budget"], options["top_k"], options["max_samples"], options["qat_steps"]) == ("quick", quick.top_k, quick.max_samples, quick.qat_steps)
    assert m["analysis_samples"] == quick.max_samples and len(m["hessian"]["fp"]["top_eigenvalues"]) == quick.top_k
    assert m["hessian"]["fp"]["trace_matvecs"] <= quick.trace_matvecs and m["hessian"]["fp"]["min_eigenvalue"] is None  # no density
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("riverscape: plan (quick): 1 bit-width(s) [2]") and "estimated" in lines[0], lines
    stages = [STAGE_LINE.match(line) for line in lines[1:]]
    assert all(stages), lines
    assert [int(s.group(1)) for s in stages] == list(range(1, len(stages) + 1)) and {int(s.group(2)) for s in stages} == {len(stages)}
    assert stages[-1].group(7) == "done" and all(s.group(7).startswith("about") for s in stages[:-1])
    skipped = {s.group(3) for s in stages if s.group(4) == "skipped"}
    assert skipped == {"2D slices, 2 bits", "loss along paths, 2 bits"}, lines
    names = sorted(p.name for p in (runs.work / "quick").iterdir())
    assert not any(n.startswith(("slices_", "paths_", "density")) for n in names), names
    html = (runs.work / "quick" / "report.html").read_text()
    assert "Landscapes: L(θ)" not in html and "Loss along paths" not in html and "Spectral density" not in html


def test_budget_in_minutes_picks_a_preset_from_a_timed_probe(runs):
    proc, m = runs.ok("minutes"), runs.metrics("minutes")
    first = proc.stderr.strip().splitlines()[0]
    assert re.match(r"^riverscape: budget 0.25 min: preset (quick|standard|thorough) \(estimated [^)]+\) ", first), first
    chosen = first.split("preset ")[1].split(" ")[0]
    assert m["plan"]["budget"]["name"] == chosen == m["run"]["options"]["budget"]
    assert m["run"]["options"]["top_k"] == 2 and m["run"]["options"]["qat_steps"] == 0  # explicit values win over the preset


def test_several_ptq_methods_are_compared_and_the_first_is_analysed(runs):
    m = runs.metrics("methods")
    compared = m["all_bits"]["2"]["ptq_methods"]
    assert list(compared) == ["gptq", "rtn", "adaround"] and m["run"]["options"]["ptq_methods"] == ["gptq", "rtn", "adaround"]
    assert m["ptq"]["ptq_method"] == "gptq" and m["ptq"]["loss"] == compared["gptq"]["loss"]  # the analysed point is the first method's
    assert len({round(v["delta_norm"], 9) for v in compared.values()}) == 3  # three different points
    for name in ("gptq", "adaround"):  # data-aware: calibrated, with a relative layer reconstruction error per quantized tensor
        assert compared[name]["calibration_samples"] > 0
        errors = compared[name]["reconstruction_error"]
        assert set(errors) == set(m["quantized_layers"]) and all(0.0 <= e < 1.0 for e in errors.values())
    assert "reconstruction_error" not in compared["rtn"]
    html = (runs.work / "methods" / "report.html").read_text()
    assert "PTQ methods compared" in html and "PTQ (adaround)" in html
