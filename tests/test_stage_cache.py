"""Finished stages are cached in the output's work folder, so an interrupted ``riverscape analyze`` resumes.

The end-to-end test interrupts a run (KeyboardInterrupt raised inside QAT, as Ctrl-C would), runs
the same command again, counts which stage computations ran, and compares metrics.json with an
uninterrupted run's bit for bit (only the wall-clock fields differ).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

import riverscape.analysis as analysis_module
from helpers import digits_mlp_checkpoint
from riverscape import cli
from riverscape.errors import InputError
from riverscape.landscape.paths import PathProfile
from riverscape.outdir import MARKER_NAME, check_output_dir, claim_files
from riverscape.stage_cache import WORK_DIR, StageCache, decode, encode

# --chunk-size makes the point evaluations deterministic: without it, slices and paths choose between
# one-point and vmapped evaluation by timing, and the two round float32 sums differently (1 ulp)
ARGS = ["--bits", "2", "--budget", "quick", "--qat-steps", "5", "--grid-steps", "3", "--top-k", "2", "--max-samples", "64",
        "--chunk-size", "8"]
VOLATILE = (("timings",), ("plan", "timing"), ("plan", "estimated_seconds"), ("plan", "resumed"))  # wall-clock fields


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "mlp.pt"
    digits_mlp_checkpoint(path, steps=100)
    return path


@pytest.fixture
def no_figures(monkeypatch):
    """The report page and its figures are not under test here: a stub keeps each run to a few seconds."""
    import riverscape.report.analysis_page as page

    monkeypatch.setattr(page, "write_report", lambda result, out, title: (out / "report.html").write_text(title))


def _counted(monkeypatch) -> dict:
    """Count the calls of every stage's main computation inside riverscape.analysis."""
    counts: dict = {}
    for name in ("_curvature_summary", "layer_curvature", "measure_ptq", "damage_at", "measure_qat", "alignment_at",
                 "plane_landscape", "path_losses"):
        real = getattr(analysis_module, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(analysis_module, name, counting)
    return counts


def _stable(metrics: dict) -> dict:
    for path in VOLATILE:
        parent = metrics
        for key in path[:-1]:
            parent = parent[key]
        parent.pop(path[-1], None)
    return metrics


def test_interrupted_run_resumes_from_its_cached_stages_with_identical_metrics(tmp_path, checkpoint, no_figures, monkeypatch, capsys):
    reference, out = tmp_path / "reference", tmp_path / "report"
    assert cli.main(["analyze", str(checkpoint), *ARGS, "--no-resume", "--out", str(reference)]) == 0
    expected = json.loads((reference / "metrics.json").read_text())
    assert "resumed" not in expected["plan"] and expected["run"]["options"]["resume"] is False

    real_qat = analysis_module.measure_qat

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis_module, "measure_qat", interrupted)
    capsys.readouterr()
    assert cli.main(["analyze", str(checkpoint), *ARGS, "--out", str(out)]) == 130
    assert capsys.readouterr().err.endswith("riverscape: interrupted\n")
    # the output folder holds only riverscape's work folder, every file listed in its marker
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["kind"] == "work" and sorted(p.name for p in out.iterdir()) == sorted([MARKER_NAME, WORK_DIR])
    finished = ["curvature_fp", "layer_curvature", "basin_widths", "ptq-2", "curvature_quantized-2", "damage-2"]
    stored = {p.name for p in (out / WORK_DIR).iterdir()}
    assert {n for n in stored if n.endswith(".json")} == {"key.json", *(f"{s}.json" for s in finished)}
    assert {n for n in stored if not n.endswith(".json")} <= {f"{s}.safetensors" for s in finished} and "ptq-2.safetensors" in stored
    assert set(str(p.relative_to(out)) for p in out.rglob("*") if p.name != MARKER_NAME) <= set(marker["files"])

    monkeypatch.setattr(analysis_module, "measure_qat", real_qat)
    counts = _counted(monkeypatch)
    assert cli.main(["analyze", str(checkpoint), *ARGS, "--out", str(out)]) == 0  # the same command, no --force
    err = capsys.readouterr().err
    assert re.findall(r"\] (.*): cached", err) == [
        "curvature at θ_fp", "per-layer curvature", "basin widths", "PTQ, 2 bits", "curvature at Q(θ), 2 bits", "second-order damage, 2 bits"]
    # only the stages after the interruption ran: QAT (with its alignment), alignment, slices and the three paths
    assert counts == {"measure_qat": 1, "alignment_at": 1, "plane_landscape": 1, "path_losses": 3}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["plan"]["resumed"] == finished
    assert not (out / WORK_DIR).exists() and json.loads((out / MARKER_NAME).read_text())["kind"] == "report"
    expected["run"]["options"]["resume"] = True  # the one option that differs, and it changes no number
    assert _stable(metrics) == _stable(expected)


@pytest.mark.parametrize("extra, failure, code", [(["--no-resume"], KeyboardInterrupt, 130), ([], ZeroDivisionError, 1)])
def test_an_interrupt_with_no_resume_or_an_error_leaves_nothing_behind(tmp_path, checkpoint, no_figures, monkeypatch, extra, failure, code):
    def failing(*args, **kwargs):
        raise failure

    monkeypatch.setattr(analysis_module, "damage_at", failing)  # after four finished stages
    assert cli.main(["analyze", str(checkpoint), *ARGS, *extra, "--out", str(tmp_path / "sub" / "report")]) == code
    assert list(tmp_path.iterdir()) == []  # neither the report folder, nor its work folder, nor the parent made for it


def test_changed_inputs_or_options_invalidate_the_cache(tmp_path):
    values = {"point": torch.arange(4.0), "metrics": {"loss": 0.25}}
    first = StageCache(tmp_path / "out", {"files": {"checkpoint": "aa"}}).start({"seed": 0})
    first.save("ptq-2", values)
    assert first.stages() == ["ptq-2"]
    same = StageCache(tmp_path / "out", {"files": {"checkpoint": "aa"}}).start({"seed": 0})
    loaded = same.load("ptq-2")
    assert torch.equal(loaded["point"], values["point"]) and loaded["metrics"] == values["metrics"] and same.loaded == ["ptq-2"]
    (tmp_path / "out" / WORK_DIR / "ptq-2.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert StageCache(tmp_path / "out", {"files": {"checkpoint": "aa"}}).start({"seed": 0}).load("ptq-2") is None  # recomputed
    for inputs, options in (({"files": {"checkpoint": "ab"}}, {"seed": 0}), ({"files": {"checkpoint": "aa"}}, {"seed": 1})):
        other = StageCache(tmp_path / "out", inputs).start(options)
        assert other.load("ptq-2") is None and other.stages() == []
        assert sorted(p.name for p in (tmp_path / "out" / WORK_DIR).iterdir()) == []  # emptied, not kept beside


def test_encoding_is_exact_and_rebuilds_only_riverscape_dataclasses(tmp_path):
    profile = PathProfile(torch.linspace(0, 1, 3, dtype=torch.float64), torch.tensor([0.1, math.nan, 0.3]), None, None, None, "q")
    value = {"profile": profile, "pair": (1, -math.inf), 3: [np.float64(0.1), np.arange(3)], "$tuple": "a key that looks like a tag",
             "half": torch.tensor([1.5, -2.25], dtype=torch.bfloat16), "dtype": torch.float16}
    tensors: dict = {}
    data = encode(value, tensors)
    json.dumps(data, allow_nan=False)  # plain JSON: non-finite floats are tagged
    back = decode(json.loads(json.dumps(data)), tensors)
    assert isinstance(back["profile"], PathProfile) and back["profile"].quantizer == "q"
    assert torch.equal(back["profile"].t, profile.t) and torch.equal(back["profile"].loss.isnan(), profile.loss.isnan())
    assert back["pair"] == (1, -math.inf) and back[3][0] == 0.1 and type(back[3][0]) is np.float64
    assert np.array_equal(back[3][1], np.arange(3)) and back["$tuple"] == value["$tuple"]
    assert back["half"].dtype == torch.bfloat16 and torch.equal(back["half"], value["half"]) and back["dtype"] is torch.float16

    @dataclasses.dataclass
    class Foreign:
        x: int

    with pytest.raises(TypeError, match="only riverscape's own dataclasses"):
        encode(Foreign(1), {})
    with pytest.raises(TypeError, match="cannot be stored"):
        encode(object(), {})
    for name in ("os:system", "subprocess:Popen", "riverscape.stage_cache:StageCache"):  # not riverscape, or not a dataclass
        with pytest.raises(ValueError, match="not a riverscape dataclass"):
            decode({"$dataclass": name, "fields": {}}, {})


def test_an_output_folder_holding_only_work_files_is_reused_without_force(tmp_path):
    out = tmp_path / "report"
    claim_files(out, [out / WORK_DIR, out / WORK_DIR / "key.json"])
    (out / WORK_DIR).mkdir()
    (out / WORK_DIR / "key.json").write_text("{}")
    assert check_output_dir(out, force=False) == out
    (out / "notes.txt").write_text("mine")  # a file riverscape did not write: the folder is the user's again
    with pytest.raises(InputError, match="already exists"):
        check_output_dir(out, force=False)
    with pytest.raises(InputError, match="riverscape did not write"):
        check_output_dir(out, force=True)
    mine = tmp_path / "mine"  # an empty folder the user made: a failed run's clean-up leaves it as it was
    mine.mkdir()
    cache = StageCache(mine, {}).start({})
    cache.save("ptq-2", {"x": 1})
    cache.discard()
    assert mine.is_dir() and list(mine.iterdir()) == []
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "a.txt").write_text("x")
    with pytest.raises(InputError, match="riverscape did not write it"):
        claim_files(theirs, [theirs / WORK_DIR])
