"""Texts (and labels) of a Hugging Face ``datasets`` folder written by ``save_to_disk``, read offline.

``--data text:FOLDER`` and ``--data textcls:FOLDER`` accept such a folder instead of a text file
(:func:`riverscape.io.hf.text_file_data`, :func:`riverscape.io.hf.labelled_text_data`). A
``Dataset`` folder is split like a file (the last tenth held out); a ``DatasetDict`` folder gives
its ``train`` split to analyse and its ``test`` (else ``validation``) split to evaluate. The text
column is the first of :data:`TEXT_COLUMNS` present; the labels are the ``label`` column (class
indices, e.g. a ``ClassLabel`` feature, or label names). ``datasets`` is imported only here, and
only when such a folder is read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import InputError
from .specs import _first_line

__all__ = ["TEXT_COLUMNS", "is_datasets_folder", "dataset_splits", "split_texts", "split_labelled"]

TEXT_COLUMNS = ("text", "sentence", "content")
"""Column names tried, in order, for the texts."""
_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_datasets_folder(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in _MARKERS)


def dataset_splits(path: Path) -> tuple[Any, Optional[Any]]:
    """``(analysed, evaluated)`` splits of the folder (``evaluated`` is ``None`` for a single ``Dataset``).

    Raises
    ------
    InputError
        ``datasets`` is not installed, the folder is not a ``save_to_disk`` folder, or a
        ``DatasetDict`` has no split to analyse.
    """
    if not is_datasets_folder(path):
        raise InputError(f"{path} is a folder but not a Hugging Face datasets folder (no {' / '.join(_MARKERS)}): "
                         "pass a text file or a folder written by save_to_disk")
    try:
        import datasets
    except ImportError:
        raise InputError(f"{path} is a Hugging Face datasets folder: reading it needs the datasets package "
                         "(pip install 'riverscape[hf]')") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # a damaged or foreign folder: one line, no traceback
        raise InputError(f"{path} cannot be read as a datasets folder ({_first_line(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if not loaded:
            raise InputError(f"{path} holds a DatasetDict without splits")
        train = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
        test = next((loaded[name] for name in ("test", "validation") if name in loaded), None)
        return train, test
    return loaded, None


def _column(split: Any, names: tuple[str, ...], path: Path, what: str) -> str:
    found = next((name for name in names if name in split.column_names), None)
    if found is None:
        raise InputError(f"{path}: no {what} column ({' or '.join(names)}) among {', '.join(split.column_names)}")
    return found


def _texts(split: Any, path: Path) -> list[str]:
    column = _column(split, TEXT_COLUMNS, path, "text")
    texts = [str(t) for t in split[column]]
    if not texts:
        raise InputError(f"{path}: the split has no rows")
    return texts


def split_texts(path: Path) -> tuple[list[str], Optional[list[str]]]:
    """The texts of the analysed split and of the held-out split (``None``: split it like a file)."""
    train, test = dataset_splits(path)
    return _texts(train, path), (None if test is None else _texts(test, path))


def split_labelled(path: Path, label_index: Any) -> tuple[tuple[list[int], list[str]], Optional[tuple[list[int], list[str]]]]:
    """``(labels, texts)`` of the analysed split and of the held-out one (``None``: split it like a file).

    ``label_index(label: str) -> int or None`` maps a label (a class index or a name) to its class;
    the first unknown label raises ``InputError`` naming its split and row.
    """
    train, test = dataset_splits(path)

    def read(split: Any, name: str) -> tuple[list[int], list[str]]:
        texts = _texts(split, path)
        labels = []
        for row, label in enumerate(split[_column(split, ("label", "labels"), path, "label")]):
            index = label_index(str(label))
            if index is None:
                raise InputError(f"{path} ({name} split, row {row}): unknown label {label!r}")
            labels.append(index)
        return labels, texts

    return read(train, "analysed"), (None if test is None else read(test, "held-out"))
