"""``riverscape analyze ckpt --quantized-weights q.pt``: a point quantized elsewhere analysed against its FP checkpoint."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from helpers import digits_mlp_checkpoint

import riverscape as rs
from riverscape import cli
from riverscape.quant import UniformQuantizer

ARGS = ["--budget", "quick", "--skip", "slices,density,paths,alignment,damage,layers", "--qat-steps", "0", "--max-samples", "0", "--top-k", "2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantized_weights")
    ds = rs.load_dataset("digits")
    net = digits_mlp_checkpoint(folder / "ckpt.pt", steps=60).model
    # "another library": 4-bit per-group-16 minmax weights, dequantized, biases untouched
    q = UniformQuantizer(4, range="minmax", group_size=16)
    state = {k: (q(v) if k.endswith("weight") else v).detach().clone() for k, v in net.state_dict().items()}
    torch.save(state, folder / "q4.pt")
    torch.save({**state, "1.weight": state["1.weight"] + 1e-3 * torch.randn_like(state["1.weight"])}, folder / "noisy.pt")
    torch.save({k: v for k, v in state.items() if k != "3.weight"}, folder / "partial.pt")
    return folder, net, state, ds


def _run(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in args])
    return code, err.getvalue()


def test_the_external_point_is_analysed_and_compared_with_riverscapes_own(work):
    folder, net, state, ds = work
    out = folder / "report"
    code, err = _run("analyze", folder / "ckpt.pt", "--quantized-weights", folder / "q4.pt", "--bits", "4", "--group-size", "16",
                     "--ptq", "rtn", "--range", "minmax", *ARGS, "--out", out)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["ptq"]["ptq_method"] == "external" and list(m["all_bits"]["4"]["ptq_methods"]) == ["external", "rtn"]
    model = rs.build_model("mlp", **ds.model_kwargs("mlp"))
    model.load_state_dict(state)
    with torch.no_grad():
        x, y = ds.test
        own = torch.nn.functional.cross_entropy(model(x), y).item()
    assert m["ptq"]["loss"] == pytest.approx(own, rel=1e-5)  # float32 on the same test split: the external network itself
    assert m["ptq"]["grid_residual_max"] < 1e-3  # recovered as a uniform per-group grid
    # the same quantizer inside riverscape lands on the same point: identical distance and loss
    rtn = m["all_bits"]["4"]["ptq_methods"]["rtn"]
    assert rtn["delta_norm"] == pytest.approx(m["ptq"]["delta_norm"], rel=1e-6) and rtn["loss"] == pytest.approx(m["ptq"]["loss"], rel=1e-6)
    assert m["run"]["options"]["quantized_weights"].endswith("q4.pt") and m["run"]["options"]["group_size"] == 16


@pytest.mark.parametrize("name, extra, phrase", [
    ("noisy.pt", ["--group-size", "16"], "is not on a uniform grid"),
    ("partial.pt", ["--group-size", "16"], "lacks 1 of the quantized tensors: 3.weight"),
    ("missing.pt", [], "checkpoint not found"),
])
def test_bad_quantized_weights_are_one_line_errors(work, name, extra, phrase):
    folder = work[0]
    code, err = _run("analyze", folder / "ckpt.pt", "--quantized-weights", folder / name, "--bits", "4", *extra, *ARGS, "--out", folder / f"r_{name}")
    errors = [line for line in err.strip().splitlines() if line.startswith("riverscape: error:")]
    assert code == 2 and len(errors) == 1 and phrase in errors[0] and "Traceback" not in err, err
    assert not (folder / f"r_{name}").exists()


def test_several_bit_widths_or_the_bare_method_name_are_refused(work):
    folder = work[0]
    code, err = _run("analyze", folder / "ckpt.pt", "--quantized-weights", folder / "q4.pt", "--bits", "4", "2", *ARGS, "--out", folder / "r2")
    assert code == 2 and "give the one bit-width it was quantized to" in err
    code, err = _run("analyze", folder / "ckpt.pt", "--ptq", "external", "--bits", "4", *ARGS, "--out", folder / "r3")
    assert code == 2 and "use --quantized-weights FILE" in err
