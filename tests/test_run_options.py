"""Options of ``riverscape analyze`` that bound memory or narrow the run: --chunk-size, --memory-limit, --params; dict batches.

Models are the float64 tiny MLP (5 inputs, 3 classes), so every number can be compared tightly:
chunking changes only how many points one vmapped pass holds, which in float64 moves sums by a
few ulps (rtol 1e-12 is three orders above that and far below any real change).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import tiny_mlp
from riverscape import cli
from riverscape.analysis import run_analysis
from riverscape.analysis_options import AnalyzeOptions
from riverscape.batching import causal_lm
from riverscape.errors import InputError
from riverscape.io.data_specs import check_model_data
from riverscape.objective import Objective
from riverscape.pipeline import cap_samples

RTOL = 1e-12  # float64 sums in other groupings (see the module docstring)
SMALL = dict(bits=(2,), budget="quick", top_k=2, grid_steps=3, qat_steps=4, max_samples=0, skip=("layers",))


def _data(n: int = 24):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _numbers(result) -> dict:
    """Every number of a run that batched point evaluation produces: slices, paths, basin widths, damage."""
    bits = result.by_bits[0]
    return {
        "fp_slice": bits.slice_fp.loss, "q_slice": bits.slice_q.loss,
        **{f"path {k}": v.loss for k, v in bits.profiles.items()},
        **{f"qpath {k}": v.quantized_loss for k, v in bits.profiles.items()},
        "widths": torch.tensor(bits.damage.widths_plus + bits.damage.widths_minus, dtype=torch.float64),
        "barrier": torch.tensor(bits.barrier_qat["height"], dtype=torch.float64),
    }


def test_chunk_size_bounds_the_points_per_pass_and_changes_no_number(monkeypatch):
    data = _data()
    sizes: list[int] = []
    real = Objective._evaluate_chunk

    def spy(self, chunk):
        sizes.append(chunk.shape[0])
        return real(self, chunk)

    monkeypatch.setattr(Objective, "_evaluate_chunk", spy)
    runs = {}
    for chunk_size in (1, 3, None):
        sizes.clear()
        runs[chunk_size] = _numbers(run_analysis(tiny_mlp(), "cross_entropy", data, data, AnalyzeOptions(chunk_size=chunk_size, **SMALL),
                                                 progress=False))
        if chunk_size is not None:
            assert max(sizes) == chunk_size, (chunk_size, sorted(set(sizes)))
        else:
            assert max(sizes) > 3  # the automatic choice batches more points
    for chunk_size in (1, 3):
        for name, value in runs[None].items():
            torch.testing.assert_close(runs[chunk_size][name], value, rtol=RTOL, atol=0.0, msg=f"{name}, chunk size {chunk_size}")


@pytest.mark.parametrize("value, message", [
    ("0", "riverscape: error: chunk_size must be a positive integer (points per batched evaluation), got 0\n"),
    ("-3", "riverscape: error: chunk_size must be a positive integer (points per batched evaluation), got -3\n"),
    ("2.5", "riverscape: error: argument --chunk-size: invalid int value: '2.5' (see 'riverscape analyze --help')\n"),
])
def test_bad_chunk_size_is_one_line(tmp_path, capsys, value, message):
    try:
        code = cli.main(["analyze", str(tmp_path / "missing.pt"), "--chunk-size", value, "--out", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse's own type check exits
        code = exc.code
    assert code == 2 and capsys.readouterr().err == message and not (tmp_path / "out").exists()


def test_chunk_size_and_memory_limit_are_recorded_in_the_run_options():
    args = cli.build_parser().parse_args(["analyze", "x.pt", "--chunk-size", "7", "--memory-limit", "0.5", "--params", "0.*,2.*"])
    options = cli._analyze_options(args)
    assert (options.chunk_size, options.memory_limit, options.params) == (7, 2**29, ("0.*", "2.*"))
    assert options.to_dict()["chunk_size"] == 7 and options.to_dict()["memory_limit"] == 2**29
    no_limit = cli._analyze_options(cli.build_parser().parse_args(["analyze", "x.pt", "--memory-limit", "0"]))
    assert no_limit.memory_limit is None and no_limit.chunk_size is None
    with pytest.raises(InputError, match="memory_limit must be a positive number of bytes"):
        AnalyzeOptions(memory_limit=0)


def test_memory_limit_streams_a_loader_that_would_not_fit():
    x, y = _data(32)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]  # 4 batches of 8 x 5 float64 + labels: 384 bytes each
    options = dict(SMALL, skip=("layers", "slices", "paths", "damage", "alignment"), qat_steps=0)
    held = run_analysis(tiny_mlp(), "cross_entropy", batches, batches, AnalyzeOptions(**options), progress=False)
    streamed = run_analysis(tiny_mlp(), "cross_entropy", batches, batches, AnalyzeOptions(memory_limit=1000, **options), progress=False)
    note = [n for n in streamed.notes if "read from their loader" in n]
    assert note == ["the analysis data are read from their loader on every evaluation (4 batches): held in memory they would exceed "
                    "the memory limit of 1000 bytes (--memory-limit)"]
    assert not any("read from their loader" in n for n in held.notes)
    assert streamed.fp["loss"] == pytest.approx(held.fp["loss"], rel=RTOL)
    torch.testing.assert_close(torch.tensor(streamed.hessian_fp["top_eigenvalues"]), torch.tensor(held.hessian_fp["top_eigenvalues"]),
                               rtol=1e-6, atol=0.0)  # ARPACK's tolerance 1e-5 on reordered HVP sums; seen agreeing to 1e-12


def test_params_field_narrows_the_quantized_tensors_and_names_the_choice():
    data = _data()
    options = dict(SMALL, skip=("layers", "slices", "paths", "damage", "alignment"), qat_steps=0)
    lines: list[str] = []
    result = run_analysis(tiny_mlp(), "cross_entropy", data, data, AnalyzeOptions(params="2.*", **options), progress=False, emit=lines.append)
    assert result.quantized_layers == ["2.weight"] and result.n_quantized == 12
    assert result.options["params"] == ["2.*"] and result.options["include"] == []
    assert "note: --params 2.*: analysing 1 of 2 quantized tensors (12 of 32 weights); everything else stays at full precision" in lines
    with pytest.raises(InputError, match=r"--params '2.bias' matches none of the 2 quantized tensors \(0.weight, 2.weight\)"):
        run_analysis(tiny_mlp(), "cross_entropy", data, data, AnalyzeOptions(params="2.bias", **options), progress=False)


class DictLM(nn.Module):
    """A Hugging Face-style causal LM: keyword inputs, a dict output with logits (and its own loss when given labels)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.embed(input_ids) * attention_mask[..., None])
        return {"logits": logits, **({"loss": causal_lm(logits, labels)} if labels is not None else {})}


def _dict_batches():
    g = torch.Generator().manual_seed(5)
    out = []
    for n in (4, 4, 3):
        ids = torch.randint(0, 11, (n, 6), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(n, 6), "labels": ids.clone()})
    return out


def test_cap_samples_cuts_dict_batches_and_keeps_them_dicts():
    batches = _dict_batches()
    capped = cap_samples(batches, 6)
    assert [type(b) for b in capped] == [dict, dict] and [b["input_ids"].shape[0] for b in capped] == [4, 2]
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(capped[1][key], batches[1][key][:2])
    tensors = [torch.arange(5), torch.arange(5, 9), torch.arange(9, 12)]  # bare tensor batches (token ids without labels)
    assert [t.tolist() for t in cap_samples(tensors, 7)] == [[0, 1, 2, 3, 4], [5, 6]]


def test_check_model_data_runs_a_dict_batch_through_the_model():
    batches, model = _dict_batches(), DictLM()
    first = batches[0]
    with torch.no_grad():
        logits = model.head(model.embed(first["input_ids"]))
        expected = float(F.cross_entropy(logits[:, :-1].reshape(-1, 11), first["labels"][:, 1:].reshape(-1)))
    assert check_model_data(model, batches, "causal_lm", samples=8) == pytest.approx(expected, rel=1e-6)  # float32, same ops
    assert check_model_data(model, batches, "model", samples=8) == pytest.approx(expected, rel=1e-6)
    bad = [{"input_ids": first["input_ids"], "labels": first["labels"]}]  # the model needs an attention mask
    with pytest.raises(InputError, match=r"data shape does not fit the model: input batch \{input_ids \(4, 6\) int64\}"):
        check_model_data(model, bad, "causal_lm")


def test_qat_lr_reaches_the_qat_run():
    """A vanishing learning rate leaves QAT at the PTQ grid point (no flip, the PTQ loss); the default moves it."""
    data = _data()
    runs = {lr: run_analysis(tiny_mlp(), "cross_entropy", data, data, AnalyzeOptions(qat_lr=lr, **{**SMALL, "qat_steps": 20}),
                             progress=False).metrics()
            for lr in (1e-12, 1e-2)}
    still, moved = runs[1e-12], runs[1e-2]
    assert still["qat"]["total_grid_flips"] == 0 and still["qat"]["loss"] == still["ptq"]["loss"]
    assert moved["qat"]["total_grid_flips"] > 0 and moved["qat"]["loss"] != moved["ptq"]["loss"]
    options = cli._analyze_options(cli.build_parser().parse_args(["analyze", "x.pt", "--qat-lr", "3e-4"]))
    assert options.qat_lr == 3e-4 and options.to_dict()["qat_lr"] == 3e-4


@pytest.mark.parametrize("value", ["0", "-1e-3", "nan"])
def test_bad_qat_lr_is_one_line(tmp_path, capsys, value):
    code = cli.main(["analyze", str(tmp_path / "missing.pt"), f"--qat-lr={value}", "--out", str(tmp_path / "out")])
    assert code == 2 and capsys.readouterr().err == f"riverscape: error: qat_lr must be a positive number, got {float(value)!r}\n"
    assert not (tmp_path / "out").exists()
