"""A Hugging Face sequence classifier from ``save_pretrained`` analysed on a labelled text file (no downloads).

The tiny BERT and its WordPiece tokenizer are built here from a hand-written vocabulary; the data
file is ``LABEL<TAB>TEXT`` per line (``--data textcls:FILE``).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from riverscape import cli

transformers = pytest.importorskip("transformers")

WORDS = "the a film movie was is good bad great awful fine dull plot acting very not".split()
LABELS = ("negative", "neutral", "positive")


def _save_bert(folder, *, tokenizer: bool = True, vocab_size: int = 0, **config_kwargs) -> None:
    """A 1-layer BERT classifier (3 labels with names) and, optionally, its tokenizer, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    fast = transformers.BertTokenizerFast(vocab_file=str(vocab))
    vocab.unlink()
    kwargs = dict(num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    kwargs.update(config_kwargs)
    config = transformers.BertConfig(vocab_size=vocab_size or fast.vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, **kwargs)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).eval().save_pretrained(folder)
    if tokenizer:
        fast.save_pretrained(folder)


def _lines(n: int = 30) -> list[tuple[str, str]]:
    """``n`` (label, text) pairs, texts of 2 to 20 words (the longest are truncated to 16 tokens)."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(n):
        words = int(torch.randint(2, 21, (1,), generator=g))
        text = " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (words,), generator=g))
        pairs.append((["negative", "neutral", "positive", "2"][i % 4], text))  # names, and a class index
    return pairs


def _write(path, pairs) -> str:
    path.write_text("".join(f"{label}\t{text}\n" for label, text in pairs) + "\n")  # a trailing blank line is skipped
    return f"textcls:{path}"


LEAN = ["--budget", "quick", "--bits", "4", "--skip", "density,layers,damage,alignment,qat,slices,paths"]


def test_cli_analyzes_a_save_pretrained_bert_classifier_on_labelled_text(tmp_path):
    folder = tmp_path / "bert"
    _save_bert(folder)
    pairs = _lines()
    out = tmp_path / "report"
    assert cli.main(["analyze", str(folder), "--data", _write(tmp_path / "reviews.tsv", pairs), *LEAN, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["run"]["source_format"] == "huggingface" and m["run"]["loss"] == "cross_entropy"
    assert m["run"]["data"] == {"name": "labelled-text-file", "kwargs": {"path": str(tmp_path / "reviews.tsv"), "seq_len": 16,
                                                                          "samples": 30, "tokenizer": "folder"}}
    assert "classifier.weight" in m["quantized_layers"] and "bert.encoder.layer.0.attention.self.query.weight" in m["quantized_layers"]
    # the model's own loss on the evaluation split (the last tenth: 3 lines), tokenised by the folder's own tokenizer
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    test = pairs[-3:]
    batch = tokenizer([t for _, t in test], padding=True, truncation=True, max_length=16, return_tensors="pt")
    labels = torch.tensor([int(label) if label.isdigit() else LABELS.index(label) for label, _ in test])
    with torch.no_grad():
        own = model(**batch, labels=labels)
    assert m["eval_split"] == "test"
    # float32 forwards of the same tokens (padding to the longest line of the file vs of the split, masked out)
    assert m["fp"]["loss"] == pytest.approx(float(own.loss), abs=1e-5)
    assert m["fp"]["accuracy"] == pytest.approx(float((own.logits.argmax(1) == labels).double().mean()), abs=1e-7)  # a float32 mean
    assert m["fp"]["loss"] == pytest.approx(float(F.cross_entropy(own.logits, labels)), abs=1e-5)


def test_labelled_text_without_a_tokenizer_is_byte_level_padded_and_masked(tmp_path):
    from riverscape.io.hf import labelled_text_data, load_hf_analysis

    folder = tmp_path / "bert"
    _save_bert(folder, tokenizer=False, vocab_size=256)
    pairs = [("positive", "fine"), ("0", "héllo wörld, a very long text"), ("neutral", "ok")]
    loaded, data = load_hf_analysis(folder, _write(tmp_path / "bytes.tsv", pairs))
    assert type(loaded.model).__name__ == "BertForSequenceClassification" and loaded.loss == "cross_entropy"
    assert loaded.model.config._attn_implementation == "eager"
    (train_inputs, train_labels), = data.train
    (test_inputs, test_labels), = data.test
    assert torch.equal(train_labels, torch.tensor([2, 0])) and torch.equal(test_labels, torch.tensor([1]))
    ids = torch.cat([train_inputs["input_ids"], test_inputs["input_ids"]])
    mask = torch.cat([train_inputs["attention_mask"], test_inputs["attention_mask"]])
    long = list("héllo wörld, a very long text".encode("utf-8"))[:16]  # truncated to max_position_embeddings
    assert ids.tolist() == [[*b"fine", *[0] * 12], long, [*b"ok", *[0] * 14]]  # right-padded with config.pad_token_id 0
    assert mask.sum(1).tolist() == [4, 16, 2] and data.spec["kwargs"]["tokenizer"] == "bytes"
    assert labelled_text_data(tmp_path / "bytes.tsv", loaded.model, None).spec == data.spec


@pytest.mark.parametrize(
    "content, message",
    [
        ("positive\tgood film\ngood film without a label\n", "bad.tsv:2: no label; each line of a textcls: file is LABEL<TAB>TEXT"),
        ("\tgood film\n", "bad.tsv:1: no label"),
        ("positive\tgood\nexcellent\tgreat film\n", "bad.tsv:2: unknown label 'excellent'; the model's labels are negative, neutral, "
                                                   "positive (or 0 to 2)"),
        ("positive\tgood\n3\tgreat film\n", "bad.tsv:2: unknown label '3'"),
        ("positive\t  \n", "bad.tsv:1: label 'positive' has no text after the tab"),
        ("", "holds 0 labelled lines (LABEL<TAB>TEXT); at least two are needed"),
        ("\n\n", "holds 0 labelled lines"),
    ],
    ids=["no-tab", "empty-label", "unknown-name", "index-out-of-range", "no-text", "empty", "blank"],
)
def test_bad_labelled_files_give_one_clear_error_line(tmp_path, capsys, content, message):
    folder = tmp_path / "bert"
    _save_bert(folder)
    (tmp_path / "bad.tsv").write_text(content)
    code = cli.main(["analyze", str(folder), "--data", f"textcls:{tmp_path / 'bad.tsv'}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("riverscape: error: ") and message in err[0]


def test_folder_kind_decides_the_data_and_other_heads_are_refused(tmp_path, capsys):
    from riverscape.errors import CheckpointError
    from riverscape.io.hf import load_hf_folder

    folder = tmp_path / "bert"
    _save_bert(folder)
    code = cli.main(["analyze", str(folder), "--data", "text:corpus.txt", "--out", str(tmp_path / "out")])
    assert code == 2 and "holds a sequence classifier (BertForSequenceClassification): pass --data textcls:" in capsys.readouterr().err
    regression = tmp_path / "regression"
    _save_bert(regression, tokenizer=False, num_labels=1, id2label={0: "score"}, label2id={"score": 0})
    with pytest.raises(CheckpointError, match="single-label classifiers"):
        load_hf_folder(regression)
    masked = tmp_path / "masked"
    config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    transformers.BertForMaskedLM(config).save_pretrained(masked)
    with pytest.raises(CheckpointError, match="holds a BertForMaskedLM, neither a causal language model"):
        load_hf_folder(masked)
