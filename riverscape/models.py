"""Built-in reference models (no downloads), and a registry to build them by name.

=============  ==========================================================  =====================
name           model                                                       typical data
=============  ==========================================================  =====================
``mlp``        :class:`MLP`, fully connected, tanh or ReLU                 digits, mnist1d
``cnn``        :class:`SmallCNN`, two 3x3 conv layers + linear head (2-D)  digits (8x8 images)
``cnn1d``      :class:`ConvNet1D`, three 1-D conv layers + linear head     mnist1d
``cifar_cnn``  :class:`CifarCNN`, 3 conv + 2 fc, no BatchNorm (~90k)       CIFAR-shaped tensors
``resnet20``   :func:`resnet20`, CIFAR ResNet-20 with BatchNorm            images
``transformer``:class:`TinyTransformer`, causal character model           text
``linear``     a bias-free linear student ``nn.Linear(d, 1)``              teacher-student
=============  ==========================================================  =====================
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "SmallCNN",
    "ConvNet1D",
    "CifarCNN",
    "ResNet",
    "resnet20",
    "TinyTransformer",
    "LinearStudent",
    "build_model",
    "MODEL_NAMES",
]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


class MLP(nn.Sequential):
    """Fully connected network ``in_dim -> hidden... -> out_dim``.

    Parameters
    ----------
    in_dim, out_dim : int
    hidden : tuple of int
        Widths of the hidden layers (default one layer of 32: the 64-32-10 digits MLP,
        2410 parameters).
    activation : {"tanh", "relu", "gelu"}
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: tuple[int, ...] = (32,), activation: str = "tanh") -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), _activation(activation)]
            width = h
        layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Two 3x3 conv layers (padding 1, ReLU, 2x2 max-pool after the second) and a linear head.

    For ``8x8`` digits with default widths (8, 16): about 3.9k parameters.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8, channels: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        side = image_size // 2
        self.fc = nn.Linear(c2 * side * side, num_classes)
        self.image_size = image_size
        self.in_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:  # flat images
            x = x.view(x.shape[0], self.in_channels, self.image_size, self.image_size)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class ConvNet1D(nn.Module):
    """Three 1-D conv layers (kernel 5, stride 2 after the first) and a linear head, for MNIST-1D."""

    def __init__(self, length: int = 40, num_classes: int = 10, channels: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, 5, stride=2, padding=2)
        self.conv3 = nn.Conv1d(channels, channels, 5, stride=2, padding=2)
        out_len = math.ceil(math.ceil(length / 2) / 2)
        self.fc = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            x = x[:, None, :]
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


class CifarCNN(nn.Module):
    """3 conv + 2 fc layers without BatchNorm for 32x32 RGB inputs (~90k parameters).

    The workload the peers were measured on (issue 7): conv 3->16->32->32 (3x3, ReLU,
    2x2 max-pool after each), fc 512->128->10.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2) with BatchNorm: 6n+2 layers."""

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks_per_stage):
                stages.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)
        self.in_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:  # flat square images
            side = int(round(math.sqrt(x.shape[1] / self.in_channels)))
            x = x.view(x.shape[0], self.in_channels, side, side)
        x = F.relu(self.bn(self.conv(x)))
        x = self.layers(x)
        return self.fc(x.mean(dim=(2, 3)))


def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    """ResNet-20 for CIFAR-shaped inputs (about 0.27M parameters at width 16)."""
    return ResNet(3, num_classes, in_channels, width)


class _CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        h = self.n_heads
        q, k, v = (u.view(b, t, h, c // h).transpose(1, 2) for u in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(out)


class _TransformerBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """A small causal (GPT-style) character model: outputs logits ``(N, T, vocab)``."""

    def __init__(self, vocab_size: int, seq_len: int = 32, d_model: int = 32, n_heads: int = 2, n_layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.Sequential(*[_TransformerBlock(d_model, n_heads) for _ in range(n_layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.seq_len = seq_len

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's {self.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok(idx) + self.pos(pos)[None]
        return self.head(self.ln(self.blocks(x)))


class LinearStudent(nn.Linear):
    """Bias-free linear student ``y = w.x`` (teacher-student experiments)."""

    def __init__(self, dim: int, out_dim: int = 1) -> None:
        super().__init__(dim, out_dim, bias=False)


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "cnn1d": ConvNet1D,
    "cifar_cnn": CifarCNN,
    "resnet20": resnet20,
    "transformer": TinyTransformer,
    "linear": LinearStudent,
}
MODEL_NAMES = tuple(_FACTORIES)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a built-in model by name (see the module table) with keyword arguments.

    >>> build_model("mlp", in_dim=64, out_dim=10).__class__.__name__
    'MLP'
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {list(_FACTORIES)}") from None
    return factory(**kwargs)
