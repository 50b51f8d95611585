"""The layer registry: every weight-bearing layer type is quantized along its own channel axis,
and one LayerSelection decides which tensors every QuantMap of an analysis quantizes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import riverscape as rs
import riverscape.analysis
import riverscape.pipeline.measure
from riverscape import cli
from riverscape.analysis_options import AnalyzeOptions
from riverscape.checkpoint import build_model_from_spec, make_spec, save_checkpoint
from riverscape.quant import (
    LayerSelection,
    QuantMap,
    UniformQuantizer,
    ptq,
    qat,
    register_quantizable,
    unsupported_weight_warning,
    unsupported_weights,
)
from riverscape.quant import layers

BITS = 3
DT = torch.float64


# --------------------------------------------------------------------------- helpers


def hand_quantize(w: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    """Symmetric min-max RTN by hand: scale = max|w| over the other axes / (2^(b-1) - 1)."""
    top = 2 ** (bits - 1) - 1
    if axis is None or w.ndim < 2:
        scale = w.abs().amax() / top
    else:
        scale = w.abs().amax(dim=tuple(d for d in range(w.ndim) if d != axis), keepdim=True) / top
    return torch.clamp(torch.round(w / scale), -top, top) * scale


class Conv1D(nn.Module):
    """The Hugging Face GPT-2 ``Conv1D``: weight ``(in, out)``, ``y = x @ W + b``."""

    __module__ = "transformers.pytorch_utils"  # recognised exactly like the real one, by dotted class name

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class GPTBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(12, 8)
        self.c_proj = Conv1D(3, 12)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)))


class Recurrent(nn.Module):
    def __init__(self, cell: type) -> None:
        super().__init__()
        self.rnn = cell(4, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Attention(nn.Module):
    def __init__(self, separate: bool) -> None:
        super().__init__()
        extra = {"kdim": 6, "vdim": 5} if separate else {}
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **extra)
        self.separate = separate
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        key, value = (x[..., :6], x[..., :5]) if self.separate else (x, x)
        out, _ = self.attn(x, key, value, need_weights=False)
        return self.head(out.mean(1))


class Deconv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 2)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(self.up(x)).mean((2, 3)))


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 6, mode="mean")
        self.head = nn.Linear(6, 3)

    def forward(self, idx):
        return self.head(self.bag(idx))


class WithCustomMatrix(nn.Module):
    """A Linear plus a bare ``nn.Parameter`` matrix of an unregistered module type."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.mix = nn.Parameter(torch.randn(6, 3) * 0.3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return (torch.tanh(self.fc(x)) @ self.mix) * self.scale


def _seq(n: int, t: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, t, d), torch.randint(0, 3, (n,))


# name -> (model factory, data factory, {quantized tensor: channel axis})
LSTM_WEIGHTS = {f"rnn.weight_{k}_l{i}{s}": 0 for i in (0, 1) for s in ("", "_reverse") for k in ("ih", "hh")}
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple], dict[str, int]]] = {
    "hf_conv1d": (GPTBlock, lambda: (torch.randn(6, 8), torch.randint(0, 3, (6,))), {"c_fc.weight": 1, "c_proj.weight": 1}),
    "lstm": (lambda: Recurrent(nn.LSTM), lambda: _seq(6, 3, 4), {**LSTM_WEIGHTS, "head.weight": 0}),
    "gru": (lambda: Recurrent(nn.GRU), lambda: _seq(6, 3, 4), {**LSTM_WEIGHTS, "head.weight": 0}),
    "mha_in_proj": (lambda: Attention(False), lambda: _seq(6, 4, 8), {"attn.in_proj_weight": 0, "attn.out_proj.weight": 0, "head.weight": 0}),
    "mha_separate_qkv": (
        lambda: Attention(True),
        lambda: _seq(6, 4, 8),
        {"attn.q_proj_weight": 0, "attn.k_proj_weight": 0, "attn.v_proj_weight": 0, "attn.out_proj.weight": 0, "head.weight": 0},
    ),
    "conv_transpose2d": (Deconv, lambda: (torch.randn(6, 3, 5, 5), torch.randint(0, 3, (6,))), {"up.weight": 1, "head.weight": 0}),
    "embedding_bag": (Bag, lambda: (torch.randint(0, 20, (6, 4)), torch.randint(0, 3, (6,))), {"bag.weight": 0, "head.weight": 0}),
}


def _objective(model: nn.Module, data: tuple) -> rs.Objective:
    return rs.Objective(model, "cross_entropy", data, dtype=DT)


def _changed(obj: rs.Objective, a: torch.Tensor, b: torch.Tensor) -> set[str]:
    return {s.name for s in obj.layout if not torch.equal(a[s.slice], b[s.slice])}


# --------------------------------------------------------------------------- PTQ per layer type


@pytest.mark.parametrize("case", sorted(CASES))
def test_ptq_quantizes_every_registered_weight_along_its_channel_axis(case):
    torch.manual_seed(0)
    make_model, make_data, expected = CASES[case]
    obj = _objective(make_model(), make_data())
    quantizer = UniformQuantizer(BITS, range="minmax")
    qmap = QuantMap(obj, quantizer)
    status = {row.name: row for row in qmap.status()}
    assert [row.name for row in qmap.status()] == obj.param_names  # one row per parameter, model order
    quantized = {name for name, row in status.items() if row.quantized}
    assert quantized == set(expected)
    assert {name: row.channel_axis for name, row in status.items() if row.quantized} == expected
    assert all(row.granularity == "per-channel" and row.bits == BITS for row in status.values() if row.quantized)
    assert all(row.reason == "not a weight" for row in status.values() if not row.quantized)

    theta_q = ptq(obj, quantizer)
    assert _changed(obj, theta_q, obj.theta0) == quantized  # exactly the listed tensors move, bit for bit
    fp, q = obj.unflatten(obj.theta0), obj.unflatten(theta_q)
    for name, axis in expected.items():
        assert torch.equal(q[name], hand_quantize(fp[name], BITS, axis)), name
    for target, params in zip(qmap.targets, qmap.qparams(obj.theta0)):
        assert params.scale.shape[target.channel_axis] == target.spec.shape[target.channel_axis]
        assert params.scale.numel() == target.spec.shape[target.channel_axis]


@pytest.mark.parametrize("case", ["hf_conv1d", "conv_transpose2d"])
def test_axis_one_layers_differ_from_an_axis_zero_grid(case):
    """The hand check above would not notice a wrong axis if both axes gave the same grid."""
    torch.manual_seed(0)
    make_model, make_data, expected = CASES[case]
    obj = _objective(make_model(), make_data())
    fp = obj.unflatten(obj.theta0)
    name = next(n for n, a in expected.items() if a == 1)
    assert not torch.equal(hand_quantize(fp[name], BITS, 1), hand_quantize(fp[name], BITS, 0))


def test_codes_and_qat_use_each_targets_axis():
    torch.manual_seed(0)
    make_model, make_data, _ = CASES["hf_conv1d"]
    obj = _objective(make_model(), make_data())
    quantizer = UniformQuantizer(BITS, range="minmax")
    qmap = QuantMap(obj, quantizer)
    fp = obj.unflatten(obj.theta0)
    top = 2 ** (BITS - 1) - 1
    expected_codes = []
    for t in qmap.targets:
        w = fp[t.name]
        scale = w.abs().amax(dim=0, keepdim=True) / top
        expected_codes.append(torch.clamp(torch.round(w / scale), -top, top).reshape(-1))
    assert torch.equal(qmap.codes(obj.theta0), torch.cat(expected_codes).to(torch.int64))
    res = qat(obj, quantizer, steps=2, progress=False)
    assert res.scales["c_fc.weight"].shape == (1, 12) and res.scales["c_proj.weight"].shape == (1, 3)


def test_real_gpt2_conv1d_layers_are_quantized_along_axis_one():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = transformers.GPT2LMHeadModel(config)

        def forward(self, ids):
            return self.gpt(ids).logits

    ids = torch.randint(0, 50, (2, 8))
    obj = _objective(LM(), (ids, ids))
    qmap = QuantMap(obj, UniformQuantizer(BITS, range="minmax"))
    rows = {r.name: r for r in qmap.status()}
    for suffix in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
        row = rows[f"gpt.transformer.h.0.{suffix}"]
        assert row.quantized and row.channel_axis == 1, row
    assert rows["gpt.transformer.wte.weight"].channel_axis == 0
    theta_q = ptq(obj, qmap)
    assert _changed(obj, theta_q, obj.theta0) == {r.name for r in rows.values() if r.quantized}


# --------------------------------------------------------------------------- registry and selection


def test_conv1d_is_recognised_without_importing_transformers():
    assert layers.channel_axis_of(Conv1D(3, 2), "weight") == 1
    assert layers.channel_axis_of(Conv1D(3, 2), "bias") is None
    assert layers.channel_axis_of(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2), "weight") == 0
    assert layers.channel_axis_of(nn.LSTM(2, 3, proj_size=2), "weight_hr_l0") == 0


def test_unsupported_matrix_warns_and_include_quantizes_it_on_axis_zero():
    torch.manual_seed(0)
    model = WithCustomMatrix()
    obj = _objective(model, (torch.randn(5, 4), torch.randint(0, 3, (5,))))
    message = unsupported_weight_warning("mix", (6, 3), "WithCustomMatrix")
    assert message == (
        "mix (6x3, WithCustomMatrix) is a weight of an unsupported layer type and stays in full precision; "
        "quantize it with --include mix or riverscape.quant.register_quantizable"
    )
    assert [w.warning() for w in unsupported_weights(model)] == [message]
    qmap = QuantMap(obj, UniformQuantizer(BITS))
    assert qmap.warnings() == [message]
    rows = {r.name: r for r in qmap.status()}
    assert rows["mix"].reason == "unsupported layer type" and rows["scale"].reason == "not a weight"

    named = QuantMap(obj, UniformQuantizer(BITS, range="minmax"), include=["fc.weight", "mix"])
    assert [(t.name, t.channel_axis) for t in named.targets] == [("mix", 0), ("fc.weight", 0)]  # model order
    assert named.warnings() == []
    rows = {r.name: r for r in named.status()}
    assert rows["fc.bias"].reason == "not a weight" and rows["scale"].reason == "not a weight"
    q = obj.unflatten(named(obj.theta0))
    assert torch.equal(q["mix"], hand_quantize(model.mix.detach().to(DT), BITS, 0))


def test_register_quantizable_custom_layer(monkeypatch):
    monkeypatch.setattr(layers, "_REGISTRY", dict(layers._REGISTRY))  # leave the global registry untouched

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(4, 6))  # (in, out)

        def forward(self, x):
            return x @ self.kernel

    class ScaledChild(Scaled):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(), nn.Tanh(), ScaledChild(), nn.Flatten())
    model[2].kernel = nn.Parameter(torch.randn(6, 3))
    data = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    assert {r.reason for r in QuantMap(_objective(model, data), UniformQuantizer(BITS), include="*").status()} == {None}
    with pytest.raises(ValueError, match="no parameter is selected"):
        QuantMap(_objective(model, data), UniformQuantizer(BITS))
    register_quantizable(Scaled, {"kernel": 1})
    obj = _objective(model, data)
    qmap = QuantMap(obj, UniformQuantizer(BITS, range="minmax"))
    assert [(t.name, t.channel_axis) for t in qmap.targets] == [("0.kernel", 1), ("2.kernel", 1)]  # subclass counts
    q = obj.unflatten(qmap(obj.theta0))
    assert torch.equal(q["0.kernel"], hand_quantize(model[0].kernel.detach().to(DT), BITS, 1))
    with pytest.raises(TypeError):
        register_quantizable(int, {"w": 0})
    with pytest.raises(ValueError):
        register_quantizable(Scaled, {"kernel": "1"})


def test_selection_reasons_and_one_constructor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    obj = _objective(model, (torch.randn(5, 4), torch.randint(0, 3, (5,))))
    q = UniformQuantizer(BITS)
    kept_edges = QuantMap(obj, q, keep_first_last=True)
    reasons = {r.name: r.reason for r in kept_edges.status()}
    assert reasons["0.weight"] == reasons["4.weight"] == "first/last layer kept" and reasons["2.weight"] is None
    assert {r.name: r.reason for r in QuantMap(obj, q, exclude="2").status()}["2.weight"] == "excluded"
    assert {r.name: r.reason for r in QuantMap(obj, q, include="0.*").status()}["2.weight"] == "not included"
    assert {r.name: r.reason for r in QuantMap(obj, q, include="0.*").status()}["3.weight"] == "not a weight"
    selection = LayerSelection(include=["0.*", "2.weight"], exclude="0.bias")
    assert [t.name for t in selection.build(obj, q).targets] == [t.name for t in QuantMap(obj, q, include=["0.*", "2.weight"], exclude="0.bias").targets]
    assert [t.name for t in QuantMap(obj, q, quantize_bias=True).targets] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    with pytest.raises(ValueError, match="either selection"):
        QuantMap(obj, q, selection=selection, keep_first_last=True)
    with pytest.raises(TypeError):
        LayerSelection(keep_first_last="yes")
    with pytest.raises(ValueError):
        LayerSelection(include=[""])
    options = AnalyzeOptions(include=["rnn.*"], keep_first_last=True)
    assert options.qmap_options() == {"selection": LayerSelection(include=("rnn.*",), keep_first_last=True)}
    assert [t.name for t in LayerSelection.exactly(["2.weight"]).build(obj, q).targets] == ["2.weight"]


# --------------------------------------------------------------------------- CLI and analysis


NETS = '''
import torch
from torch import nn


class Conv1D(nn.Module):
    __module__ = "transformers.pytorch_utils"

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 6, batch_first=True)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        out, _ = self.rnn(x.reshape(x.shape[0], 8, 8))
        return self.head(out[:, -1])


class GPTStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_in = Conv1D(16, 64)
        self.c_mid = Conv1D(16, 16)
        self.c_out = Conv1D(10, 16)
        self.mix = nn.Parameter(torch.eye(10))

    def forward(self, x):
        h = torch.tanh(self.c_in(x.reshape(x.shape[0], -1)))
        return self.c_out(torch.tanh(self.c_mid(h))) @ self.mix


def make_lstm():
    return LSTMNet()


def make_gpt_style():
    return GPTStyle()
'''

CLI_CASES = {
    # factory, extra arguments, expected quantized tensors
    "lstm": ("make_lstm", ["--include", "rnn.*"], ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"]),
    "conv1d": ("make_gpt_style", ["--keep-first-last"], ["c_mid.weight"]),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_include_and_every_quantmap_of_the_run_select_the_header_set(case, tmp_path, monkeypatch):
    factory, extra, expected = CLI_CASES[case]
    (tmp_path / "nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    spec = f"nets.py:{factory}"
    torch.manual_seed(0)
    model = build_model_from_spec(make_spec(spec))
    save_checkpoint(tmp_path / "ckpt.pt", model, model_spec=spec, data_spec="digits", loss="cross_entropy")

    selections: list[list[str]] = []
    original_init = QuantMap.__init__

    def spy_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        selections.append([t.name for t in self.targets])

    ptq_points = []
    original_ptq = riverscape.pipeline.measure.ptq_result

    def spy_ptq(objective, quantizer, *args, **kwargs):
        result = original_ptq(objective, quantizer, *args, **kwargs)
        ptq_points.append((objective, result.theta_q))
        return result

    monkeypatch.setattr(QuantMap, "__init__", spy_init)
    monkeypatch.setattr(riverscape.pipeline.measure, "ptq_result", spy_ptq)
    args = ["analyze", "ckpt.pt", "--model", spec, "--data", "digits", "--bits", "2", "--qat-steps", "5", "--grid-steps", "3",
            "--top-k", "2", "--max-samples", "64", *extra, "--out", "out"]
    assert cli.main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())

    quantized = [w["name"] for w in metrics["weights"] if w["status"] == "quantized"]
    assert quantized == metrics["quantized_layers"] == expected
    assert metrics["n_quantized_tensors"] == len(expected)
    assert metrics["n_quantized"] == sum(w["numel"] for w in metrics["weights"] if w["status"] == "quantized")
    assert [w["name"] for w in metrics["weights"]] == [n for n, _ in model.named_parameters()]
    assert selections and all(names == expected for names in selections), selections
    assert ptq_points
    for objective, theta_q in ptq_points:
        assert _changed(objective, theta_q, objective.theta0) == set(expected)
    report = (tmp_path / "out" / "report.html").read_text()
    assert "Weights" in report and expected[0] in report
    if case == "conv1d":
        assert all(w["channel_axis"] == 1 for w in metrics["weights"] if w["status"] == "quantized")
        reasons = {w["name"]: w["reason"] for w in metrics["weights"]}
        assert reasons["c_in.weight"] == reasons["c_out.weight"] == "first/last layer kept"
        assert reasons["mix"] == "unsupported layer type"
        assert metrics["warnings"] == [unsupported_weight_warning("mix", (10, 10), "GPTStyle")]
        assert "mix (10x10, GPTStyle)" in report
    else:
        assert metrics["warnings"] == []
        assert {w["name"]: w["reason"] for w in metrics["weights"]}["head.weight"] == "not included"


def test_module_doctests(monkeypatch):
    import doctest

    from riverscape.quant import qmap as qmap_module

    monkeypatch.setattr(layers, "_REGISTRY", dict(layers._REGISTRY))  # the register_quantizable example registers a class
    for module in (layers, qmap_module):
        assert doctest.testmod(module, raise_on_error=True).attempted >= 1
