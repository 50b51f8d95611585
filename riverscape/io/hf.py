"""Hugging Face model folders and text files tokenised for them, read without any network access.

``riverscape analyze path/to/folder --data ...`` analyses a model saved with
``model.save_pretrained(folder)`` (``config.json`` plus ``model.safetensors`` or
``pytorch_model.bin``). :func:`load_hf_folder` reads ``config.architectures`` and builds, from the
local files only and with eager attention (HF's default SDPA kernel has no double backward on CPU):

* a causal language model (``GPT2LMHeadModel``, ``*ForCausalLM``) with ``AutoModelForCausalLM``,
  analysed on ``--data text:FILE``: :func:`text_file_data` cuts the token stream into
  non-overlapping sequences of ``min(64, n_positions)`` tokens; loss ``"causal_lm"`` (next-token
  cross-entropy, :func:`riverscape.batching.causal_lm`), metric the perplexity;
* a sequence classifier (``*ForSequenceClassification``, single-label) with
  ``AutoModelForSequenceClassification``, analysed on ``--data textcls:FILE``:
  :func:`labelled_text_data` reads one ``LABEL<TAB>TEXT`` per line (see :data:`TEXTCLS_PREFIX`),
  each text a sequence of at most ``min(64, max_position_embeddings)`` tokens (with the
  tokenizer's special tokens, e.g. ``[CLS] ... [SEP]``), padded to the longest with an attention
  mask; loss ``"cross_entropy"`` on the logits (the model's own single-label loss), metric the
  accuracy.

``FILE`` may also be a Hugging Face ``datasets`` folder written by ``save_to_disk``
(:mod:`riverscape.io.hf_datasets`): its text column (and ``label`` column), a ``DatasetDict``'s
``test`` or ``validation`` split held out.

Both tokenise with the folder's saved tokenizer (``tokenizer.json`` / ``tokenizer_config.json``,
via ``AutoTokenizer``) or, without one, byte-level (UTF-8 bytes as ids 0..255, which needs
``vocab_size >= 256``). The last tenth of the sequences (or lines) is the evaluation split.

``transformers`` is imported only here, and only when a folder is read: without it the command
line says in one line how to install it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, InputError
from ..limits import DEFAULT_MEMORY_LIMIT, check_allocation
from .data_specs import ResolvedData
from .hf_datasets import split_labelled, split_texts
from .reading import HALF_DTYPES, LoadedCheckpoint, checkpoint_dtype
from .specs import PathLike, _first_line

__all__ = [
    "TEXT_PREFIX",
    "TEXTCLS_PREFIX",
    "is_hf_folder",
    "load_hf_folder",
    "load_tokenizer",
    "text_file_data",
    "labelled_text_data",
    "load_hf_analysis",
]

TEXT_PREFIX = "text:"
"""``--data text:path/to/file.txt``: a text file tokenised for a causal LM folder."""
TEXTCLS_PREFIX = "textcls:"
"""``--data textcls:path/to/file.tsv``: labelled texts for a sequence-classifier folder.

UTF-8, one sample per line: the label, a tab, the text (``positive<TAB>a fine film``). A label is
one of the model's ``config.id2label`` names or a class index ``0 .. num_labels - 1``; blank lines
are skipped; the text runs to the end of the line (further tabs belong to it)."""

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
MAX_SEQ_LEN = 64


def is_hf_folder(path: PathLike) -> bool:
    """Whether ``path`` is a folder with a ``config.json`` (what ``save_pretrained`` writes)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError("reading a Hugging Face model folder needs the transformers package: pip install 'riverscape[hf]'") from None
    transformers.logging.set_verbosity_error()  # its advice on configs and generation is not about the analysis
    transformers.logging.disable_progress_bar()  # riverscape's output stays one line per event
    return transformers


def load_hf_folder(folder: PathLike, *, memory_limit: Optional[int] = DEFAULT_MEMORY_LIMIT) -> LoadedCheckpoint:
    """Build the causal LM or sequence classifier saved in ``folder`` (no network), in eval mode with eager attention.

    Parameters
    ----------
    folder : str or PathLike
        Written by ``save_pretrained``: ``config.json`` and weight files.
    memory_limit : int or None
        Bytes the weight files may hold (checked before loading); ``None`` for no limit.

    Returns
    -------
    LoadedCheckpoint
        ``source_format="huggingface"``; ``loss="causal_lm"`` for a causal LM,
        ``"cross_entropy"`` for a sequence classifier; float16/bfloat16 weights are loaded in
        float32 (exactly representable), as for other checkpoints (``--dtype native`` runs them
        in their own dtype, :mod:`riverscape.precision`).

    Raises
    ------
    CheckpointError
        No weights in the folder, an architecture that is neither a causal LM nor a
        single-label sequence classifier, or transformers cannot build the model.
    InputError
        transformers is not installed, or the weights exceed ``memory_limit``.
    """
    folder = Path(folder)
    weights = [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    if not weights:
        raise CheckpointError(f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin); save the model with model.save_pretrained(folder)")
    check_allocation(f"{folder}: its weights", sum(p.stat().st_size for p in weights), memory_limit)
    transformers = _transformers()
    kind = _folder_kind(folder, transformers)
    auto = transformers.AutoModelForSequenceClassification if kind == _CLASSIFIER else transformers.AutoModelForCausalLM
    try:
        model = auto.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: transformers cannot build a {kind} from it ({_first_line(exc)})") from None
    model.eval()
    stored = checkpoint_dtype(model.state_dict())
    notes = []
    if any(p.dtype in HALF_DTYPES for p in model.parameters()):
        model.float()
        notes.append(f"the folder stores {stored} weights; they are loaded in float32 (exactly representable; --dtype native evaluates them in their own dtype)")
    spec = {"name": "huggingface", "kwargs": {"folder": str(folder), "architecture": type(model).__name__}}
    loss = "cross_entropy" if kind == _CLASSIFIER else "causal_lm"
    return LoadedCheckpoint(model=model, model_spec=spec, data_spec=None, loss=loss, trajectory=None, trajectory_steps=None,
                            source_format="huggingface", path=folder, notes=tuple(notes), checkpoint_dtype=stored)


_CAUSAL_LM = "causal language model"
_CLASSIFIER = "sequence classifier"


def _folder_kind(folder: Path, transformers: Any) -> str:
    """``_CAUSAL_LM`` or ``_CLASSIFIER`` from ``config.architectures`` (a config without it: a causal LM).

    Any other head is refused: an Auto class would build its own head instead (e.g. ``BertLMHeadModel``
    for a saved ``BertForMaskedLM``) and drop the saved one. A classifier must be single-label
    (``num_labels >= 2``, ``problem_type`` unset or ``"single_label_classification"``).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder}: its config.json cannot be read by transformers ({_first_line(exc)})") from None
    architectures = config.architectures or []
    if not architectures or any(name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) for name in architectures):
        return _CAUSAL_LM
    if any(name in set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()) for name in architectures):
        problem = getattr(config, "problem_type", None)
        if config.num_labels < 2 or problem not in (None, "single_label_classification"):
            raise CheckpointError(
                f"{folder} holds a {architectures[0]} for {problem or 'regression'} ({config.num_labels} label"
                f"{'s' if config.num_labels != 1 else ''}); riverscape analyses single-label classifiers (num_labels >= 2) on "
                f"--data {TEXTCLS_PREFIX}FILE"
            )
        return _CLASSIFIER
    raise CheckpointError(
        f"{folder} holds a {architectures[0]}, neither a causal language model (analysed on --data {TEXT_PREFIX}FILE) nor a "
        f"sequence classifier (--data {TEXTCLS_PREFIX}FILE). Analyse its weights file with a factory instead: riverscape analyze "
        f"{folder}/model.safetensors --model my_file.py:build --data my_file.py:data (build() returns the model from the folder's config)"
    )


def load_tokenizer(folder: PathLike) -> Any:
    """The tokenizer saved in ``folder`` (``AutoTokenizer``, no network), or ``None`` if there is none."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder}: its tokenizer files cannot be loaded ({_first_line(exc)})") from None


def _token_ids(text: str, tokenizer: Any, vocab_size: int, *, max_length: Optional[int] = None) -> Tensor:
    """Token ids of ``text``: the tokenizer's, or UTF-8 bytes without one.

    Without ``max_length`` the whole text, without special tokens (a stream to cut into sequences);
    with it one sample: the tokenizer's special tokens added and truncated to ``max_length``.
    """
    if tokenizer is None:
        if vocab_size < 256:
            raise InputError(
                f"the model folder has no tokenizer and its vocabulary ({vocab_size}) is too small for the byte-level "
                "fallback (256 byte values); save the tokenizer into the folder with tokenizer.save_pretrained(folder)"
            )
        return torch.tensor(list(text.encode("utf-8"))[:max_length], dtype=torch.int64)
    if max_length is None:
        encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    else:
        encoded = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length, verbose=False)
    ids = torch.tensor(encoded["input_ids"], dtype=torch.int64)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise InputError(f"the folder's tokenizer produces id {int(ids.max())}, beyond the model's vocabulary of {vocab_size}")
    return ids


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"text file not found: {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} cannot be read as UTF-8 text ({_first_line(exc)})") from None


def _vocab_size(model: nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)


def _context_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return min(MAX_SEQ_LEN, value)
    return MAX_SEQ_LEN


def text_file_data(path: PathLike, model: nn.Module, tokenizer: Any, *, test_fraction: float = 0.1) -> ResolvedData:
    """A text file as next-token data for ``model``: ``(ids, ids)`` sequences, split into train and test.

    Parameters
    ----------
    path : str or PathLike
        UTF-8 text.
    model : nn.Module
        The causal LM (its ``config`` gives the vocabulary size and context length).
    tokenizer : tokenizer or None
        ``None`` tokenises byte-level.
    test_fraction : float
        Share of the sequences held out (at least one).

    Returns
    -------
    ResolvedData
        ``train`` and ``test`` are ``(ids, ids)`` pairs of shape ``(n, seq_len)``: inputs and
        labels (the loss shifts them), ``loss="causal_lm"``.
    """
    path = Path(path)
    seq_len = _context_length(model)
    held_out = None
    if path.is_dir():  # a datasets folder (save_to_disk): its text column, documents joined by a blank line
        texts, test_texts = split_texts(path)
        text = "\n\n".join(texts)
        if test_texts is not None:
            held_out = _lm_sequences("\n\n".join(test_texts), model, tokenizer, seq_len, path, minimum=1)
    else:
        text = _read_text(path)
    sequences = _lm_sequences(text, model, tokenizer, seq_len, path, minimum=1 if held_out is not None else 2)
    if held_out is None:
        n_test = max(1, round(len(sequences) * test_fraction))
        sequences, held_out = sequences[:-n_test], sequences[-n_test:]
    name = "text-dataset" if path.is_dir() else "text-file"
    spec = {"name": name, "kwargs": {"path": str(path), "seq_len": seq_len, "tokenizer": "bytes" if tokenizer is None else "folder"}}
    return ResolvedData(spec, (sequences, sequences), (held_out, held_out), "causal_lm")


def _lm_sequences(text: str, model: nn.Module, tokenizer: Any, seq_len: int, path: Path, *, minimum: int) -> Tensor:
    """The token stream of ``text`` cut into non-overlapping rows of ``seq_len`` tokens (at least ``minimum``)."""
    ids = _token_ids(text, tokenizer, _vocab_size(model))
    n = ids.numel() // seq_len
    if n < minimum:
        need = "two sequences" if minimum == 2 else "one sequence"
        raise InputError(f"{path} gives {ids.numel()} tokens: too few for {need} of {seq_len} (one to analyse, one to evaluate)")
    return ids[: n * seq_len].view(n, seq_len)


BATCH_SIZE = 64
"""Samples per batch of :func:`labelled_text_data` (the loss is the exact mean over all of them)."""


def _label_index(label: str, label2id: dict[str, int], n_labels: int) -> Optional[int]:
    """The class of a label: a name of ``config.label2id``, else an index ``0 .. n_labels - 1``; ``None`` if neither."""
    if label in label2id:
        return int(label2id[label])
    if label.isdigit() and int(label) < n_labels:
        return int(label)
    return None


def _labelled_lines(path: Path, label2id: dict[str, int], n_labels: int) -> tuple[list[int], list[str]]:
    """Labels and texts of a ``LABEL<TAB>TEXT`` file; the first bad line raises ``InputError`` naming it."""
    labels, texts = [], []
    names = ", ".join(sorted(label2id, key=label2id.get)[:8]) + (", ..." if len(label2id) > 8 else "")
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        where = f"{path}:{number}"
        if not tab or not label.strip():
            raise InputError(f"{where}: no label; each line of a {TEXTCLS_PREFIX} file is LABEL<TAB>TEXT")
        if not text.strip():
            raise InputError(f"{where}: label {label.strip()!r} has no text after the tab")
        index = _label_index(label.strip(), label2id, n_labels)
        if index is None:
            raise InputError(f"{where}: unknown label {label.strip()!r}; the model's labels are {names} (or 0 to {n_labels - 1})")
        labels.append(index)
        texts.append(text)
    if len(labels) < 2:
        raise InputError(f"{path} holds {len(labels)} labelled line{'s' if len(labels) != 1 else ''} (LABEL<TAB>TEXT); "
                         "at least two are needed (one to analyse, one to evaluate)")
    return labels, texts


def _batches(ids: Tensor, mask: Tensor, labels: Tensor) -> list[tuple[dict, Tensor]]:
    return [({"input_ids": ids[i : i + BATCH_SIZE], "attention_mask": mask[i : i + BATCH_SIZE]}, labels[i : i + BATCH_SIZE])
            for i in range(0, len(labels), BATCH_SIZE)]


def labelled_text_data(path: PathLike, model: nn.Module, tokenizer: Any, *, test_fraction: float = 0.1) -> ResolvedData:
    """A ``LABEL<TAB>TEXT`` file (:data:`TEXTCLS_PREFIX`) as classification data for a sequence classifier.

    Parameters
    ----------
    path : str or PathLike
        UTF-8 text, one labelled sample per line.
    model : nn.Module
        The classifier (its ``config`` gives the labels, vocabulary, context length and pad id).
    tokenizer : tokenizer or None
        ``None`` tokenises byte-level (no special tokens).
    test_fraction : float
        Share of the lines held out (the last ones; at least one).

    Returns
    -------
    ResolvedData
        ``train`` and ``test`` are lists of batches ``({"input_ids", "attention_mask"}, labels)``
        of :data:`BATCH_SIZE` samples, every text truncated to ``min(64, max_position_embeddings)``
        tokens and right-padded to the longest (mask 0); ``loss="cross_entropy"``.

    Raises
    ------
    InputError
        A missing file, a line without a label or text, a label the model does not have, fewer
        than two lines; the message names the file and line.
    """
    path = Path(path)
    config = getattr(model, "config", None)
    n_labels = int(getattr(config, "num_labels", 0) or 0)
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    held_out = None
    if path.is_dir():  # a datasets folder (save_to_disk): text and label columns
        (labels, texts), held_out = split_labelled(path, lambda label: _label_index(label, label2id, n_labels))
        if held_out is not None:
            labels, texts = labels + held_out[0], texts + held_out[1]
    else:
        labels, texts = _labelled_lines(path, label2id, n_labels)
    seq_len = _context_length(model)
    vocab_size = _vocab_size(model)
    sequences = [_token_ids(text, tokenizer, vocab_size, max_length=seq_len) for text in texts]
    width = max(len(s) for s in sequences)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(config, "pad_token_id", None) or 0)
    ids = torch.full((len(sequences), width), int(pad), dtype=torch.int64)
    mask = torch.zeros(len(sequences), width, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    y = torch.tensor(labels, dtype=torch.int64)
    n_test = len(held_out[0]) if held_out is not None else max(1, round(len(labels) * test_fraction))
    cut = len(labels) - n_test
    if cut < 1:
        raise InputError(f"{path} holds no labelled row to analyse")
    spec = {"name": "labelled-text-dataset" if path.is_dir() else "labelled-text-file", "kwargs": {"path": str(path), "seq_len": seq_len, "samples": len(labels),
                                                      "tokenizer": "bytes" if tokenizer is None else "folder"}}
    return ResolvedData(spec, _batches(ids[:cut], mask[:cut], y[:cut]), _batches(ids[cut:], mask[cut:], y[cut:]), "cross_entropy")


def load_hf_analysis(folder: PathLike, data: Optional[str], *, memory_limit: Optional[int] = DEFAULT_MEMORY_LIMIT) -> tuple[LoadedCheckpoint, ResolvedData]:
    """The model of a Hugging Face folder and the data it is analysed on.

    ``--data text:FILE`` for a causal LM (:func:`text_file_data`), ``--data textcls:FILE`` for a
    sequence classifier (:func:`labelled_text_data`).
    """
    loaded = load_hf_folder(folder, memory_limit=memory_limit)
    classifier = loaded.loss == "cross_entropy"
    prefix = TEXTCLS_PREFIX if classifier else TEXT_PREFIX
    if data is None or not data.startswith(prefix) or not data[len(prefix):]:
        kind, example = (_CLASSIFIER, "labels.tsv (LABEL<TAB>TEXT per line)") if classifier else (_CAUSAL_LM, "file.txt")
        raise InputError(f"{folder} holds a {kind} ({loaded.model_spec['kwargs']['architecture']}): pass --data {prefix}path/to/{example}")
    read = labelled_text_data if classifier else text_file_data
    return loaded, read(data[len(prefix):], loaded.model, load_tokenizer(folder))
