"""Hugging Face model folders and text files tokenised for them, read without any network access.

``riverscape analyze path/to/folder --data text:path/to/file.txt`` analyses a causal language model
saved with ``model.save_pretrained(folder)`` (``config.json`` plus ``model.safetensors`` or
``pytorch_model.bin``): :func:`load_hf_folder` builds it with
``AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="eager")``
(eager attention: HF's default SDPA kernel has no double backward on CPU), and
:func:`text_file_data` tokenises the text with the folder's saved tokenizer (``tokenizer.json`` /
``tokenizer_config.json``, via ``AutoTokenizer``) or, without one, byte-level (UTF-8 bytes as ids
0..255, which needs ``vocab_size >= 256``). The token stream is cut into non-overlapping sequences
of ``min(64, n_positions)`` tokens; the last tenth is the evaluation split. The loss is
``"causal_lm"`` (next-token cross-entropy, :func:`riverscape.batching.causal_lm`), the metric the
perplexity.

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
from .reading import HALF_DTYPES, LoadedCheckpoint, checkpoint_dtype
from .specs import PathLike, _first_line

__all__ = ["TEXT_PREFIX", "is_hf_folder", "load_hf_folder", "load_tokenizer", "text_file_data", "load_hf_analysis"]

TEXT_PREFIX = "text:"
"""``--data text:path/to/file.txt``: a text file tokenised for the model folder."""

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
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
    """Build the causal LM saved in ``folder`` (no network), in eval mode with eager attention.

    Parameters
    ----------
    folder : str or PathLike
        Written by ``save_pretrained``: ``config.json`` and weight files.
    memory_limit : int or None
        Bytes the weight files may hold (checked before loading); ``None`` for no limit.

    Returns
    -------
    LoadedCheckpoint
        ``source_format="huggingface"``, ``loss="causal_lm"``; float16/bfloat16 weights are
        analysed in float32 (exactly representable), as for other checkpoints.

    Raises
    ------
    CheckpointError
        No weights in the folder, or transformers cannot build a causal LM from it.
    InputError
        transformers is not installed, or the weights exceed ``memory_limit``.
    """
    folder = Path(folder)
    weights = [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    if not weights:
        raise CheckpointError(f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin); save the model with model.save_pretrained(folder)")
    check_allocation(f"{folder}: its weights", sum(p.stat().st_size for p in weights), memory_limit)
    transformers = _transformers()
    _check_causal_lm(folder, transformers)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: transformers cannot build a causal language model from it ({_first_line(exc)})") from None
    model.eval()
    stored = checkpoint_dtype(model.state_dict())
    notes = []
    if any(p.dtype in HALF_DTYPES for p in model.parameters()):
        model.float()
        notes.append(f"the folder stores {stored} weights; they are analysed in float32 (exactly representable)")
    spec = {"name": "huggingface", "kwargs": {"folder": str(folder), "architecture": type(model).__name__}}
    return LoadedCheckpoint(model=model, model_spec=spec, data_spec=None, loss="causal_lm", trajectory=None, trajectory_steps=None,
                            source_format="huggingface", path=folder, notes=tuple(notes), checkpoint_dtype=stored)


def _check_causal_lm(folder: Path, transformers: Any) -> None:
    """Refuse a folder whose ``config.architectures`` names no causal LM (``AutoModelForCausalLM`` would build
    another head, e.g. ``BertLMHeadModel`` for a saved ``BertForSequenceClassification``, and drop the real one)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        architectures = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True).architectures or []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder}: its config.json cannot be read by transformers ({_first_line(exc)})") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if architectures and not any(name in causal for name in architectures):
        raise CheckpointError(
            f"{folder} holds a {architectures[0]}, not a causal language model; a model folder is analysed as a causal LM "
            f"on --data text:FILE. Analyse its weights file with a factory instead: riverscape analyze {folder}/model.safetensors "
            "--model my_file.py:build --data my_file.py:data (build() returns the model from the folder's config)"
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


def _token_ids(text: str, tokenizer: Any, vocab_size: int) -> Tensor:
    if tokenizer is None:
        if vocab_size < 256:
            raise InputError(
                f"the model folder has no tokenizer and its vocabulary ({vocab_size}) is too small for the byte-level "
                "fallback (256 byte values); save the tokenizer into the folder with tokenizer.save_pretrained(folder)"
            )
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int64)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise InputError(f"the folder's tokenizer produces id {int(ids.max())}, beyond the model's vocabulary of {vocab_size}")
    return ids


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
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"text file not found: {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} cannot be read as UTF-8 text ({_first_line(exc)})") from None
    vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    ids = _token_ids(text, tokenizer, vocab_size)
    seq_len = _context_length(model)
    n = ids.numel() // seq_len
    if n < 2:
        raise InputError(f"{path} gives {ids.numel()} tokens: too few for two sequences of {seq_len} (one to analyse, one to evaluate)")
    sequences = ids[: n * seq_len].view(n, seq_len)
    n_test = max(1, round(n * test_fraction))
    train, test = sequences[:-n_test], sequences[-n_test:]
    spec = {"name": "text-file", "kwargs": {"path": str(path), "seq_len": seq_len, "tokenizer": "bytes" if tokenizer is None else "folder"}}
    return ResolvedData(spec, (train, train), (test, test), "causal_lm")


def load_hf_analysis(folder: PathLike, data: Optional[str], *, memory_limit: Optional[int] = DEFAULT_MEMORY_LIMIT) -> tuple[LoadedCheckpoint, ResolvedData]:
    """The model of a Hugging Face folder and the ``--data text:FILE`` it is analysed on."""
    if data is None or not data.startswith(TEXT_PREFIX) or not data[len(TEXT_PREFIX):]:
        raise InputError(f"a Hugging Face model folder is analysed on a text file: pass --data {TEXT_PREFIX}path/to/file.txt")
    loaded = load_hf_folder(folder, memory_limit=memory_limit)
    return loaded, text_file_data(data[len(TEXT_PREFIX):], loaded.model, load_tokenizer(folder))
