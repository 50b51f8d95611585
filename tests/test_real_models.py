"""``riverscape analyze`` end to end on architectures nobody on this project wrote.

Each test saves a model the way its users do (``torch.save(model.state_dict())``, bf16 weights,
``save_pretrained``), runs the real command line on it (``--budget quick``, few samples) and checks
``metrics.json`` against the model itself: the FP loss against the model's own forward pass on the
same samples, and the top Hessian eigenvalue against a float64 power iteration written here with
plain autograd (on the same quantized tensors and the same samples).

The ImageNet-layout ResNet-18 at full size (all 11M parameters at ``--budget quick``) runs only with
``RIVERSCAPE_BIG=1``: it takes minutes, not seconds.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from riverscape import cli

import zoo_models as zoo

ZOO = str(Path(zoo.__file__).resolve())
SAMPLES = 16
# the stages that only cost time on these checks; what remains: curvature at θ_fp, basin widths, PTQ, curvature at Q(θ)
LEAN = ["--skip", "density,layers,damage,alignment,qat,slices,paths"]
QUICK = ["--budget", "quick", "--bits", "4", "--max-samples", str(SAMPLES)]
# fp.loss: float32 forwards of the same samples batched differently (functional_call, vmapped
# chunks vs one module call) agree to ~1e-7 relative; losses here are O(1), so 1e-5 absolute is
# 100x that rounding and far below any real difference (a wrong sample, weight or BN statistic
# moves the loss by >1e-3).
LOSS_ATOL = 1e-5
# top eigenvalue: riverscape's is ARPACK on float32 HVPs (relative error ~1e-6); the reference is
# float64 power iteration run to a relative change < 1e-10 of its Rayleigh quotient.
EIG_RTOL = 1e-3


def analyze(tmp_path: Path, checkpoint: Path, *args: str) -> dict:
    out = tmp_path / "report"
    code = cli.main(["analyze", str(checkpoint), *args, "--out", str(out), "--force"])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics equal to the batch statistics of ``x`` (a checkpoint whose BN matches its data)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass sets the exact statistics
    model.train()
    with torch.no_grad():
        model(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def own_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model.eval()(x), y))


def power_top_eigenvalue(model: nn.Module, names: list[str], loss_of_outputs, inputs: dict, iters: int = 3000) -> float:
    """Largest Hessian eigenvalue of ``loss(model(**inputs))`` in the tensors ``names``, float64.

    Plain power iteration on exact HVPs (reverse-over-reverse autograd on one kept graph); the
    other parameters and buffers stay at their values (``functional_call`` ties shared weights).
    When the dominant eigenvalue is negative (a random-init transformer), it is run again on
    ``H + c I`` with ``c = |λ_dominant|``, whose dominant eigenvalue is ``λ_max + c``.
    """
    reference = copy.deepcopy(model).double().eval()
    params = dict(reference.named_parameters())
    theta = [params[n].detach().clone().requires_grad_(True) for n in names]
    args = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    loss = loss_of_outputs(torch.func.functional_call(reference, dict(zip(names, theta)), (), args))
    grads = torch.autograd.grad(loss, theta, create_graph=True)

    def dominant(shift: float) -> float:
        g = torch.Generator().manual_seed(0)
        v = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in theta]
        value = 0.0
        for _ in range(iters):
            norm = torch.sqrt(sum((u * u).sum() for u in v))
            v = [u / norm for u in v]
            hv = [h + shift * u for h, u in zip(torch.autograd.grad(grads, theta, grad_outputs=v, retain_graph=True), v)]
            new = float(sum((a * b).sum() for a, b in zip(v, hv)))
            v = [h.detach() for h in hv]
            if abs(new - value) <= 1e-10 * abs(new):
                return new - shift
            value = new
        raise AssertionError(f"power iteration did not converge in {iters} steps (last {value - shift})")

    first = dominant(0.0)
    return first if first > 0 else dominant(-first)


def quantized_names(m: dict) -> list[str]:
    return [w["name"] for w in m["weights"] if w["status"] == "quantized"]


def check_top_eigenvalue(m: dict, model: nn.Module, inputs: dict, loss_of_outputs) -> None:
    reference = power_top_eigenvalue(model, m["quantized_layers"], loss_of_outputs, inputs)
    assert m["hessian"]["fp"]["top_eigenvalues"][0] == pytest.approx(reference, rel=EIG_RTOL)


def classification(y: torch.Tensor):
    return lambda logits: F.cross_entropy(logits, y)


# ----------------------------------------------------------------------------------- CNNs
def test_resnet18_one_block_by_include_and_params(tmp_path):
    torch.manual_seed(0)
    x, y = zoo.images(64, size=16)  # 16x16: the 7x7 stride-2 stem and max-pool leave 4x4 maps, layer4 1x1
    model = calibrate_batchnorm(zoo.resnet18(num_classes=10), x)
    checkpoint = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), checkpoint)
    m = analyze(tmp_path, checkpoint, "--model", f"{ZOO}:resnet18", "--model-kwargs", '{"num_classes": 10}', "--data", f"{ZOO}:images",
                "--data-kwargs", '{"size": 16}', *QUICK, "--max-samples", "8", "--top-k", "1", *LEAN, "--include", "*conv*", "--params", "layer1.0.*")
    # --include '*conv*' ∩ --params 'layer1.0.*': the two 3x3 convs of the first block (not its BatchNorms)
    assert m["quantized_layers"] == ["layer1.0.conv1.weight", "layer1.0.conv2.weight"]
    assert m["n_quantized"] == 2 * 64 * 64 * 3 * 3 and m["n_params"] == 11_181_642
    assert m["run"]["selection"] == {"params": ["layer1.0.*"], "include": ["*conv*"], "exclude": [], "keep_first_last": False}
    assert m["eval_split"] == "train" and m["analysis_samples"] == 8 and m["run"]["options"]["budget"] == "quick"
    assert m["fp"]["loss"] == pytest.approx(own_loss(model, x[:8], y[:8]), abs=LOSS_ATOL)


def test_params_pattern_outside_the_quantized_tensors_is_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint = tmp_path / "tied.pt"
    torch.save(zoo.tied_lm().state_dict(), checkpoint)
    code = cli.main(["analyze", str(checkpoint), "--model", f"{ZOO}:tied_lm", "--data", f"{ZOO}:tokens", "--params", "mix.bias",
                     "--out", str(tmp_path / "report")])
    assert code == 2 and not (tmp_path / "report").exists()
    assert capsys.readouterr().err == (
        "riverscape: error: --params 'mix.bias' matches none of the 2 quantized tensors (embed.weight, mix.weight)\n")


@pytest.mark.skipif(os.environ.get("RIVERSCAPE_BIG") != "1", reason="the whole ResNet-18 takes minutes: RIVERSCAPE_BIG=1")
def test_resnet18_whole_model_at_budget_quick(tmp_path):
    torch.manual_seed(0)
    x, y = zoo.images(32)
    model = calibrate_batchnorm(zoo.resnet18(num_classes=10), x)
    checkpoint = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), checkpoint)
    start = time.perf_counter()
    m = analyze(tmp_path, checkpoint, "--model", f"{ZOO}:resnet18", "--model-kwargs", '{"num_classes": 10}', "--data",
                f"{ZOO}:images", "--data-kwargs", '{"n": 32}', "--budget", "quick", "--bits", "4")
    seconds = time.perf_counter() - start
    print(f"ResNet-18 (11.2M parameters, {m['n_quantized']:,} quantized) at --budget quick: {seconds:.0f} s, "
          f"estimated {m['plan']['estimated_seconds']['total']:.0f} s")
    assert m["n_quantized_tensors"] == 21 and m["fp"]["loss"] == pytest.approx(own_loss(model, x, y), abs=LOSS_ATOL)


def test_depthwise_separable_cnn_quantizes_grouped_convs_per_output_channel(tmp_path):
    from riverscape import Objective
    from riverscape.quant import QuantMap, UniformQuantizer

    torch.manual_seed(0)
    x, y = zoo.images(64, size=16)
    model = calibrate_batchnorm(zoo.mobilenet(), x)
    checkpoint = tmp_path / "mobilenet.pt"
    torch.save(model.state_dict(), checkpoint)
    m = analyze(tmp_path, checkpoint, "--model", f"{ZOO}:mobilenet", "--data", f"{ZOO}:images", "--data-kwargs", '{"size": 16}', *QUICK, *LEAN)
    depthwise = [w for w in m["weights"] if w["status"] == "quantized" and w["shape"][1] == 1]
    # the three depthwise convs (groups = channels): weight (C, 1, 3, 3), one scale per output channel
    assert [(w["name"], w["shape"], w["channel_axis"]) for w in depthwise] == [
        ("1.0.weight", [8, 1, 3, 3], 0), ("3.0.weight", [16, 1, 3, 3], 0), ("5.0.weight", [32, 1, 3, 3], 0)]
    assert m["fp"]["loss"] == pytest.approx(own_loss(model, x[:SAMPLES], y[:SAMPLES]), abs=LOSS_ATOL)
    check_top_eigenvalue(m, model, {"input": x[:SAMPLES]}, classification(y[:SAMPLES]))
    # per output channel of a grouped conv: channel c of Q(w) is w[c] on its own grid, s_c = max|w[c]| / 7 (4 bits, minmax)
    obj = Objective(model, "cross_entropy", (x[:4], y[:4]))
    qmap = QuantMap(obj, UniformQuantizer(4, range="minmax"))
    spec = next(s for s in obj.layout if s.name == "3.0.weight")
    w = obj.theta0[spec.slice].view(spec.shape)
    scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 7
    assert torch.equal(qmap(obj.theta0)[spec.slice].view(spec.shape), torch.round(w / scale) * scale)


def test_bf16_checkpoint_is_reported_as_stored_bf16_analysed_in_float32(tmp_path):
    torch.manual_seed(0)
    x, y = zoo.images(64, size=16)
    model = calibrate_batchnorm(zoo.mobilenet(), x).to(torch.bfloat16)
    checkpoint = tmp_path / "mobilenet_bf16.pt"
    torch.save(model.state_dict(), checkpoint)
    m = analyze(tmp_path, checkpoint, "--model", f"{ZOO}:mobilenet", "--data", f"{ZOO}:images", "--data-kwargs", '{"size": 16}', *QUICK, *LEAN)
    assert m["run"]["checkpoint_dtype"] == "bfloat16"
    assert "checkpoint weights stored as bfloat16; analysed in float32 on cpu" in m["notes"]
    assert "stored as bfloat16; analysed in float32" in (tmp_path / "report" / "report.html").read_text()
    # every bf16 value is exact in float32: the reference is the bf16 model cast up, run in float32
    assert m["fp"]["loss"] == pytest.approx(own_loss(model.float(), x[:SAMPLES], y[:SAMPLES]), abs=LOSS_ATOL)


# --------------------------------------------------------------------- tied weights, LSTM
def test_tied_embedding_is_one_tensor_quantized_once_for_both_uses(tmp_path):
    torch.manual_seed(0)
    model = zoo.tied_lm()
    assert model.head.weight is model.embed.weight
    ids, y = zoo.tokens(64)
    checkpoint = tmp_path / "tied.pt"
    torch.save(model.state_dict(), checkpoint)  # holds both names, one storage
    m = analyze(tmp_path, checkpoint, "--model", f"{ZOO}:tied_lm", "--data", f"{ZOO}:tokens", *QUICK, "--range", "minmax",
                "--grid-steps", "5", "--qat-steps", "10")
    # counted once: 32x12 shared matrix + mix 12x12 + 12 bias; quantized once, under its first name
    assert m["n_params"] == 32 * 12 + 12 * 12 + 12 and m["quantized_layers"] == ["embed.weight", "mix.weight"]
    assert [w["name"] for w in m["weights"]] == ["embed.weight", "mix.weight", "mix.bias"]
    assert m["fp"]["loss"] == pytest.approx(own_loss(model, ids[:SAMPLES], y[:SAMPLES]), abs=LOSS_ATOL)
    check_top_eigenvalue(m, model, {"ids": ids[:SAMPLES]}, classification(y[:SAMPLES]))
    # PTQ: the embedding and the output projection see the same quantized matrix (per row, minmax, 4 bits)
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (quantized.embed, quantized.mix):
            scale = layer.weight.abs().amax(dim=1, keepdim=True) / 7
            layer.weight.copy_(torch.round(layer.weight / scale) * scale)
    assert quantized.head.weight is quantized.embed.weight
    assert m["ptq"]["loss"] == pytest.approx(own_loss(quantized, ids[:SAMPLES], y[:SAMPLES]), abs=LOSS_ATOL)


def test_lstm_classifier(tmp_path):
    torch.manual_seed(0)
    model = zoo.lstm_classifier()
    x, y = zoo.sequences(64)
    checkpoint = tmp_path / "lstm.pt"
    torch.save(model.state_dict(), checkpoint)
    m = analyze(tmp_path, checkpoint, "--model", f"{ZOO}:lstm_classifier", "--data", f"{ZOO}:sequences", *QUICK, "--grid-steps", "5",
                "--qat-steps", "10")
    gates = {w["name"]: (w["shape"], w["channel_axis"]) for w in m["weights"] if w["status"] == "quantized"}
    assert gates == {"lstm.weight_ih_l0": ([32, 4], 0), "lstm.weight_hh_l0": ([32, 8], 0), "fc.weight": ([3, 8], 0)}  # 4 gates x 8 rows
    assert m["fp"]["loss"] == pytest.approx(own_loss(model, x[:SAMPLES], y[:SAMPLES]), abs=LOSS_ATOL)
    check_top_eigenvalue(m, model, {"x": x[:SAMPLES]}, classification(y[:SAMPLES]))
    assert "qat" in m and m["qat"]["steps"] == 10


# -------------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")


def _corpus(tmp_path: Path) -> Path:
    import inspect
    import textwrap

    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(inspect.getdoc(module) for module in (json, textwrap, inspect)), encoding="utf-8")
    return path


def test_gpt2_save_pretrained_one_transformer_block_by_params(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=256, n_positions=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    corpus = _corpus(tmp_path)
    m = analyze(tmp_path, folder, "--data", f"text:{corpus}", *QUICK, "--max-samples", "4", *LEAN, "--params", "transformer.h.0.*")
    # the block's four Conv1D weights; its LayerNorms and biases, the other block and the tied wte/lm_head stay FP
    assert m["quantized_layers"] == [f"transformer.h.0.{name}.weight" for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert m["n_quantized"] == 16 * 48 + 16 * 16 + 16 * 64 + 64 * 16
    assert all(w["channel_axis"] == 1 for w in m["weights"] if w["status"] == "quantized")  # Conv1D: (in, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = torch.tensor(list(corpus.read_text().encode("utf-8")))
    sequences = ids[: len(ids) // 32 * 32].view(-1, 32)
    n_test = max(1, round(len(sequences) * 0.1))
    train, test = sequences[:-n_test][:4], sequences[-n_test:][:4]
    with torch.no_grad():
        assert m["eval_split"] == "test" and m["fp"]["loss"] == pytest.approx(float(model(input_ids=test, labels=test).loss), abs=LOSS_ATOL)
    model.set_attn_implementation("eager")  # SDPA's CPU kernel has no double backward

    def next_token(outputs):  # HF's own loss rounds float64 logits to float32; this is the same loss in float64
        return F.cross_entropy(outputs.logits[:, :-1].reshape(-1, 256), train[:, 1:].reshape(-1))

    check_top_eigenvalue(m, model, {"input_ids": train}, next_token)


def test_bert_sequence_classifier_folder_needs_labelled_text_and_its_weights_file_is_analysed(tmp_path, capsys):
    config = transformers.BertConfig(vocab_size=256, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    folder = tmp_path / "bert"
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    # the folder is read as a classifier (tests/test_hf_classifier.py), which a plain text file cannot label: refused in one line
    code = cli.main(["analyze", str(folder), "--data", f"text:{_corpus(tmp_path)}", "--out", str(tmp_path / "refused")])
    assert code == 2 and "holds a sequence classifier (BertForSequenceClassification): pass --data textcls:" in capsys.readouterr().err
    m = analyze(tmp_path, folder / "model.safetensors", "--model", f"{ZOO}:hf_sequence_classifier", "--model-kwargs",
                json.dumps({"folder": str(folder)}), "--data", f"{ZOO}:token_labels", "--data-kwargs", '{"vocab": 256}', *QUICK, *LEAN)
    ids, y = zoo.token_labels(vocab=256)
    with torch.no_grad():
        own = model(input_ids=ids[:SAMPLES], labels=y[:SAMPLES])
    assert m["fp"]["loss"] == pytest.approx(float(own.loss), abs=LOSS_ATOL)
    assert m["fp"]["accuracy"] == float((own.logits.argmax(1) == y[:SAMPLES]).double().mean())
    assert "classifier.weight" in m["quantized_layers"] and "bert.encoder.layer.0.attention.self.query.weight" in m["quantized_layers"]
    model.set_attn_implementation("eager")
    check_top_eigenvalue(m, model, {"input_ids": ids[:SAMPLES]}, lambda out: F.cross_entropy(out.logits, y[:SAMPLES]))


def test_budget_quick_on_more_quantized_tensors_than_its_per_layer_stage_covers(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "deep.pt"
    torch.save(zoo.deep_mlp().state_dict(), checkpoint)
    m = analyze(tmp_path, checkpoint, "--model", f"{ZOO}:deep_mlp", "--data", f"{ZOO}:features", *QUICK, "--skip",
                "density,damage,alignment,qat,slices,paths")
    assert m["n_quantized_tensors"] == 9 and len(m["layer_curvature"]) == 8
    rows = m["per_layer"]  # every quantized tensor has a row; the one the quick stage left out has no curvature
    assert [r["layer"] for r in rows] == m["quantized_layers"]
    covered = {r["name"] for r in m["layer_curvature"]}
    assert [r["layer"] for r in rows if r["top_eigenvalue"] is None] == [n for n in m["quantized_layers"] if n not in covered]
    assert any("per-layer curvature on the 8 largest of 9 quantized tensors" in note for note in m["notes"])


def test_a_failed_cpu_allocation_is_an_out_of_memory_line_not_a_bug_report():
    # what torch raised when the whole ResNet-18 (11M quantized weights) asked for 26 GB in the basin-width scan
    exc = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 25919114240 bytes. Error code 12 (Cannot allocate memory)")
    assert cli._input_error_from(exc).startswith("out of memory; lower --max-samples")
    assert cli._input_error_from(MemoryError()).startswith("out of memory")
    assert cli._input_error_from(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None  # other RuntimeErrors stay bugs
