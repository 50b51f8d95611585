"""``--data text:FOLDER`` / ``textcls:FOLDER``: a Hugging Face ``datasets`` folder (``save_to_disk``) read offline.

The folder route must give exactly the tensors the text-file route gives for the same texts (the
rest of the pipeline is tested on the file route), use a DatasetDict's own held-out split, and
fail in one line on folders it cannot read.
"""
from __future__ import annotations

import pytest
import torch

from riverscape import cli
from riverscape.errors import InputError

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from riverscape.io.hf import labelled_text_data, text_file_data  # noqa: E402

TEXTS = [f"document {i}: " + "héllo wörld, " * (3 + i % 4) for i in range(12)]
LABELS = ("negative", "positive")


def _gpt2():
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=256, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def _bert():
    config = transformers.BertConfig(vocab_size=256, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=16, num_labels=2, id2label=dict(enumerate(LABELS)),
                                     label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def test_a_dataset_folder_gives_the_sequences_of_the_same_texts_in_a_file(tmp_path):
    folder, corpus = tmp_path / "ds", tmp_path / "corpus.txt"
    datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))}).save_to_disk(str(folder))
    corpus.write_text("\n\n".join(TEXTS), encoding="utf-8")
    model = _gpt2()
    from_folder, from_file = text_file_data(folder, model, None), text_file_data(corpus, model, None)
    assert torch.equal(from_folder.train[0], from_file.train[0]) and torch.equal(from_folder.test[0], from_file.test[0])
    assert from_folder.spec["name"] == "text-dataset" and from_folder.loss == "causal_lm"


def test_a_dataset_dict_folder_is_analysed_on_train_and_evaluated_on_its_test_split(tmp_path):
    folder = tmp_path / "dsd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:8]}),
                          "test": datasets.Dataset.from_dict({"text": TEXTS[8:]})}).save_to_disk(str(folder))
    data = text_file_data(folder, _gpt2(), None)
    stream = lambda texts: torch.tensor(list("\n\n".join(texts).encode("utf-8")))  # noqa: E731  byte-level ids
    train_ids, test_ids = stream(TEXTS[:8]), stream(TEXTS[8:])
    n_train, n_test = len(train_ids) // 16, len(test_ids) // 16
    assert torch.equal(data.train[0].reshape(-1), train_ids[: n_train * 16])
    assert torch.equal(data.test[0].reshape(-1), test_ids[: n_test * 16])


def test_labelled_dataset_folder_equals_the_labelled_file(tmp_path):
    rows = [(LABELS[i % 2], f"text {i} " + "bien " * (i % 5)) for i in range(10)]
    tsv, folder, indexed = tmp_path / "rows.tsv", tmp_path / "ds", tmp_path / "ds_idx"
    tsv.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    datasets.Dataset.from_dict({"sentence": [t for _, t in rows], "label": [lab for lab, _ in rows]}).save_to_disk(str(folder))
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABELS))})
    datasets.Dataset.from_dict({"text": [t for _, t in rows], "label": [LABELS.index(lab) for lab, _ in rows]},
                               features=features).save_to_disk(str(indexed))
    model = _bert()
    expected = labelled_text_data(tsv, model, None)
    for source in (folder, indexed):  # label names and ClassLabel indices
        got = labelled_text_data(source, model, None)
        for a, b in zip(got.train + got.test, expected.train + expected.test):
            assert torch.equal(a[0]["input_ids"], b[0]["input_ids"]) and torch.equal(a[0]["attention_mask"], b[0]["attention_mask"])
            assert torch.equal(a[1], b[1])


def test_bad_dataset_folders_are_one_clear_error(tmp_path):
    model = _gpt2()
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a Hugging Face datasets folder"):
        text_file_data(tmp_path / "plain", model, None)
    datasets.Dataset.from_dict({"body": TEXTS}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(InputError, match=r"no text column \(text or sentence or content\) among body"):
        text_file_data(tmp_path / "nocol", model, None)
    datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": ["negative", "sideways"]}).save_to_disk(str(tmp_path / "badlabel"))
    with pytest.raises(InputError, match=r"row 1\): unknown label 'sideways'"):
        labelled_text_data(tmp_path / "badlabel", _bert(), None)


def test_cli_reports_a_foreign_folder_in_one_line(tmp_path, capsys):
    model_dir = tmp_path / "gpt2"
    _gpt2().save_pretrained(model_dir)
    (tmp_path / "plain").mkdir()
    capsys.readouterr()  # save_pretrained's own progress bar
    code = cli.main(["analyze", str(model_dir), "--data", f"text:{tmp_path / 'plain'}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("riverscape: error: ") and "datasets folder" in err
    assert not (tmp_path / "out").exists()
