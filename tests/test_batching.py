"""Any batch, any output, any loss: dict/tuple/tensor batches, structured outputs, token-weighted losses."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian as autograd_hessian

import riverscape as rs
from riverscape.batching import LossOnBatch, causal_lm, logits_of, split_batch

from helpers import assert_close, tiny_mlp

VOCAB, WIDTH = 7, 4


class TinyLM(nn.Module):
    """Embedding -> tanh linear -> logits (N, T, V); optional mask and labels like an HF model."""

    def __init__(self, output: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.output = output
        self.config = SimpleNamespace(is_decoder=True)  # how loss="model" knows the labels are shifted

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = torch.tanh(self.mix(self.embed(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask[..., None].to(h.dtype)
        logits = self.head(h)
        if self.output == "tensor":
            return logits
        loss = None if labels is None else causal_lm(logits, labels)
        if self.output == "dict":
            return {"logits": logits, "loss": loss}
        return SimpleNamespace(logits=logits, loss=loss)


def _token_batches(seed: int = 0):
    """Three batches with different sizes and sequence lengths, some labels ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n, t in ((3, 5), (1, 6), (4, 3)):
        ids = torch.randint(0, VOCAB, (n, t), generator=g)
        labels = ids.clone()
        labels[0, -2:] = -100  # padding at the end of the first sequence
        batches.append({"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels})
    return batches


def _token_reference(model: nn.Module, batches, names):
    """Sum of per-token losses over all batches / number of counted tokens, as a function of theta."""
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]

    def f(theta):
        new = {n: c.view(params[n].shape) for n, c in zip(names, torch.split(theta, sizes))}
        total, count = 0.0, 0
        for b in batches:
            out = torch.func.functional_call(model, new, (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
            logits = logits_of(out)
            shifted, labels = logits[:, :-1].reshape(-1, VOCAB), b["labels"][:, 1:].reshape(-1)
            total = total + F.cross_entropy(shifted, labels, ignore_index=-100, reduction="sum")
            count += int((labels != -100).sum())
        return total / count

    return f


@pytest.mark.parametrize("loss,output", [("causal_lm", "tensor"), ("model", "dict"), ("model", "object")])
def test_token_losses_average_over_all_counted_tokens(loss, output):
    model = TinyLM(output).double()
    batches = _token_batches()
    obj = rs.Objective(model, loss, batches)
    f = _token_reference(model, batches, obj.param_names)
    theta = obj.theta0 + 0.2 * torch.randn(obj.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # counted tokens labels[:, 1:] != -100 per batch: 3*4 - 2, 1*5 - 2, 4*2 - 2
    assert obj.batch_counts == [10, 3, 6] and obj.batch_sizes == [3, 1, 4]
    # float64 sums in a different order: 1e-13 relative
    assert abs(obj.loss(theta) - float(f(theta))) <= 1e-13 * float(f(theta))
    assert_close(obj.grad(theta), torch.func.grad(f)(theta), rtol=1e-10, atol=1e-13, what="token-weighted gradient")
    v = torch.randn(obj.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert_close(obj.hvp(theta, v), autograd_hessian(f, theta) @ v, rtol=1e-8, atol=1e-12, what="token-weighted hvp")
    assert obj.metric_name == "perplexity"
    assert obj.metric(theta) == pytest.approx(torch.exp(f(theta)).item(), rel=1e-12)
    losses, ppl = obj.evaluate(torch.stack([theta, obj.theta0]))
    assert_close(ppl, losses.exp(), rtol=1e-15, what="batched perplexity")
    # the same sequences one per batch give the same value (exact token weighting; a sample
    # weighting would give 1/8 to every sequence whatever its length)
    singles = [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]
    assert rs.Objective(model, loss, singles).loss(theta) == pytest.approx(obj.loss(theta), rel=1e-13)


def test_dict_and_tuple_batches_agree_and_labels_reach_the_model_only_for_its_own_loss():
    model = TinyLM("dict").double()
    dicts = _token_batches()
    tuples = [(b["input_ids"], b["labels"]) for b in dicts]
    no_mask = [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in dicts]
    by_dict = rs.Objective(model, "causal_lm", no_mask)
    by_tuple = rs.Objective(model, lambda out, y: causal_lm(out, y), tuples)
    assert split_batch(no_mask[0])[0].keys() == {"input_ids"}
    assert split_batch(no_mask[0], keep_labels=True)[0].keys() == {"input_ids", "labels"}
    # a plain callable is weighted by samples, causal_lm by tokens: the same per-batch values, other weights
    per_batch = [by_dict.batch_loss(by_dict.theta0, x, y) for x, y in by_dict.batches]
    assert [float(a) for a in per_batch] == [float(by_tuple.batch_loss(by_tuple.theta0, x, y)) for x, y in by_tuple.batches]
    assert by_tuple.batch_counts == by_tuple.batch_sizes == [3, 1, 4]
    # inputs-only tensor batches: causal_lm takes the input ids as labels
    ids_only = [b["input_ids"] for b in dicts]
    plain = TinyLM("tensor").double()
    implicit = rs.Objective(plain, "causal_lm", ids_only)
    explicit = rs.Objective(plain, "causal_lm", [{"input_ids": i, "labels": i} for i in ids_only])
    assert implicit.batch_counts == [3 * 4, 1 * 5, 4 * 2]
    assert implicit.loss(implicit.theta0) == explicit.loss(implicit.theta0)


@pytest.mark.parametrize("wrap", [lambda t: (t, "extra"), lambda t: {"logits": t}, lambda t: SimpleNamespace(logits=t)],
                         ids=["tuple", "dict", "model-output"])
def test_structured_outputs_give_the_tensor_numbers_and_keep_accuracy(wrap, classification_data):
    x, y = classification_data
    base = tiny_mlp(0)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = base

        def forward(self, inputs):
            return wrap(self.net(inputs))

    plain = rs.Objective(base, "cross_entropy", (x, y), batch_size=4)
    wrapped = rs.Objective(Wrapped(), "cross_entropy", (x, y), batch_size=4)
    theta = plain.theta0
    assert wrapped.loss(theta) == plain.loss(theta)
    assert_close(wrapped.grad(theta), plain.grad(theta), rtol=0, atol=0, what="grad through a structured output")
    assert wrapped.metric_name == plain.metric_name == "accuracy"
    assert wrapped.metric(theta) == plain.metric(theta)
    assert torch.equal(logits_of(wrap(x)), x)


def test_model_loss_weights_samples_for_per_sample_labels_and_keeps_accuracy(classification_data):
    x, y = classification_data

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_mlp(0)

        def forward(self, features, labels=None):
            logits = self.net(features)
            return {"logits": logits, "loss": None if labels is None else F.cross_entropy(logits, labels)}

    batches = [{"features": x[i : i + 4], "labels": y[i : i + 4]} for i in range(0, len(x), 4)]  # 6 unequal batches
    obj = rs.Objective(Classifier(), "model", batches)
    ref = rs.Objective(tiny_mlp(0), "cross_entropy", (x, y))
    assert obj.batch_counts == obj.batch_sizes
    assert obj.loss(ref.theta0) == pytest.approx(ref.loss(ref.theta0), rel=1e-14)
    assert obj.metric_name == "accuracy" and obj.metric(ref.theta0) == pytest.approx(ref.metric(ref.theta0), abs=1e-15)
    with pytest.raises(ValueError, match="needs the model to return its loss"):
        rs.Objective(Classifier(), "model", [{"features": x}]).loss(ref.theta0)


def test_loss_on_batch_uses_its_count_for_the_weights(classification_data):
    x, y = classification_data
    model = tiny_mlp(0)
    mask = (torch.arange(len(x)) % 3 != 0).double()
    data = [(x[i : i + 5], (y[i : i + 5], mask[i : i + 5])) for i in range(0, len(x), 5)]

    def masked_ce(outputs, batch):
        labels, m = batch[1]
        return (F.cross_entropy(outputs, labels, reduction="none") * m).sum() / m.sum()

    obj = rs.Objective(model, LossOnBatch(masked_ce, count=lambda batch: int(batch[1][1].sum())), data)
    theta = obj.theta0
    with torch.no_grad():
        expected = (F.cross_entropy(model(x), y, reduction="none") * mask).sum() / mask.sum()
    assert obj.loss(theta) == pytest.approx(float(expected), rel=1e-14)
    assert obj.batch_counts == [int(m.sum()) for _, (_, m) in data]
    assert obj.metric_name is None  # a user loss suggests no metric
    with pytest.raises(TypeError, match="callable"):
        LossOnBatch(masked_ce, count=3)


def test_bad_batches_and_missing_targets_are_explained(classification_data):
    x, y = classification_data
    with pytest.raises(TypeError, match="each batch must be"):
        rs.Objective(tiny_mlp(0), "cross_entropy", [(x,)])
    with pytest.raises(ValueError, match="needs targets"):
        inputs_only = rs.Objective(tiny_mlp(0), "cross_entropy", [x])
        inputs_only.loss(inputs_only.theta0)
    with pytest.raises(ValueError, match="hold no sample or token the loss counts"):
        rs.Objective(TinyLM().double(), "causal_lm", [{"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.full((2, 3), -100)}])
    with pytest.raises(ValueError, match="unknown loss"):
        rs.Objective(tiny_mlp(0), "hinge", (x, y))


def test_perplexity_is_inf_where_exp_of_the_loss_overflows():
    obj = rs.Objective(TinyLM().double(), "causal_lm", _token_batches())
    far = obj.theta0 * 1e3  # logits of order 1e6: a loss far beyond log(max float64) = 709.78
    assert obj.loss(far) > 709.78 and obj.metric(far) == float("inf")
    assert obj.evaluate(far[None])[1][0] == float("inf")
