"""Hugging Face models built locally from tiny configs (no downloads): their own loss, perplexity, accuracy, curvature."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import riverscape as rs
from riverscape.landscape.curvature import hessian_eigs

from helpers import assert_close

transformers = pytest.importorskip("transformers")

VOCAB = 11


def _gpt2(n_embd: int = 8):
    config = transformers.GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=VOCAB, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()  # HF's default attention: "sdpa"


def _lm_batches():
    """Two batches of different sizes and lengths, right-padded sequences (mask 0, labels -100)."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for n, t in ((3, 6), (2, 5)):
        ids = torch.randint(0, VOCAB, (n, t), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches


def _one_batch(batches):
    """All sequences right-padded into a single batch: the model's own loss on it is the mean over all tokens."""
    width = max(b["input_ids"].shape[1] for b in batches)
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.cat([F.pad(b[k], (0, width - b[k].shape[1]), value=v) for b in batches]) for k, v in pad.items()}


def test_gpt2_model_loss_is_the_models_own_and_perplexity_is_its_exp():
    model = _gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _lm_batches()
    obj = rs.Objective(model, "model", batches)
    assert obj.notes and "'sdpa' to 'eager'" in obj.notes[0]
    assert model.config._attn_implementation == "sdpa"  # only riverscape's copy was switched
    assert obj.batch_counts == [3 * 5 - 2, 2 * 4 - 2] and obj.metric_name == "perplexity"
    with torch.no_grad():
        own = float(model(**_one_batch(batches)).loss)
    # float32 model: the token-weighted average of two batch means vs one mean, ~1e-7 apart
    assert obj.loss(obj.theta0) == pytest.approx(own, abs=1e-6)
    assert obj.metric(obj.theta0) == pytest.approx(math.exp(obj.loss(obj.theta0)), rel=1e-12)
    losses, ppl = obj.evaluate(obj.theta0 + torch.zeros(2, obj.dim))
    assert_close(losses, torch.full((2,), own), rtol=0, atol=1e-6, what="batched GPT-2 losses")
    assert_close(ppl, losses.exp(), rtol=1e-6, what="batched perplexity")
    g = obj.grad(obj.theta0)
    assert torch.isfinite(g).all() and float(g.norm()) > 0
    obj.hvp(obj.theta0, g)  # eager attention: differentiable twice
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model is untouched


def test_gpt2_top_hessian_eigenvalue_matches_a_dense_reference_in_float64():
    model = _gpt2(n_embd=4)
    batches = _lm_batches()
    obj = rs.Objective(model, "causal_lm", batches, dtype=torch.float64, params="transformer.h.1.*")
    # HF's own loss upcasts logits with .float(), which rounds float64 to float32; causal_lm is the
    # same function in float64 (checked against the model's loss at float32 accuracy)
    own = rs.Objective(model, "model", batches, dtype=torch.float64, params="transformer.h.1.*")
    assert own.loss(obj.theta0) == pytest.approx(obj.loss(obj.theta0), abs=1e-6)
    reference = model.double()  # the test's own copy below is independent of the Objective
    names = obj.param_names
    params = dict(reference.named_parameters())
    sizes = [params[n].numel() for n in names]
    reference.set_attn_implementation("eager")

    def f(theta):
        new = {n: c.view(params[n].shape) for n, c in zip(names, torch.split(theta, sizes))}
        total, count = 0.0, 0
        for b in batches:
            logits = torch.func.functional_call(reference, new, (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}).logits
            labels = b["labels"][:, 1:].reshape(-1)
            total = total + F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels, ignore_index=-100, reduction="sum")
            count += int((labels != -100).sum())
        return total / count

    theta = obj.theta0
    # plain autograd double backward: torch.func.hessian / jacrev(jacrev) of this f give an
    # asymmetric (wrong by 4e-3, checked against finite differences) matrix in torch 2.13
    dense = torch.autograd.functional.hessian(f, theta, vectorize=True)
    assert_close(obj.dense_hessian(theta), dense, rtol=1e-9, atol=1e-12, what="GPT-2 dense Hessian")
    top_dense = torch.linalg.eigvalsh(dense).flip(0)[:3]
    top, _ = hessian_eigs(obj, theta, 3)
    # float64 ARPACK to tol 1e-8 relative on eigenvalues of order 0.1-1
    assert_close(top, top_dense, rtol=1e-8, atol=1e-10, what="GPT-2 top Hessian eigenvalues")


def test_bert_sequence_classifier_model_loss_and_accuracy():
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (9, 6), generator=g)
    labels = torch.randint(0, 3, (9,), generator=g)
    batches = [{"input_ids": ids[i:j], "attention_mask": torch.ones_like(ids[i:j]), "labels": labels[i:j]} for i, j in ((0, 4), (4, 5), (5, 9))]
    obj = rs.Objective(model, "model", batches)
    assert obj.metric_name == "accuracy" and obj.batch_counts == obj.batch_sizes == [4, 1, 4]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert obj.loss(obj.theta0) == pytest.approx(float(out.loss), abs=1e-6)  # sample-weighted = one mean over 9 samples
    assert obj.metric(obj.theta0) == pytest.approx(float((out.logits.argmax(-1) == labels).double().mean()), abs=1e-12)
    assert obj.hvp(obj.theta0, obj.grad(obj.theta0)).isfinite().all()


# ------------------------------------------------------------------ riverscape analyze on a save_pretrained folder
def _stdlib_text() -> str:
    import inspect
    import json
    import textwrap

    return "\n".join(inspect.getdoc(module) for module in (json, textwrap, inspect))


def _save_gpt2(folder, vocab_size: int) -> None:
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=vocab_size, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)


def test_text_file_data_tokenises_byte_level_without_a_tokenizer_and_explains_bad_folders(tmp_path):
    from riverscape.errors import CheckpointError, InputError
    from riverscape.io.hf import load_hf_analysis, load_hf_folder, load_tokenizer, text_file_data

    folder = tmp_path / "gpt2"
    _save_gpt2(folder, vocab_size=256)
    text = "héllo wörld, " * 20  # 20 x 15 = 300 UTF-8 bytes (the accents take two)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    loaded = load_hf_folder(folder)
    assert loaded.source_format == "huggingface" and loaded.loss == "causal_lm" and load_tokenizer(folder) is None
    assert loaded.model.config._attn_implementation == "eager"
    data = text_file_data(corpus, loaded.model, None)
    ids = torch.tensor(list(text.encode("utf-8")))
    train, test = data.train[0], data.test[0]
    assert len(ids) == 300 and train.shape[1] == 16 and len(train) + len(test) == 300 // 16 and len(test) == 2  # round(1.8)
    assert torch.equal(torch.cat([train, test]).reshape(-1), ids[: 18 * 16])
    assert data.train[1] is data.train[0] and data.spec["kwargs"]["tokenizer"] == "bytes"
    with pytest.raises(InputError, match="--data text:"):
        load_hf_analysis(folder, "digits")
    small = tmp_path / "small"
    _save_gpt2(small, vocab_size=50)
    with pytest.raises(InputError, match="byte-level fallback"):
        load_hf_analysis(small, f"text:{corpus}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        load_hf_folder(tmp_path / "empty")


@pytest.mark.slow
def test_cli_analyzes_a_save_pretrained_gpt2_with_its_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from riverscape import cli

    text = _stdlib_text()
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=64, special_tokens=["[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    folder = tmp_path / "gpt2"
    _save_gpt2(folder, vocab_size=fast.vocab_size)
    fast.save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    out = tmp_path / "report"
    code = cli.main(["analyze", str(folder), "--bits", "4", "--data", f"text:{corpus}", "--qat-steps", "0", "--grid-steps", "3",
                     "--top-k", "1", "--max-samples", "64", "--out", str(out), "--json"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # the model's own loss on the evaluation split, tokenised and cut the same way (16-token sequences, last tenth)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = torch.tensor(fast(text, add_special_tokens=False)["input_ids"])
    sequences = ids[: len(ids) // 16 * 16].view(-1, 16)
    test = sequences[-max(1, round(len(sequences) * 0.1)):]
    assert len(test) <= 64  # the evaluation split is not capped by --max-samples
    with torch.no_grad():
        own = float(model(input_ids=test, labels=test).loss)
    assert metrics["fp"]["loss"] == pytest.approx(own, abs=1e-5)
    assert metrics["fp"]["accuracy"] is None and metrics["fp"]["perplexity"] == pytest.approx(math.exp(metrics["fp"]["loss"]), rel=1e-9)
    assert metrics["ptq"]["perplexity"] == pytest.approx(math.exp(metrics["ptq"]["loss"]), rel=1e-9)
    assert metrics["run"]["source_format"] == "huggingface" and metrics["run"]["data"]["kwargs"]["tokenizer"] == "folder"
    assert any(note.startswith("language model: perplexity") for note in metrics["notes"])
    assert "language model: perplexity" in (out / "report.html").read_text()
