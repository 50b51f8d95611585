"""Command line: ``riverscape train | analyze | demo``.

The CLI parses strings, builds validated configs, calls the library and writes files,
nothing more. Exit codes: 0 success; 2 the user's input or environment (bad argument,
unreadable or unsafe checkpoint, an error inside the user's factory, data that do not fit
the model, NaN loss, a full disk), with one line ``riverscape: error: ...`` on stderr; 1 a
riverscape bug, with one line asking to report it and ``--debug`` for the traceback; 130
for SIGINT (Ctrl-C) and 143 for SIGTERM, with ``riverscape: interrupted``/``terminated``,
at every moment of a run. Outputs are written atomically, so a failed or interrupted run
leaves nothing behind.

Imports of torch-heavy modules happen inside :func:`main`, while signals are held.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn, Optional

from . import __version__
from ._signals import exit_code_of, handlers_installed
from .errors import ConvergenceError, InputError, RiverscapeError

EXIT_OK, EXIT_UNEXPECTED, EXIT_INPUT = 0, 1, 2
DEFAULT_REPORT_ROOT = "riverscape-report"
DEFAULT_MEMORY_GB = 8.0  # riverscape.limits.DEFAULT_MEMORY_LIMIT, without importing torch to build the parser

_MAIN_EPILOG = """\
examples:
  riverscape demo                                   # train the digits MLP, show its PTQ cliff
  riverscape train --model mlp --data digits --out mlp.pt
  riverscape analyze mlp.pt --bits 4 2              # report in riverscape-report/mlp/
  riverscape analyze weights.pt --model my_models.py:make_net --data digits --bits 2

run 'riverscape COMMAND --help' for the options of a command.
"""

_TRAIN_EPILOG = """\
examples:
  riverscape train --model mlp --data digits --out mlp.pt
  riverscape train --model mlp --hidden 64,32 --data mnist1d --steps 3000 --out mnist1d.pt
  riverscape train --model cnn --data digits --optimizer sgd --lr 0.05 --out cnn.pt
  riverscape train --model my_models.py:make_net --model-kwargs '{"width": 64}' --data digits --out net.pt

The checkpoint is a plain dict (torch.load(path, weights_only=True) reads it) holding the
weights, how to rebuild model and data, and the training trajectory (the raw material of
the river path). Built-in models: mlp cnn cnn1d cifar_cnn resnet20 transformer linear;
built-in data: digits mnist1d teacher_linear teacher_sign text.
"""

_ANALYZE_EPILOG = """\
examples:
  riverscape analyze mlp.pt --bits 4 2
  riverscape analyze mlp.pt --bits 2 --range minmax --per-tensor --keep-first-last --out report/
  riverscape analyze weights.pt --model mlp --model-kwargs '{"in_dim": 64, "out_dim": 10}' --data digits
  riverscape analyze model.safetensors --model pkg.models:build --data pkg.data:load_test_set
  riverscape analyze old_full_model.pt --trust-checkpoint --data digits
  riverscape analyze my_gpt2/ --bits 4 --data text:corpus.txt
  riverscape analyze my_gpt2/ --bits 4 --data text:corpus.txt --params 'transformer.h.0.*' --budget quick
  riverscape analyze my_bert_classifier/ --bits 4 --data textcls:reviews.tsv --budget quick
  riverscape analyze my_bf16_model/ --bits 4 --data text:corpus.txt --dtype native

CHECKPOINT may be a riverscape checkpoint (from 'riverscape train'), a state dict saved
with torch.save (also nested under 'state_dict', 'model_state_dict' or 'model', with or
without a DataParallel 'module.' prefix) or a .safetensors file. The last two hold no
architecture: name it with --model (a built-in name, package.module:factory or
path/to/file.py:factory). --data takes a built-in name or a factory returning
(inputs, targets) tensors, a torch Dataset or a DataLoader. A Hugging Face causal LM folder
(save_pretrained: config.json + weights; needs transformers) is analysed on --data text:FILE,
tokenised with the folder's tokenizer (byte-level without one); the report gives perplexities.
A *ForSequenceClassification folder is analysed on --data textcls:FILE, one LABEL<TAB>TEXT
per line (a label name of the model's config or a class index); the report gives accuracies.
bf16/fp16 weights run in float32 unless --dtype native.

security: a checkpoint that pickles a whole model (torch.save(model, path)) can execute
arbitrary code when loaded, so it is refused unless you pass --trust-checkpoint; prefer
torch.save(model.state_dict(), path). A factory named inside a checkpoint is imported only
if you name it again (--model/--data) or pass --trust-checkpoint.

The report directory (report.html, metrics.json, figures) is written atomically: a failed
or interrupted run leaves no partial report. An existing directory is kept unless --force.
Finished stages are kept in DIR/.riverscape-work until the report is complete: running the
same command again after an interrupt loads them instead of computing them (the stage line
says 'cached'); any change of checkpoint, data, options or riverscape version starts afresh.
A run that fails with an error deletes them; --no-resume neither loads nor keeps them.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors in the riverscape format (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(EXIT_INPUT, f"riverscape: error: {message}{hint}\n")


# ----------------------------------------------------------------------- parsing helpers


def _json_object(text: Optional[str], option: str) -> Optional[dict]:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{option} is not valid JSON ({exc.msg} at character {exc.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise InputError(f"{option} must be a JSON object such as '{{\"in_dim\": 64}}', got {text!r}")
    return value


def _int_list(values: list[str], option: str) -> list[int]:
    out = []
    for part in (p for v in values for p in v.split(",")):
        if not part.strip():
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise InputError(f"{option} takes integers, got {part!r}") from None
    return out


def _memory_limit(args: argparse.Namespace) -> Optional[int]:
    """``--memory-limit GB`` in bytes (0 = no limit)."""
    gigabytes = args.memory_limit
    if not math.isfinite(gigabytes) or gigabytes < 0:
        raise InputError(f"--memory-limit takes a size in GB (0 = no limit), got {gigabytes}")
    return None if gigabytes == 0 else int(gigabytes * 2**30)


def _progress() -> bool:
    return sys.stderr.isatty()


def _stage_line(message: str) -> None:
    """The analysis plan and one line per finished stage, on stderr (also when it is not a terminal)."""
    print(f"riverscape: {message}", file=sys.stderr, flush=True)


def _note(message: str) -> None:
    print(f"riverscape: note: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- train


def _train_model_spec(name: str, model_kwargs: Optional[dict], hidden: Optional[str], data: Any) -> dict:
    """Model spec for training: built-in defaults fitted to the data, then --hidden, then --model-kwargs."""
    from .checkpoint import make_spec

    kwargs: dict = {}
    if ":" not in name and data.dataset is not None:
        try:
            kwargs = data.dataset.model_kwargs(name)
        except ValueError:
            kwargs = {}
    if hidden is not None:
        if name != "mlp":
            raise InputError("--hidden only applies to --model mlp; use --model-kwargs for other models")
        kwargs["hidden"] = _int_list([hidden], "--hidden")
        if not kwargs["hidden"] or min(kwargs["hidden"]) < 1:
            raise InputError(f"--hidden takes positive comma-separated widths such as 64,32, got {hidden!r}")
    return make_spec(name, {**kwargs, **(model_kwargs or {})}, kind="model")


def _fit(model_spec: dict, data: Any, *, loss: str, config: dict, seed: int, memory_limit: Optional[int] = None) -> tuple[Any, dict]:
    """Build and train a model; return the :class:`~riverscape.training.TrainResult` and its metrics."""
    import torch

    from .checkpoint import build_model_from_spec, check_model_size
    from .objective import Objective
    from .threads import threads_for
    from .training import train

    if data.dataset is not None:
        train_data: Any = data.dataset
    elif isinstance(data.train, tuple):
        train_data = data.train
    else:
        raise InputError("riverscape train needs data as (inputs, targets) tensors or a built-in dataset, not a DataLoader")
    check_model_size(model_spec, memory_limit)
    torch.manual_seed(seed)  # model initialisation (the CLI owns this process)
    model = build_model_from_spec(model_spec)
    with threads_for(model):
        result = train(model, train_data, loss_fn=loss, seed=seed, progress=_progress(), **config)
    objective = Objective(result.model, loss, data.evaluation)
    eval_loss, eval_metric = objective.loss_and_metric(objective.theta0)
    if not math.isfinite(eval_loss):
        raise FloatingPointError(f"the trained model's loss is {eval_loss}; lower the learning rate")
    split = "test" if data.test is not None else "train"
    metrics = {f"{split}_loss": eval_loss, "final_batch_loss": result.loss_history[-1]}
    if eval_metric is not None:
        metrics[f"{split}_accuracy"] = eval_metric
    return result, metrics


def _describe_metrics(metrics: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items() if k != "final_batch_loss")


def _cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import resolve_data, save_checkpoint, spec_label
    from .objective import resolve_loss
    from .outdir import check_output_file

    check_output_file(args.out, args.force)
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--record-every", args.record_every)):
        if value is not None and value < (0 if name == "--batch-size" else 1):
            raise InputError(f"{name} must be positive, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr must be a positive number, got {args.lr}")
    model_kwargs = _json_object(args.model_kwargs, "--model-kwargs")
    limit = _memory_limit(args)
    data = resolve_data(args.data, _json_object(args.data_kwargs, "--data-kwargs"), memory_limit=limit)
    loss = args.loss or data.loss or "cross_entropy"
    resolve_loss(loss)
    spec = _train_model_spec(args.model, model_kwargs, args.hidden, data)
    config = {
        "steps": args.steps,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "batch_size": args.batch_size or None,
        "record_every": args.record_every,
    }
    start = time.perf_counter()
    result, metrics = _fit(spec, data, loss=loss, config=config, seed=args.seed, memory_limit=limit)
    save_checkpoint(
        args.out,
        result.model,
        model_spec=spec,
        data_spec=data.spec,
        loss=loss,
        train_result=result,
        train_config={**config, "seed": args.seed},
        metrics=metrics,
        overwrite=args.force,
    )
    print(
        f"wrote {args.out}: {spec_label(spec)} on {spec_label(data.spec)}, {result.trajectory.shape[1]} parameters, "
        f"{len(result.steps)} trajectory points, {_describe_metrics(metrics)} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return EXIT_OK


# ---------------------------------------------------------------------------- analyze


def run_analysis(loaded: Any, data: Any, options: Any, out_dir: Path, *, cache: Any = None) -> dict:
    """Analyse (:func:`riverscape.analysis.analyze`), draw the report into ``out_dir``, return the metrics.

    Parameters
    ----------
    loaded : LoadedCheckpoint
        ``loaded.loss`` is always set (``--loss`` > checkpoint > dataset > cross-entropy).
    data : ResolvedData
    options : AnalyzeOptions
    out_dir : Path
        Temporary directory that becomes the report directory if this returns.
    cache : StageCache, optional
        Finished stages of an interrupted run (:func:`riverscape.analysis.run_analysis`).

    Returns
    -------
    dict
        JSON-friendly metrics (stored in ``metrics.json`` beside the report).
    """
    from .analysis import analyze
    from .report.analysis_page import write_report

    result = analyze(loaded, data, options, progress=_progress(), emit=_stage_line, cache=cache)
    name = Path(str(loaded.path)).name if loaded.path else "model"
    write_report(result, out_dir, title=f"riverscape report: {name}")
    return result.metrics()


def _analysis_data(args: argparse.Namespace, raw: Any, data_kwargs: Optional[dict], limit: Optional[int]) -> Any:
    from .checkpoint import resolve_data

    if args.data is not None:
        return resolve_data(args.data, data_kwargs, memory_limit=limit)
    if raw.data_spec is None:
        raise InputError(f"{args.checkpoint} does not say which data it was trained on: pass --data NAME or --data package.module:factory")
    return resolve_data(raw.data_spec, data_kwargs, allow_factory=args.trust_checkpoint, memory_limit=limit)


def _default_model_kwargs(args: argparse.Namespace, model_kwargs: Optional[dict], data: Any) -> Optional[dict]:
    """A built-in --model without --model-kwargs gets the arguments that fit the data."""
    if args.model is None or model_kwargs is not None or ":" in args.model or data.dataset is None:
        return model_kwargs
    try:
        return data.dataset.model_kwargs(args.model)
    except ValueError:
        return model_kwargs


def _analyze_options(args: argparse.Namespace) -> Any:
    """The :class:`AnalyzeOptions` of the parsed arguments (every option is named after its field)."""
    import dataclasses

    from .analysis_options import AnalyzeOptions

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(AnalyzeOptions) if hasattr(args, f.name)}
    values.update(
        bits=tuple(_int_list(args.bits, "--bits")),
        include=tuple(args.include or ()),
        exclude=tuple(args.exclude or ()),
        params=tuple(args.params or ()),
        skip=tuple(args.skip or ()),
        memory_limit=_memory_limit(args),
    )
    return AnalyzeOptions(**values)


def _cmd_analyze(args: argparse.Namespace) -> int:
    import dataclasses

    from .checkpoint import check_model_data, read_checkpoint
    from .distributed import init, is_main, only_errors
    from .io.hf import is_hf_folder, load_hf_analysis
    from .objective import resolve_loss
    from .outdir import check_output_dir

    if init() is not None and not is_main():  # torchrun/srun: process 0 prints and writes, the others only their errors
        only_errors()
    options = _analyze_options(args)
    limit = options.memory_limit
    out = Path(args.out) if args.out else Path(DEFAULT_REPORT_ROOT) / Path(args.checkpoint).stem
    inputs = (Path(args.checkpoint),)
    check_output_dir(out, args.force, inputs=inputs)
    if args.loss is not None:
        resolve_loss(args.loss)
    model_kwargs = _json_object(args.model_kwargs, "--model-kwargs")
    data_kwargs = _json_object(args.data_kwargs, "--data-kwargs")
    if is_hf_folder(args.checkpoint):
        loaded, data = load_hf_analysis(args.checkpoint, args.data, memory_limit=limit)
    else:
        raw = read_checkpoint(args.checkpoint, trust_checkpoint=args.trust_checkpoint, memory_limit=limit)
        data = _analysis_data(args, raw, data_kwargs, limit)
        loaded = raw.instantiate(
            model=args.model,
            model_kwargs=_default_model_kwargs(args, model_kwargs, data),
            trust_checkpoint=args.trust_checkpoint,
            memory_limit=limit,
        )
    loaded = dataclasses.replace(loaded, loss=args.loss or loaded.loss or data.loss or "cross_entropy")
    resolve_loss(loaded.loss)
    for note in loaded.notes:
        _note(note)
    check_model_data(loaded.model, data.train, loaded.loss)
    requested = None
    if options.params:
        requested = {"params": list(options.params), "include": list(options.include), "exclude": list(options.exclude),
                     "keep_first_last": options.keep_first_last}
    cache = _stage_cache(args, out, loaded, data) if options.resume else None
    _write_analysis(loaded, data, options, out, force=args.force, checkpoint=str(args.checkpoint), inputs=inputs, selection=requested,
                    cache=cache)
    return EXIT_OK


def _stage_cache(args: argparse.Namespace, out: Path, loaded: Any, data: Any) -> Any:
    """The :class:`~riverscape.stage_cache.StageCache` of this run in ``out``, keyed by the bytes of every input file and the specs."""
    from .stage_cache import StageCache, file_digest

    files = {"checkpoint": args.checkpoint, "quantized_weights": args.quantized_weights}
    for option in ("model", "data"):  # a factory file (path/to/file.py:fn) or a text corpus (text:FILE)
        value = getattr(args, option) or ""
        path = value.partition(":")[2] if value.startswith("text:") else value.rpartition(":")[0]
        files[option] = path if path and Path(path).is_file() else None
    inputs = {name: file_digest(path) for name, path in files.items() if path is not None}
    return StageCache(out, {"files": inputs, "model": loaded.model_spec, "data": data.spec, "loss": loaded.loss})


def _write_analysis(loaded: Any, data: Any, options: Any, out: Path, *, force: bool, checkpoint: str, inputs: tuple = (),
                    selection: Optional[dict] = None, cache: Any = None) -> dict:
    """Run the analysis into a temporary directory, add ``metrics.json``, rename it to ``out``.

    ``selection`` (with ``--params``) is the layer selection as the user gave it, recorded as
    ``run.selection``. ``cache`` (a :class:`~riverscape.stage_cache.StageCache` in ``out``) keeps
    the finished stages until the report replaces ``out``, or until an error (not an interrupt) ends the run.
    """
    from .analysis import analyze
    from .distributed import is_main, world_size
    from .io.jsonable import to_jsonable
    from .outdir import MARKER_NAME, atomic_output_dir
    from .precision import resolve_precision

    if not is_main():  # the same analysis, in step with process 0, which writes the report
        analyze(loaded, data, options, progress=False)
        return {}
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        try:
            metrics = dict(run_analysis(loaded, data, options, tmp, cache=cache))
        except Exception:  # an error: nothing is kept (an interrupt keeps the finished stages)
            if cache is not None:
                cache.discard()
            raise
        resolved = metrics.pop("options", None) or options.to_dict()  # with the budget's values filled in
        payload = to_jsonable(
            {
                **metrics,
                "run": {
                    "riverscape_version": __version__,
                    "checkpoint": checkpoint,
                    "source_format": loaded.source_format,
                    "checkpoint_dtype": loaded.checkpoint_dtype,
                    "precision": resolve_precision(loaded.model, options.dtype, loaded.checkpoint_dtype).to_dict(),
                    "device": options.device,
                    "model": loaded.model_spec,
                    "data": data.spec,
                    "loss": loaded.loss,
                    "options": resolved,
                    "world_size": world_size(),
                    **({"selection": selection} if selection is not None else {}),
                },
            }
        )
        (tmp / "metrics.json").write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    for warning in payload.get("warnings", []):
        print(f"riverscape: warning: {warning}", file=sys.stderr)
    if options.json:
        print(json.dumps(payload, indent=2, allow_nan=False))
    else:
        files = ", ".join(sorted(p.name for p in out.iterdir() if p.name != MARKER_NAME))
        print(f"wrote {out}/ ({files})")
    return payload


# ------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    """Train the digits MLP (recording its trajectory), analyse it at 2 bits, print where the report is."""
    from .analysis_options import AnalyzeOptions
    from .checkpoint import LoadedCheckpoint, make_spec, resolve_data
    from .outdir import check_output_dir

    start = time.perf_counter()
    out = Path(args.out)
    check_output_dir(out, args.force)
    options = AnalyzeOptions(bits=(args.bits,), seed=args.seed, qat_steps=args.qat_steps)
    data = resolve_data("digits")
    spec = make_spec("mlp", data.dataset.model_kwargs("mlp"))
    config = {"steps": 1500, "lr": 1e-2, "optimizer": "adam", "batch_size": 128, "record_every": 75}
    print("training the 64-32-10 digits MLP (1500 Adam steps) ...", flush=True)
    result, metrics = _fit(spec, data, loss=data.loss, config=config, seed=args.seed)
    loaded = LoadedCheckpoint.from_train_result(
        result, model_spec=spec, data_spec=data.spec, loss=data.loss, train_config={**config, "seed": args.seed}, metrics=metrics
    )
    print(f"analysing it at {args.bits} bits (PTQ, {args.qat_steps} QAT steps, Hessian, landscapes, alignment) ...", flush=True)
    payload = _write_analysis(loaded, data, options, out, force=args.force, checkpoint="(trained by riverscape demo)")
    fp, ptq, qat = payload["fp"], payload["ptq"], payload.get("qat", {})
    print(
        f"test accuracy: full precision {fp['accuracy']:.3f}, PTQ {ptq['accuracy']:.3f}"
        + (f", QAT {qat['accuracy']:.3f}" if qat else "")
        + f" at {args.bits} bits; PTQ loss increase {ptq['measured_loss_increase']:.3g} measured vs "
        f"{ptq['predicted_loss_increase']:.3g} predicted by the Hessian"
    )
    print(f"report: {(out / 'report.html').resolve()}  ({time.perf_counter() - start:.0f} s)")
    return EXIT_OK


# ----------------------------------------------------------------------------- parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _add_model_data(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument(
        "--model",
        default="mlp" if defaults else None,
        metavar="SPEC",
        help="built-in model name (mlp, cnn, cnn1d, cifar_cnn, resnet20, transformer, linear), "
        "package.module:factory or path/to/file.py:factory"
        + (" (default: mlp)" if defaults else "; needed when CHECKPOINT does not name its architecture"),
    )
    group.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments of the model factory, e.g. '{\"in_dim\": 64}'")
    group.add_argument(
        "--data",
        default="digits" if defaults else None,
        metavar="SPEC",
        help="built-in dataset (digits, mnist1d, teacher_linear, teacher_sign, text) or a factory returning "
        "(inputs, targets), a Dataset or a DataLoader" + (" (default: digits)" if defaults else " (default: the checkpoint's)"),
    )
    group.add_argument("--data-kwargs", metavar="JSON", help="keyword arguments of the dataset loader or factory")
    group.add_argument("--loss", choices=("cross_entropy", "mse", "causal_lm"), help="loss (default: the checkpoint's, else the data's)")
    group.add_argument("--memory-limit", type=float, default=DEFAULT_MEMORY_GB, metavar="GB",
                       help="refuse models, data and checkpoint tensors that would need more memory than this, "
                       "checked before allocating; analysis data from a loader that would exceed it are streamed "
                       "(re-read on every evaluation) instead of held (default %(default)s, 0 = no limit)")


def _subcommand(sub: Any, name: str, summary: str, description: str, epilog: Optional[str] = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_train(sub: Any) -> None:
    p = _subcommand(
        sub,
        "train",
        "train a full-precision model and save a checkpoint with its trajectory",
        "Train a full-precision model, recording its trajectory, and save a safe riverscape checkpoint.",
        _TRAIN_EPILOG,
    )
    p.add_argument("--out", required=True, metavar="FILE", help="checkpoint file to write (e.g. mlp.pt)")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint file")
    _add_model_data(p, defaults=True)
    p.add_argument("--hidden", metavar="W[,W...]", help="hidden widths of the mlp, e.g. 64,32 (default 32)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=1500, help="optimiser steps (default 1500)")
    opt.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 0.01)")
    opt.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="optimiser (default adam)")
    opt.add_argument("--batch-size", type=int, default=128, help="mini-batch size, 0 = full batch (default 128)")
    opt.add_argument("--record-every", type=int, metavar="N", help="record the trajectory every N steps (default: 20 records)")
    opt.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order (default 0)")
    _add_common(p)
    p.set_defaults(func=_cmd_train)


def _add_analyze(sub: Any) -> None:
    from .analysis_options import QAT_ESTIMATORS, RANGE_METHODS, AnalyzeOptions
    from .budget import SKIPPABLE_STAGES
    from .precision import PRECISIONS

    d = AnalyzeOptions.__dataclass_fields__
    p = _subcommand(
        sub,
        "analyze",
        "explain a checkpoint's PTQ collapse: curvature, river path, slices, QAT (HTML report)",
        "Analyse how quantizing CHECKPOINT moves it in the loss landscape and write an interactive report.",
        _ANALYZE_EPILOG,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pt, .pth, .safetensors) or a Hugging Face model folder "
                   "(save_pretrained; with --data text:FILE, or textcls:FILE for a sequence classifier)")
    _add_model_data(p, defaults=False)
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled code in CHECKPOINT (only for files from a trusted source)")
    q = p.add_argument_group("quantization")
    q.add_argument("--bits", nargs="+", default=[",".join(map(str, d["bits"].default))], metavar="B",
                   help="bit-widths from 1 to 16, e.g. --bits 4 2 (default 8 4 2)")
    q.add_argument("--range", dest="range_method", choices=RANGE_METHODS, default=d["range_method"].default,
                   help=f"clipping range of the quantizer (default {d['range_method'].default})")
    q.add_argument("--per-channel", dest="per_channel", action="store_true", default=True, help="one scale per output channel (default)")
    q.add_argument("--per-tensor", dest="per_channel", action="store_false", help="one scale per weight tensor")
    q.add_argument("--symmetric", dest="symmetric", action="store_true", default=True, help="symmetric grid without zero point (default)")
    q.add_argument("--asymmetric", dest="symmetric", action="store_false", help="affine grid with a zero point")
    q.add_argument("--include", action="append", metavar="PATTERN", help="quantize only these layers (names or globs; repeatable)")
    q.add_argument("--exclude", action="append", metavar="PATTERN", help="keep these layers in full precision (repeatable)")
    q.add_argument("--params", action="append", metavar="PATTERN",
                   help="analyse only the quantized weights matching these names or globs, e.g. 'transformer.h.0.*' (one block; "
                        "repeatable); everything else stays fixed at full precision. Narrows --include/--exclude, never widens them")
    q.add_argument("--ptq", dest="ptq_methods", default="rtn", metavar="M[,M...]",
                   help="PTQ methods to compare, e.g. rtn,gptq; the first is the point the landscape is analysed at (default rtn)")
    q.add_argument("--group-size", type=int, metavar="G", help="per-group scales of G input weights (W<b>g<G>), e.g. 32 or 128")
    q.add_argument("--act-bits", type=int, metavar="B", help="also fake-quantize layer inputs to B bits, per tensor, calibrated (W4A8)")
    q.add_argument("--quantized-weights", metavar="FILE",
                   help="state dict (.pt, .safetensors) of these weights quantized elsewhere and dequantized: analysed as the PTQ point "
                        "(with --bits set to its bit-width), compared with the --ptq methods")
    q.add_argument("--keep-first-last", action="store_true", help="keep the first and last layers in full precision")
    q.add_argument("--bits-budget", type=float, metavar="B",
                   help="also plan mixed precision: one bit-width per layer from 2/3/4/8 with average <= B bits, minimising the "
                        "second-order damage, checked against HAWQ and random allocations (printed, in metrics.json and the report)")
    a = p.add_argument_group("analysis")
    a.add_argument("--budget", default="standard", metavar="PRESET|MINUTES",
                   help="quick, standard or thorough, or a time in minutes: scales samples, HVP counts, per-layer stage, grid and "
                        "QAT steps together; the plan and its estimated duration are printed first (default standard)")
    a.add_argument("--skip", action="append", metavar="STAGE", help=f"leave out a stage, repeatable or comma-separated: {', '.join(SKIPPABLE_STAGES)}")
    a.add_argument("--top-k", type=int, help="Hessian eigenpairs to compute (default: the budget's, 5 for standard)")
    a.add_argument("--grid-steps", type=int, help="points per axis of the landscape slices (default: the budget's, 25 for standard)")
    a.add_argument("--grid-span", type=float, default=d["grid_span"].default, help="extent of the slices in direction norms (default %(default)s)")
    a.add_argument("--max-samples", type=int, metavar="N", help="use at most N data samples, 0 = all (default: the budget's, 1024 for standard)")
    a.add_argument("--qat-steps", type=int, help="QAT steps per bit-width, 0 = skip QAT (default: the budget's, 300 for standard)")
    a.add_argument("--qat-estimator", choices=QAT_ESTIMATORS, default=d["qat_estimator"].default, help="QAT gradient estimator (default %(default)s)")
    a.add_argument("--qat-lr", type=float, metavar="LR", default=d["qat_lr"].default,
                   help="Adam learning rate of QAT (default %(default)g; large pretrained networks usually want 1e-4 to 1e-3)")
    a.add_argument("--seed", type=int, default=d["seed"].default, help="seed of all random choices (default %(default)s)")
    a.add_argument("--device", default=d["device"].default, help="torch device: cpu, cuda, cuda:1, mps (default %(default)s)")
    a.add_argument("--dtype", choices=PRECISIONS, default=d["dtype"].default,
                   help="precision: auto (half-precision weights in float32, others as stored), native (bf16/fp16 in their own "
                        "dtype, float32 accumulation), float32 or float64 (default %(default)s)")
    a.add_argument("--chunk-size", type=int, metavar="N",
                   help="points evaluated together by the slices, loss paths and basin scan: memory grows with N (default: automatic)")
    a.add_argument("--bn-recalibrate", action="store_true", help="re-estimate BatchNorm running statistics on the analysis data first (use when the check says they do not match)")
    a.add_argument("--no-bn-reestimate", dest="bn_reestimate", action="store_false",
                   help="measure PTQ points with the FP BatchNorm statistics (default: re-estimated at each quantized point)")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help=f"report directory (default {DEFAULT_REPORT_ROOT}/<checkpoint name>)")
    o.add_argument("--force", action="store_true", help="replace an existing report directory")
    o.add_argument("--json", action="store_true", help="print metrics.json to stdout")
    o.add_argument("--no-resume", dest="resume", action="store_false",
                   help="neither load nor keep finished stages (by default each finished stage is kept in DIR/.riverscape-work "
                        "until the report is complete, and a re-run of an interrupted command resumes from them)")
    _add_common(p)
    p.set_defaults(func=_cmd_analyze)


def build_parser() -> argparse.ArgumentParser:
    """The ``riverscape`` argument parser (subcommands ``train``, ``analyze``, ``demo``)."""
    parser = _Parser(
        prog="riverscape",
        description="Loss-landscape geometry of quantization: why PTQ collapses at low bit-widths and QAT recovers.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"riverscape {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train(sub)
    _add_analyze(sub)
    demo = _subcommand(
        sub,
        "demo",
        "train the digits MLP and write a full 2-bit report (about a minute on CPU)",
        "Train the 64-32-10 digits MLP on sklearn's digits, analyse it at 2 bits (PTQ vs QAT, Hessian spectra,\n"
        "FP and quantized landscapes, gradient alignment) and write report.html + metrics.json.",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--bits", type=int, default=2, help="bit-width to analyse (default 2)")
    demo.add_argument("--qat-steps", type=int, default=300, help="QAT steps shown next to PTQ (default 300)")
    demo.add_argument("--out", default=f"{DEFAULT_REPORT_ROOT}/demo", metavar="DIR", help=f"report directory (default {DEFAULT_REPORT_ROOT}/demo)")
    demo.add_argument("--force", action="store_true", help="replace an existing report directory")
    _add_common(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


# ------------------------------------------------------------------------------- main


# What torch, plotly, scipy and sklearn would otherwise import lazily in the middle of a run
# (torch._dynamo pulls in sympy and torch.fx on the first vmap/optimizer step): an interrupt that
# cuts one of those imports short leaves a half-initialised module behind, which has ended the
# process by SIGINT/SIGABRT instead of exit code 130, or lost the interrupt altogether.
_LAZY_HEAVY = ("torch._dynamo", "plotly.graph_objs", "scipy.stats", "sklearn.datasets")
_COMMAND_MODULES = {
    "train": (".training", ".checkpoint", *_LAZY_HEAVY),
    "analyze": (".analysis", ".checkpoint", *_LAZY_HEAVY),
    "demo": (".analysis", ".checkpoint", ".training", *_LAZY_HEAVY),
}  # imported before the command runs, while signals are held


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; return the exit code.

    0 success, 1 a riverscape bug, 2 bad input or environment, 130 interrupted (SIGINT,
    Ctrl-C), 143 terminated (SIGTERM). The handlers are installed before anything heavy
    is imported, so the codes hold from the first moment of a run.

    Nothing is added to ``sys.path``: a ``--model``/``--data`` factory is imported from the
    file or module the user names, and nothing else from the working directory.
    """
    try:
        from .outdir import signals_deferred

        with handlers_installed():
            with signals_deferred():  # an import cut short leaves half-initialised modules: hold signals until all are in
                parser = build_parser()
                args = parser.parse_args(argv)
                for module in _COMMAND_MODULES.get(getattr(args, "command", None), ()):
                    importlib.import_module(module, __package__)
            if not getattr(args, "func", None):
                parser.print_help(sys.stderr)
                return EXIT_INPUT
            return _run(args)
    except KeyboardInterrupt as exc:
        return exit_code_of(exc)


def _input_error_from(exc: BaseException) -> Optional[str]:
    """The one-line message of an exception caused by the user's input or environment, else None."""
    if isinstance(exc, (InputError, ValueError, FloatingPointError)):
        return _one_line(exc)
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return f"no space left on the device{f' writing {exc.filename}' if exc.filename else ''}; free some space or choose another --out"
        return _one_line(exc)
    text = str(exc)
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in text):  # torch's CPU allocator
        return "out of memory; lower --max-samples, --top-k or --grid-steps, or analyse fewer layers with --params or --include"
    if isinstance(exc, RuntimeError) and ("No space left on device" in text or "file write failed" in text):
        return "no space left on the device while writing the output; free some space or choose another --out"
    if isinstance(exc, ConvergenceError) or type(exc).__name__ in ("ArpackError", "ArpackNoConvergence"):
        return (
            f"the Hessian eigensolver failed: {_one_line(exc)}; the weights may be degenerate "
            "(all zero or saturated) at this point"
        )
    return None


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command and map exceptions to messages and exit codes."""
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        return exit_code_of(exc)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        distributed = sys.modules.get(f"{__package__}.distributed")  # loaded by a command that can run on several processes
        if distributed is not None and not distributed.first_failure():
            return EXIT_UNEXPECTED  # another process failed first and said why on its own line
        message = _input_error_from(exc)
        if message is not None:  # expected: bad input or environment
            print(f"riverscape: error: {message}", file=sys.stderr)
            return EXIT_INPUT
        if isinstance(exc, RiverscapeError):
            print(f"riverscape: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_UNEXPECTED
        print(
            f"riverscape: error: unexpected {type(exc).__name__}: {_one_line(exc)}; this is a riverscape bug: "
            "please report it with the output of the same command with --debug",
            file=sys.stderr,
        )
        return EXIT_UNEXPECTED
    finally:
        distributed = sys.modules.get(f"{__package__}.distributed")
        if distributed is not None:
            distributed.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
