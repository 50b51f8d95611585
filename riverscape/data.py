"""Built-in datasets that need no download: every one ships with a package or is generated.

===================  ===================================================================
name                 source
===================  ===================================================================
``digits``           ``sklearn.datasets.load_digits`` (1797 8x8 images, 10 classes)
``digits32``         the same digits as CIFAR-shaped 3x32x32 colour images (:func:`digits32`)
``mnist1d``          ``mnist1d.data.make_dataset`` (procedural 1-D digits, length 40)
``teacher_linear``   linear teacher ``y = w*.x / sqrt(d) + noise``, Gaussian inputs
``teacher_sign``     sign-perceptron teacher ``y = sign(w*.x / sqrt(d))``, w* in {-1, +1}^d
``text``             characters of text shipped with the Python standard library
===================  ===================================================================
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "load_dataset", "estimated_bytes", "digits", "digits32", "mnist1d", "teacher_student", "stdlib_text", "DATASET_NAMES"]


@dataclass
class Dataset:
    """Train/test tensors and what a model needs to know about them.

    Attributes
    ----------
    name : str
    x_train, y_train, x_test, y_test : Tensor
    loss : str
        ``"cross_entropy"`` or ``"mse"``.
    num_classes : int or None
        Classes (vocabulary size for text); ``None`` for regression.
    input_shape : tuple of int
        Shape of one input.
    info : dict
        Extra facts (teacher weights, vocabulary, generator settings).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    loss: str
    num_classes: int | None
    input_shape: tuple[int, ...]
    info: dict = field(default_factory=dict)

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.x_test, self.y_test

    def model_kwargs(self, model: str) -> dict:
        """Keyword arguments that fit built-in model ``model`` to this data."""
        n_in = int(np.prod(self.input_shape))
        out = self.num_classes if self.num_classes is not None else 1
        if model == "mlp":
            return {"in_dim": n_in, "out_dim": out}
        if model == "cnn":
            side = int(round(np.sqrt(n_in)))
            return {"in_channels": 1, "num_classes": out, "image_size": side}
        if model == "cnn1d":
            return {"length": n_in, "num_classes": out}
        if model in ("resnet20", "cifar_cnn"):
            channels = self.input_shape[0] if len(self.input_shape) == 3 else 1
            return {"num_classes": out, "in_channels": channels}
        if model == "transformer":
            return {"vocab_size": out, "seq_len": self.input_shape[0]}
        if model == "linear":
            return {"dim": n_in}
        raise ValueError(f"no default arguments of model {model!r} for dataset {self.name!r}")


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def digits(*, test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dataset:
    """sklearn's 8x8 handwritten digits, pixels scaled to [0, 1], a seeded train/test split."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (raw.data / 16.0).astype(np.float64)
    y = raw.target.astype(np.int64)
    xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
    return Dataset(
        "digits",
        torch.as_tensor(xtr, dtype=dtype),
        torch.as_tensor(ytr),
        torch.as_tensor(xte, dtype=dtype),
        torch.as_tensor(yte),
        "cross_entropy",
        10,
        (64,),
        {"image_size": 8},
    )


def digits32(*, test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dataset:
    """sklearn's digits as CIFAR-shaped ``3 x 32 x 32`` colour images (generated, no download).

    Every 8x8 digit is upsampled bilinearly to 24x24 and pasted at a random offset (0..8 pixels
    in each direction) on a 32x32 canvas; the stroke intensity ``m`` in [0, 1] blends a
    foreground colour into a textured background, ``x = (1 - m) * background + m * foreground``.
    Foreground and background colours (RGB, foreground in ``[0.5, 1]``, background in
    ``[0, 0.5]``) and the texture (8x8 Gaussian noise of standard deviation 0.1, upsampled
    bilinearly: a smooth blotchy pattern) are drawn *per image* from a generator seeded with
    ``seed + 1``, independently of the label, so colour, position and texture are nuisances
    and the class is carried by the stroke shape alone (as in CIFAR-10, where colour is no
    reliable cue). Channels are standardised with the training split's mean and standard
    deviation. The train/test split is that of :func:`digits` with the same ``seed`` (1348 /
    449 images). The point is a cheap CPU stand-in for the input shape of CIFAR ResNets (for
    ``resnet20``), not CIFAR's difficulty.
    """
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    raw = load_digits()
    y = raw.target.astype(np.int64)
    n = len(y)
    g = torch.Generator().manual_seed(seed + 1)
    strokes = torch.as_tensor(raw.images / 16.0, dtype=torch.float64)[:, None]  # (n, 1, 8, 8)
    strokes = F.interpolate(strokes, size=(24, 24), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    mask = torch.zeros(n, 1, 32, 32, dtype=torch.float64)
    offsets = torch.randint(0, 9, (n, 2), generator=g)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        mask[i, :, dy : dy + 24, dx : dx + 24] = strokes[i]
    foreground = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)
    background = 0.5 * torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)
    texture = F.interpolate(0.1 * torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), size=(32, 32), mode="bilinear",
                            align_corners=False)
    images = ((1.0 - mask) * (background + texture) + mask * foreground).numpy()
    xtr, ytr, xte, yte = _split(images, y, test_fraction, seed)
    mean, std = xtr.mean(axis=(0, 2, 3), keepdims=True), xtr.std(axis=(0, 2, 3), keepdims=True)
    return Dataset(
        "digits32",
        torch.as_tensor((xtr - mean) / std, dtype=dtype),
        torch.as_tensor(ytr),
        torch.as_tensor((xte - mean) / std, dtype=dtype),
        torch.as_tensor(yte),
        "cross_entropy",
        10,
        (3, 32, 32),
        {"image_size": 32, "generator": "digits upsampled to 24x24 on a 32x32 textured colour canvas", "seed": seed},
    )


def mnist1d(*, num_samples: int = 5000, seed: int = 42, dtype: torch.dtype = torch.float32) -> Dataset:
    """MNIST-1D (Greydanus 2020) generated procedurally with ``mnist1d``'s ``make_dataset``.

    Inputs are standardised with the training mean and standard deviation.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    raw = make_dataset(args)
    xtr, xte = raw["x"].astype(np.float64), raw["x_test"].astype(np.float64)
    mean, std = xtr.mean(), xtr.std()
    return Dataset(
        "mnist1d",
        torch.as_tensor((xtr - mean) / std, dtype=dtype),
        torch.as_tensor(raw["y"].astype(np.int64)),
        torch.as_tensor((xte - mean) / std, dtype=dtype),
        torch.as_tensor(raw["y_test"].astype(np.int64)),
        "cross_entropy",
        10,
        (xtr.shape[1],),
        {"generator": "mnist1d.make_dataset", "seed": seed},
    )


def teacher_student(
    dim: int = 100,
    n_train: int = 1000,
    n_test: int = 1000,
    *,
    teacher: str = "linear",
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Gaussian inputs labelled by a teacher of any dimension.

    Parameters
    ----------
    dim : int
        Input dimension d.
    teacher : {"linear", "sign"}
        ``"linear"``: ``y = w*.x / sqrt(d) + noise * eps`` with ``w* ~ N(0, I)``
        (regression, MSE loss). ``"sign"``: ``y = sign(w*.x / sqrt(d))`` with
        ``w*`` in {-1, +1}^d, returned as class labels {0, 1} (cross-entropy); with
        ``noise > 0`` that fraction of labels is flipped.
    """
    if teacher not in ("linear", "sign"):
        raise ValueError(f"teacher must be 'linear' or 'sign', got {teacher!r}")
    if dim < 1 or n_train < 1 or n_test < 0:
        raise ValueError("dim and n_train must be positive")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, dim, generator=g, dtype=torch.float64)
    if teacher == "linear":
        w = torch.randn(dim, generator=g, dtype=torch.float64)
        y = x @ w / dim**0.5 + noise * torch.randn(n_train + n_test, generator=g, dtype=torch.float64)
        y, loss, classes = y.to(dtype), "mse", None
    else:
        w = torch.where(torch.rand(dim, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
        labels = (x @ w >= 0).to(torch.int64)
        flip = torch.rand(n_train + n_test, generator=g) < noise
        y, loss, classes = torch.where(flip, 1 - labels, labels), "cross_entropy", 2
    x = x.to(dtype)
    return Dataset(
        f"teacher_{teacher}",
        x[:n_train],
        y[:n_train],
        x[n_train:],
        y[n_train:],
        loss,
        classes,
        (dim,),
        {"teacher": w.to(dtype), "noise": noise, "seed": seed},
    )


_TEXT_MODULES = ("this", "collections", "functools", "itertools", "json", "argparse", "textwrap", "random", "statistics", "pathlib")


def _stdlib_corpus() -> str:
    import codecs

    import this  # noqa: F401  (prints the Zen once on first import)

    parts = [codecs.decode(this.s, "rot13")]
    for name in _TEXT_MODULES[1:]:
        doc = importlib.import_module(name).__doc__ or ""
        parts.append(doc)
    return "\n".join(parts)


def stdlib_text(*, seq_len: int = 32, stride: int = 4, test_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Character-level next-character data from text shipped with Python itself.

    The corpus is the Zen of Python (``this``) plus the module docstrings of a fixed list
    of standard-library modules. Windows of ``seq_len + 1`` characters (every ``stride``
    characters) give inputs ``x = c[0:T]`` and targets ``y = c[1:T+1]``. The last
    ``test_fraction`` of the corpus is held out (no window straddles the split).
    """
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        text = _stdlib_corpus()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    codes = torch.tensor([index[c] for c in text], dtype=torch.int64)
    cut = int(len(codes) * (1 - test_fraction))

    def windows(seq: Tensor) -> tuple[Tensor, Tensor]:
        starts = torch.arange(0, len(seq) - seq_len - 1, stride)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None]
        chunk = seq[idx]
        return chunk[:, :-1], chunk[:, 1:]

    xtr, ytr = windows(codes[:cut])
    xte, yte = windows(codes[cut:])
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(xtr), generator=g)
    return Dataset(
        "text", xtr[perm], ytr[perm], xte, yte, "cross_entropy", len(vocab), (seq_len,),
        {"vocab": "".join(vocab), "characters": len(text)},
    )


_LOADERS = {
    "digits": digits,
    "digits32": digits32,
    "mnist1d": mnist1d,
    "teacher_linear": lambda **kw: teacher_student(teacher="linear", **kw),
    "teacher_sign": lambda **kw: teacher_student(teacher="sign", **kw),
    "text": stdlib_text,
}
DATASET_NAMES = tuple(_LOADERS)


def load_dataset(name: str, **kwargs) -> Dataset:
    """Load a built-in dataset by name (see the module table).

    >>> load_dataset("digits").x_train.shape
    torch.Size([1348, 64])
    """
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(_LOADERS)}") from None
    return loader(**kwargs)


def _text_bytes(seq_len: int = 32, stride: int = 4, **_: object) -> int:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        characters = len(_stdlib_corpus())
    windows = characters // max(1, int(stride)) + 1
    return 2 * 8 * windows * (max(0, int(seq_len)) + 1)  # inputs and targets, int64


_BYTES_PER_SAMPLE_VALUE = 8 * 3  # float64 generation, the dtype copy, one transient


def _size_arg(kwargs: dict, name: str, default: int) -> int:
    value = kwargs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0  # the loader itself rejects a wrongly typed argument
    return max(0, int(value))


def estimated_bytes(name: str, **kwargs: object) -> int:
    """An upper estimate of the memory :func:`load_dataset` (``name``, ``kwargs``) allocates.

    Computed from the arguments alone, before anything is generated, so a data spec (e.g.
    one stored in a checkpoint) can be refused before it asks for more memory than the
    machine has.

    >>> estimated_bytes("teacher_linear", dim=100_000, n_train=1_000_000) > 10**11
    True
    """
    if name == "digits":
        return 1797 * 65 * _BYTES_PER_SAMPLE_VALUE
    if name == "digits32":
        return 1797 * (3 * 32 * 32 * 4 + 24 * 24) * _BYTES_PER_SAMPLE_VALUE  # mask, colours, texture, image; the resize
    if name == "mnist1d":
        return _size_arg(kwargs, "num_samples", 5000) * 41 * _BYTES_PER_SAMPLE_VALUE * 4  # templates, padding, shifts
    if name in ("teacher_linear", "teacher_sign"):
        samples = _size_arg(kwargs, "n_train", 1000) + _size_arg(kwargs, "n_test", 1000)
        return samples * (_size_arg(kwargs, "dim", 100) + 1) * _BYTES_PER_SAMPLE_VALUE
    if name == "text":
        return _text_bytes(_size_arg(kwargs, "seq_len", 32), _size_arg(kwargs, "stride", 4))
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(_LOADERS)}")
