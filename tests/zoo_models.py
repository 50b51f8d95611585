"""Architectures nobody on this project wrote, rebuilt locally for ``tests/test_real_models.py``.

``riverscape analyze --model tests/zoo_models.py:FACTORY --data tests/zoo_models.py:DATA`` loads
them like any user's file. ``resnet18`` has torchvision's layer names, shapes and initialisation
(torchvision itself does not import beside torch 2.13 here), so its state dicts load into
``torchvision.models.resnet18(num_classes=...)`` and back. Every data factory is seeded and
returns ``(inputs, targets)`` tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


# ------------------------------------------------------------------------------ ResNet-18
class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convs with BatchNorm, identity or 1x1-conv shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision ``resnet18``: 7x7 stem, max-pool, four stages of two blocks, average pool, ``fc``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(inplanes, planes, stride, downsample), BasicBlock(planes, planes)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> nn.Module:
    """ResNet-18 with torchvision's names and shapes (11,689,512 parameters at 1000 classes)."""
    return ResNet18(num_classes)


# -------------------------------------------------------------------- MobileNet-style CNN
def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


def mobilenet(num_classes: int = 10, width: int = 8) -> nn.Module:
    """Depthwise-separable CNN (MobileNet v1 style): stem, then depthwise 3x3 (``groups=C``) + pointwise 1x1 blocks."""
    layers = [_conv_bn(3, width, 3, stride=2)]
    c = width
    for stride in (1, 2, 1):
        layers += [_conv_bn(c, c, 3, stride=stride, groups=c), _conv_bn(c, 2 * c, 1)]
        c *= 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


# ------------------------------------------------------------------- tied embeddings
class TiedLM(nn.Module):
    """Next-token classifier whose output projection *is* the input embedding (one Parameter)."""

    def __init__(self, vocab: int = 32, dim: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied: GPT-2's wte/lm_head arrangement

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids).mean(1))))


def tied_lm(vocab: int = 32, dim: int = 12) -> nn.Module:
    return TiedLM(vocab, dim)


# ------------------------------------------------------------------------------- LSTM
class LSTMClassifier(nn.Module):
    """Sequence classifier: a one-layer LSTM over ``(n, T, features)``, the last hidden state into a Linear."""

    def __init__(self, features: int = 4, hidden: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


def lstm_classifier(features: int = 4, hidden: int = 8, num_classes: int = 3) -> nn.Module:
    return LSTMClassifier(features, hidden, num_classes)


# ------------------------------------------------------------------------------- data
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 64, size: int = 32, num_classes: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` RGB images ``(n, 3, size, size)`` and labels: noise plus a class-dependent colour shift."""
    g = _generator(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    shift = torch.randn(num_classes, 3, 1, 1, generator=g)
    return torch.randn(n, 3, size, size, generator=g) + shift[y], y


def tokens(n: int = 64, length: int = 6, vocab: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token contexts ``(n, length)`` and a next token that depends on the last one."""
    g = _generator(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return ids, (ids[:, -1] * 7 + 3) % vocab


def sequences(n: int = 64, length: int = 7, features: int = 4, num_classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Float sequences ``(n, length, features)``; the label is the arg-max of the summed features (mod classes)."""
    g = _generator(seed)
    x = torch.randn(n, length, features, generator=g)
    return x, x.sum(1).argmax(1) % num_classes


# ---------------------------------------------------------------- Hugging Face classifier
def hf_sequence_classifier(folder: str) -> nn.Module:
    """The architecture of a ``save_pretrained`` sequence classifier, built from its ``config.json`` (no weights, no network)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    return transformers.AutoModelForSequenceClassification.from_config(config)


def token_labels(n: int = 64, length: int = 8, vocab: int = 20, num_labels: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token sequences ``(n, length)`` and a label that is their id sum modulo ``num_labels``."""
    ids = torch.randint(0, vocab, (n, length), generator=_generator(seed))
    return ids, ids.sum(1) % num_labels


def deep_mlp(depth: int = 9, width: int = 4, num_classes: int = 3) -> nn.Module:
    """``depth`` tanh Linear layers: more quantized tensors than ``--budget quick``'s per-layer stage covers (8)."""
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def features(n: int = 64, width: int = 4, num_classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian features ``(n, width)`` and the arg-max of their first ``num_classes`` coordinates."""
    x = torch.randn(n, width, generator=_generator(seed))
    return x, x[:, :num_classes].argmax(1)
