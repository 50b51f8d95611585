"""Data-parallel riverscape on ``torch.distributed``: every process holds a shard of the data.

Launch several processes with ``torchrun`` (or Slurm's ``srun``); each one calls :func:`init`
(the process group from the launcher's environment variables: Gloo on CPU, NCCL on CUDA), builds
its :class:`~riverscape.objective.Objective` on its own shard (:func:`shard`: every
``world_size``-th sample, no shuffling, shards may differ in size; or the user's own sharded
loader) and makes it data-parallel with :func:`data_parallel`. From then on ``loss``, ``grad``,
``value_and_grad``, ``hvp``/``hvps`` (every HVP mode), ``metric`` and ``evaluate``/``losses``
return the exact full-data mean on every process: each process computes its share, the weighted
sum ``sum_b n_b * value_b / N`` over its batches with ``N`` the sample (or token) count of *all*
processes, and one all-reduce adds the shares. The solvers on top (eigenpairs, Hutch++, SLQ,
slices, paths, alignment, damage) run unchanged and identically on every process: their random
probes come from explicit seeds, and the few choices that depend on a clock (the adaptive chunk
size of a slice, the timed budget plan) are process 0's, broadcast (:func:`agree`).

Every all-reduce times out (default :data:`DEFAULT_TIMEOUT` seconds, or the environment variable
``RIVERSCAPE_DIST_TIMEOUT``; joining the group and broadcasts wait at least
:data:`STARTUP_TIMEOUT`, as processes start at different times) and a failed or vanished peer
raises :class:`PeerError` instead of hanging. Nothing here touches ``torch.distributed`` state unless the process was
launched distributed (:func:`launched`): one process behaves, and computes, exactly as before.

The complementary mode, for small data and many points: every process holds *all* the data and
:func:`point_parallel` splits the points instead. A batched evaluation (``evaluate``/``losses``,
hence 2D slices, path profiles, basin widths) computes points ``rank, rank + W, ...`` in each
process and gathers them in order (one all-gather per call), and the matched-null draws of the
alignment (each with its valley-floor solve) are shared out the same way; the random numbers
are drawn in full on every process, so the results are those of one process. Loss, gradients
and HVPs are then computed whole in every process (no communication). The two modes exclude
each other: with a shard of the data per process, points cannot be split.

Not distributed: :meth:`Objective.loss_tensor` (differentiable; it is this process's share),
``finite_difference_hvp`` over explicit batches, QAT, data-aware PTQ calibration and BatchNorm
re-estimation (the command line runs those on the full data in every process).
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, TextIO

import torch
from torch import Tensor

from .errors import RiverscapeError
from .streaming import is_tensor_pair

__all__ = [
    "DEFAULT_TIMEOUT",
    "STARTUP_TIMEOUT",
    "AllGather",
    "AllReduce",
    "Launch",
    "PeerError",
    "StridedBatches",
    "agree",
    "collective_timeout",
    "data_parallel",
    "first_failure",
    "init",
    "is_main",
    "launch_from_env",
    "launched",
    "only_errors",
    "point_parallel",
    "rank",
    "shard",
    "shutdown",
    "world_size",
]

DEFAULT_TIMEOUT = 600.0
"""Seconds an all-reduce waits for the other processes before it fails (``RIVERSCAPE_DIST_TIMEOUT``)."""
STARTUP_TIMEOUT = 300.0
"""Least seconds joining the process group and a broadcast wait (processes start at different times)."""


class PeerError(RiverscapeError):
    """A collective failed: another process of the run failed, exited or stopped answering."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a distributed launch.

    Attributes
    ----------
    rank, world_size, local_rank : int
        Global index, number of processes, index on this node.
    source : str
        ``"torchrun"`` or ``"slurm"``.
    """

    rank: int
    world_size: int
    local_rank: int
    source: str


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"the environment variable {name}={env[name]!r} is not an integer") from None


def launch_from_env(env: Optional[Mapping[str, str]] = None) -> Optional[Launch]:
    """The launch described by the environment, ``None`` for a single process.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``);
    Slurm's ``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` (the job script
    exports ``MASTER_ADDR`` and ``MASTER_PORT``). A world of one process is no launch.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        launch = Launch(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0, "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launch = Launch(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), local, "slurm")
    else:
        return None
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise ValueError(f"rank {launch.rank} is outside a world of {launch.world_size} processes ({launch.source} environment)")
    return launch if launch.world_size > 1 else None


def launched(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process is one of several (``torchrun`` or ``srun`` environment)."""
    return launch_from_env(env) is not None


def collective_timeout(seconds: Optional[float] = None) -> float:
    """``seconds``, else ``RIVERSCAPE_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT` (checked positive)."""
    if seconds is None:
        text = os.environ.get("RIVERSCAPE_DIST_TIMEOUT")
        try:
            seconds = DEFAULT_TIMEOUT if text is None else float(text)
        except ValueError:
            raise ValueError(f"RIVERSCAPE_DIST_TIMEOUT must be a number of seconds, got {text!r}") from None
    if not seconds > 0:
        raise ValueError(f"the collective timeout must be positive seconds, got {seconds!r}")
    return float(seconds)


def init(*, timeout: Optional[float] = None, backend: Optional[str] = None) -> Optional[Launch]:
    """Join the process group of a ``torchrun``/``srun`` launch; ``None`` (and nothing done) in one process.

    Parameters
    ----------
    timeout : float, optional
        Seconds joining the group and every broadcast may wait (at least :data:`STARTUP_TIMEOUT`,
        default :func:`collective_timeout`); all-reduces wait :func:`collective_timeout`.
    backend : str, optional
        Default ``"nccl"`` when CUDA is available, else ``"gloo"``.

    Returns
    -------
    Launch or None
    """
    launch = launch_from_env()
    if launch is None:
        return None
    dist = torch.distributed
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed")
    if dist.is_initialized():
        return launch
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"a {launch.source} launch of {launch.world_size} processes needs {name} in the environment "
                             "(torchrun sets it; in a Slurm job script export it, see docs/distributed.md)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size,
                            timeout=datetime.timedelta(seconds=max(STARTUP_TIMEOUT, collective_timeout(timeout))))
    return launch


def shutdown() -> None:
    """Leave the process group (nothing in one process)."""
    if _active():
        torch.distributed.destroy_process_group()


def _active() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 in one process)."""
    return torch.distributed.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes (1 in one process)."""
    return torch.distributed.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this process writes the outputs and prints (rank 0, or the only process)."""
    return rank() == 0


def _collective(what: str, call: Any) -> Any:
    try:
        return call()
    except (RuntimeError, ValueError, OSError) as exc:  # Gloo/NCCL: a peer closed its connection, or the timeout passed
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerError(f"process {rank()} of {world_size()}: {what} failed because another process failed or stopped "
                        f"answering ({detail})") from exc


def agree(value: Any, group: Any = None) -> Any:
    """Process 0's ``value`` on every process (a decision that must be shared); ``value`` in one process."""
    if not _active():
        return value
    box = [value]
    _collective("broadcasting process 0's decision", lambda: torch.distributed.broadcast_object_list(box, src=0, group=group))
    return box[0]


class AllReduce:
    """The :class:`~riverscape.objective.Reduction` of a process group: sums by all-reduce, decisions by broadcast.

    Parameters
    ----------
    group : ProcessGroup, optional
        Default: the world.
    timeout : float, optional
        Seconds an all-reduce waits (default :func:`collective_timeout`).
    """

    def __init__(self, group: Any = None, timeout: Optional[float] = None) -> None:
        if not _active():
            raise RuntimeError("no process group: call riverscape.distributed.init() in every process first")
        self.group = group
        self.timeout = datetime.timedelta(seconds=collective_timeout(timeout))

    def sum(self, tensor: Tensor, op: Any = None) -> Tensor:
        """``tensor`` summed (or reduced by ``op``, a ``ReduceOp``) over the processes, in place (also returned)."""
        dist = torch.distributed

        def reduce() -> None:
            work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=self.group, async_op=True)
            work.wait(timeout=self.timeout)

        _collective("an all-reduce", reduce)
        return tensor

    def agree(self, value: Any) -> Any:
        """Process 0's ``value`` on every process."""
        return agree(value, self.group)

    # -------------------------------------------- a CoordinateSplit (riverscape.linalg.operators)
    def _width(self, n: int) -> int:
        return -(-n // torch.distributed.get_world_size(self.group))

    def coordinates(self, n: int) -> slice:
        """This process's coordinates of an ``n``-vector: block ``rank`` of ``ceil(n / W)`` (the last one shorter)."""
        width = self._width(n)
        start = min(torch.distributed.get_rank(self.group) * width, n)
        return slice(start, min(start + width, n))

    def gather_coordinates(self, part: Tensor, n: int) -> Tensor:
        """The whole ``n``-vector from every process's :meth:`coordinates` part (one all-gather)."""
        width, mine = self._width(n), self.coordinates(n)
        if part.shape != (mine.stop - mine.start,):
            raise ValueError(f"process {rank()} holds coordinates {mine.start}..{mine.stop} of {n}, got {tuple(part.shape)}")
        out = part.new_empty(width * torch.distributed.get_world_size(self.group))
        padded = part if part.shape[0] == width else torch.cat([part, part.new_zeros(width - part.shape[0])])

        def gather() -> None:  # into one tensor: 15 % faster than a list of blocks on Gloo (1e7 floats: 0.044 s vs 0.051 s)
            torch.distributed.all_gather_into_tensor(out, padded.contiguous(), group=self.group, async_op=True).wait(timeout=self.timeout)

        _collective("an all-gather", gather)
        return out[:n]


class AllGather:
    """The :class:`~riverscape.objective.PointSplit` of a process group: strided points, results all-gathered.

    Parameters
    ----------
    group : ProcessGroup, optional
        Default: the world.
    timeout : float, optional
        Seconds an all-gather of tensors waits (default :func:`collective_timeout`); gathering
        Python objects waits the process group's timeout.

    Attributes
    ----------
    rank, world_size : int
        This process's index in the group and the group's size.
    """

    def __init__(self, group: Any = None, timeout: Optional[float] = None) -> None:
        if not _active():
            raise RuntimeError("no process group: call riverscape.distributed.init() in every process first")
        self.group = group
        self.rank = torch.distributed.get_rank(group)
        self.world_size = torch.distributed.get_world_size(group)
        self.timeout = datetime.timedelta(seconds=collective_timeout(timeout))

    def _count(self, r: int, n: int) -> int:
        return len(range(r, n, self.world_size))

    def gather(self, tensor: Tensor, n: int) -> Tensor:
        """All ``n`` rows in order from every process's rows ``rank, rank + W, ...`` (``tensor`` holds those)."""
        dist, w = torch.distributed, self.world_size
        mine = self._count(self.rank, n)
        if tensor.shape[0] != mine:
            raise ValueError(f"process {self.rank} of {w} holds {mine} of {n} points, got {tensor.shape[0]} rows")
        padded = tensor.new_zeros((-(-n // w), *tensor.shape[1:]))  # equal sizes for all_gather
        padded[:mine] = tensor
        parts = [torch.empty_like(padded) for _ in range(w)]

        def gather() -> None:
            dist.all_gather(parts, padded, group=self.group, async_op=True).wait(timeout=self.timeout)

        _collective("an all-gather", gather)
        out = tensor.new_empty((n, *tensor.shape[1:]))
        for r, part in enumerate(parts):
            out[r::w] = part[: self._count(r, n)]
        return out

    def gather_objects(self, values: list, n: int) -> list:
        """All ``n`` entries in order from every process's entries ``rank, rank + W, ...`` (picklable objects)."""
        if len(values) != self._count(self.rank, n):
            raise ValueError(f"process {self.rank} of {self.world_size} holds {self._count(self.rank, n)} of {n} entries, "
                             f"got {len(values)}")
        box: list = [None] * self.world_size
        _collective("an all-gather", lambda: torch.distributed.all_gather_object(box, list(values), group=self.group))
        out: list = [None] * n
        for r, part in enumerate(box):
            out[r :: self.world_size] = part
        return out

    def agree(self, value: Any) -> Any:
        """Process 0's ``value`` on every process."""
        return agree(value, self.group)


_MIXED = ("each process holds only a shard of the data under data_parallel, so points cannot be split across "
          "processes as well: use data_parallel (large data) or point_parallel on all the data (many points), not both")
_MODE_ATTRIBUTES = {"data": "reduction", "point": "point_split"}


def _to_be_made(objective: Any, mode: str) -> bool:
    """Whether to make ``objective`` ``mode``-parallel (``"data"`` or ``"point"``): ``False`` in one process.

    Raises ``ValueError`` when it is in the other mode already (the two exclude each other) or in this one.
    """
    if not _active():
        return False
    other = "point" if mode == "data" else "data"
    if getattr(objective, _MODE_ATTRIBUTES[other]) is not None:
        raise ValueError(f"cannot make a {other}-parallel Objective {mode}-parallel: {_MIXED}")
    if getattr(objective, _MODE_ATTRIBUTES[mode]) is not None:
        raise ValueError(f"the Objective is {mode}-parallel already")
    return True


def point_parallel(objective: Any, group: Any = None) -> Any:
    """Split ``objective``'s batched evaluations and null draws across processes; every process holds all the data.

    A collective: every process calls it, in the same order, on an Objective of the *same,
    complete* data. From then on ``evaluate``/``losses`` (2D slices, path profiles, basin
    widths, damage scans) compute points ``rank, rank + W, ...`` in each process and all-gather
    them in order, and :func:`~riverscape.gradients.matched_null` (the alignment's null,
    valley-floor solves included) shares out its draws the same way. The numbers are those of
    one process (each point is computed by one process exactly as one process would). Loss,
    gradient and HVPs are computed whole in every process, with no communication. Without a
    process group the Objective is returned unchanged.

    Parameters
    ----------
    objective : Objective
        Built on all of the data, the same in every process.
    group : ProcessGroup, optional

    Returns
    -------
    Objective
        The same object, now point-parallel (``objective.point_split`` is set).

    Raises
    ------
    ValueError
        If the Objective is data-parallel (each process has a shard: points cannot be split as
        well), is point-parallel already, or the processes disagree on the parameter layout or
        the number of samples.
    """
    if not _to_be_made(objective, "point"):
        return objective
    split = AllGather(group)
    mine = ([(s.name, s.shape) for s in objective.layout], objective.n_samples, objective.n_counted)
    if split.agree(mine) != mine:
        raise ValueError(f"process {rank()} has another parameter layout or sample count than process 0: "
                         "point_parallel needs the same model and all of the same data in every process")
    objective.point_split = split
    return objective


def data_parallel(objective: Any, group: Any = None) -> Any:
    """Make ``objective`` (built on this process's shard) return full-data means on every process.

    A collective: every process calls it, in the same order, on the Objective of its own
    shard of the same data set. The samples and counted tokens of all shards are summed,
    every batch weight becomes ``n_b / N_all``, and from then on every value, gradient, HVP
    and batched evaluation adds the processes' shares with one all-reduce. Without a process
    group (one process) the Objective is returned unchanged.

    Parameters
    ----------
    objective : Objective
        Built on this process's shard (e.g. of :func:`shard`); at least one batch each.
    group : ProcessGroup, optional

    Returns
    -------
    Objective
        The same object, now data-parallel (``objective.reduction`` is set).

    Raises
    ------
    ValueError
        If the shards disagree on the parameter layout, or the Objective is point-parallel
        (:func:`point_parallel`; the two modes exclude each other).
    """
    if not _to_be_made(objective, "data"):
        return objective
    reduction = AllReduce(group)
    layout = [(s.name, s.shape) for s in objective.layout]
    if reduction.agree(layout) != layout:
        raise ValueError(f"process {rank()} has another parameter layout than process 0: every process must build the same model")
    counts = torch.tensor([objective.n_samples, objective.n_counted], dtype=torch.int64, device=objective.device)
    n_samples, n_counted = (int(v) for v in reduction.sum(counts))
    largest = torch.tensor([objective._largest_numel], dtype=torch.int64, device=objective.device)
    reduction.sum(largest, torch.distributed.ReduceOp.MAX)
    objective.n_samples, objective.n_counted = n_samples, n_counted
    objective._weights = [n / n_counted for n in objective.batch_counts]
    objective._largest_numel = int(largest[0])  # the same vmap chunks, hence the same messages, on every process
    objective.reduction = reduction
    return objective


class StridedBatches:
    """Every ``world_size``-th batch of a re-iterable loader, starting at ``rank`` (re-iterable itself)."""

    def __init__(self, data: Any, rank: int, world_size: int) -> None:
        self.data, self.rank, self.world_size = data, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.data):
            if i % self.world_size == self.rank:
                yield batch


def shard(data: Any, rank_: Optional[int] = None, world_size_: Optional[int] = None) -> Any:
    """This process's strided shard of ``data``: samples ``rank, rank + W, ...`` (no shuffling).

    ``(inputs, targets)`` tensors are split by sample; any other iterable of batches by batch
    (batch ``i`` goes to process ``i % W``). Shards may differ in size by one sample (or batch).
    ``data`` itself in one process.

    Parameters
    ----------
    data : (inputs, targets) tensors or re-iterable of batches
    rank_, world_size_ : int, optional
        Default: this process's.

    Raises
    ------
    ValueError
        If a tensor data set has fewer samples than there are processes.
    """
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world_size_ is None else int(world_size_)
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank {r} is outside a world of {w} processes")
    if w == 1:
        return data
    if is_tensor_pair(data):
        x, y = data
        if x.shape[0] < w:
            raise ValueError(f"{x.shape[0]} samples cannot be shared among {w} processes (each needs one at least)")
        return x[r::w], y[r::w]
    return StridedBatches(data, r, w)


_FAILURES_KEY = "riverscape/failures"


def first_failure() -> bool:
    """Count this process's failure in the run's store; whether it is the first (so it says why).

    A process that fails adds itself to a counter in the process group's key-value store before
    it exits, so the others, whose collectives then fail with :class:`PeerError`, know the cause
    was reported and stay silent: the run ends with one ``riverscape: error:`` line. ``True`` in
    one process, and when the store cannot be reached (the process that held it is gone).
    """
    if not _active():
        return True
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        return int(store.add(_FAILURES_KEY, 1)) == 1
    except Exception:  # noqa: BLE001 - best effort: without a store every failing process speaks
        return True


class _ErrorsOnly:
    """A text stream that passes on only the lines that start with ``riverscape: error:``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith("riverscape: error:"):
                self.stream.write(line + "\n")
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def only_errors() -> None:
    """From now on this process prints nothing but ``riverscape: error:`` lines (for ranks other than 0)."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    sys.stderr = _ErrorsOnly(sys.__stderr__)  # type: ignore[assignment]
