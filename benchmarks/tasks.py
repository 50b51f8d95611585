"""Benchmark tasks: each times riverscape and the peers alternately on one workload.

Every task returns :class:`~benchmarks.timing.Row` objects with an error against the task's
reference. Riverscape rows carry a tolerance (enforced by the runner before any speed is
printed); peers' errors are reported only.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import Tensor

from . import peers
from .reference import converged_float32_top, reference_hvp, spectrum_reference, trace_reference
from .timing import Contender, Outcome, Row, alternate, median
from .workloads import Workload

REPO = Path(__file__).resolve().parents[1]

# Tolerances enforced on riverscape (relative errors).
HVP_TOL = 1e-3  # float32 vs float64 HVP: 1e-7..1e-5 on MLP/CNN/transformer, 1.9e-4 on ResNet-20 with BN (all tools alike); a wrong HVP is off by O(1)
EIG_TOL = 1e-6  # the target for top-5 eigenvalues
TRACE_TOL = 0.02  # the target for 100 matvecs; enforced as 2% + 3 standard errors (see task_trace)
TRACE_RTOL = 0.01  # early-stopping row: half the 2% target, so the stopping rule's ~5% miss rate stays inside it
DENSITY_TOL = 1e-3  # largest Ritz value of 100 Lanczos steps vs lambda_max
DENSITY_STOP_TOL = 1e-3  # early-stopping row of the density task (spectral_density(tol=...))
SLICE_TOL = 1e-5  # float32 grid values vs a plain per-point forward loop (same points)
CENTRE_TOL = 1e-6  # the slice's centre value vs Objective.loss(theta)


@dataclass
class TaskConfig:
    """Settings shared by all tasks."""

    repeats: int = 3
    seed: int = 0
    slice_steps: int = 25
    slice_span: float = 1.0
    trace_matvecs: int = 100
    density_steps: int = 100
    trace_reference_matvecs: int = 1500
    reference_top: int = 5  # how many top eigenvalues the references converge (>= every k run)
    reference_smallest: bool = True  # the smallest eigenvalue too (density task only)
    use_cache: bool = True
    with_peers: bool = True
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failures.append(message)


def riverscape_function(module: str, name: str) -> Callable | None:
    """``riverscape.landscape.<module>.<name>`` if it exists yet, else ``None``."""
    try:
        return getattr(importlib.import_module(f"riverscape.landscape.{module}"), name, None)
    except ImportError:
        return None


def _peer(cfg: TaskConfig, module: str) -> bool:
    return cfg.with_peers and peers.available(module)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _rows(workload: Workload, task: str, results: dict, errors: dict, kind: str, tolerances: dict, notes: dict) -> list[Row]:
    rows = []
    for tool, (times, outcome) in results.items():
        rows.append(Row(workload.name, task, tool, median(times), times, outcome.hvps, errors.get(tool), kind, tolerances.get(tool), None, notes.get(tool, "")))
    return rows


def _probe(dim: int, seed: int) -> Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def warm_up(workload: Workload, with_peers: bool = True) -> None:
    """One call of every HVP path, so no tool pays this process's first-call costs in a timed run."""
    obj = workload.objective()
    v = _probe(obj.dim, 0)
    obj.loss(obj.theta0)
    obj.hvp(obj.theta0, v)
    obj.hessian(obj.theta0, mode="reuse").torch_matvec(v)
    if with_peers and peers.available("curvlinops"):
        peers.curvlinops_hessian(workload) @ v
    if with_peers and peers.available("hessian_eigenthings"):
        peers.eigenthings_operator(workload).matvec(v)


# --------------------------------------------------------------------------- HVP vs gradient
def task_hvp(workload: Workload, cfg: TaskConfig) -> list[Row]:
    """One HVP at a fixed point vs one gradient (same vector for every tool)."""
    obj = workload.objective()
    theta = obj.theta0
    v = _probe(obj.dim, cfg.seed)
    ref = reference_hvp(workload, v)
    x, y = workload.data()

    model = workload.fresh_model()
    params = list(model.parameters())

    def autograd_gradient() -> Outcome:
        loss = workload.criterion(model(x), y)
        return Outcome(torch.autograd.grad(loss, params))

    reuse = obj.hessian(theta, mode="reuse")
    reuse.torch_matvec(v)  # builds the gradient graph once (amortised over repeated HVPs)
    contenders = [
        Contender("torch autograd gradient", autograd_gradient),
        Contender("riverscape grad", lambda: Outcome(obj.grad(theta))),
        Contender("riverscape hvp (reuse)", lambda: Outcome(reuse.torch_matvec(v), 1)),
        Contender("riverscape hvp (forward-over-reverse)", lambda: Outcome(obj.hvp(theta, v), 1)),
    ]
    if _peer(cfg, "pyhessian"):
        session = peers.PyHessianSession(workload)
        v_list = peers.split_like(session.hessian.params, v)
        contenders.append(Contender("PyHessian hvp (graph reuse)", lambda: Outcome(torch.cat([h.reshape(-1) for h in session.hvp(v_list)]), 1)))
    if _peer(cfg, "curvlinops"):
        clo = peers.curvlinops_hessian(workload)
        contenders.append(Contender("curvlinops H @ v", lambda: Outcome(clo @ v, 1)))
    if _peer(cfg, "hessian_eigenthings"):
        het = peers.eigenthings_operator(workload)
        contenders.append(Contender("hessian-eigenthings matvec", lambda: Outcome(het.matvec(v), 1)))

    results = alternate(contenders, max(5, 3 * cfg.repeats), warmup=True)  # cheap: more repeats
    grad_time = median(results["torch autograd gradient"][0])
    hvp_rows, grad_rows = [], []
    for tool, (times, outcome) in results.items():
        t = median(times)
        if "gradient" in tool or tool == "riverscape grad":
            grad_rows.append(Row(workload.name, "gradient", tool, t, times, None, None, "", None, None, f"{t / grad_time:.2f} gradients"))
            continue
        err = float((outcome.value.double() - ref).norm() / ref.norm())
        tol = HVP_TOL if tool.startswith("riverscape") else None
        hvp_rows.append(Row(workload.name, "hvp", tool, t, times, 1, err, "rel. L2 error vs float64 HVP", tol, None, f"{t / grad_time:.2f} gradients"))
    reuse.release()
    return grad_rows + hvp_rows


# --------------------------------------------------------------------------- top-k eigenpairs
def task_eigs(workload: Workload, cfg: TaskConfig, k: int) -> list[Row]:
    """Top-``k`` eigenvalues; error = max relative error over the ``k`` values."""
    from riverscape.landscape import hessian_eigs

    obj = workload.objective()
    theta = obj.theta0
    ref = spectrum_reference(workload, top=max(k, cfg.reference_top), smallest=cfg.reference_smallest, use_cache=cfg.use_cache)
    ref_top = ref.top[:k]
    v0 = np.random.default_rng(cfg.seed).standard_normal(obj.dim)
    lanczos_steps = 20 if k == 1 else 30

    def rs_eigs() -> Outcome:
        op = obj.hessian(theta)
        values, _ = hessian_eigs(obj, theta, k=k, operator=op, seed=cfg.seed)
        op.release()
        return Outcome(values.numpy(), op.matvecs)

    contenders = [Contender("riverscape hessian_eigs", rs_eigs)]
    notes = {"riverscape hessian_eigs": "eigsh LA, riverscape defaults"}
    if _peer(cfg, "pyhessian"):
        def pyhessian_eigs() -> Outcome:
            session = peers.PyHessianSession(workload)
            return Outcome(np.array(session.eigenvalues(k, cfg.seed)), session.hvps)

        contenders.append(Contender("PyHessian eigenvalues", pyhessian_eigs))
        notes["PyHessian eigenvalues"] = "power iteration, maxIter=100, tol=1e-3 (defaults)"
    if _peer(cfg, "curvlinops"):
        def curvlinops_eigs() -> Outcome:
            op = peers.curvlinops_scipy(workload)
            values = eigsh(op, k=k, which="LA", tol=0, v0=v0, return_eigenvectors=False)
            return Outcome(values, op.matvecs)

        contenders.append(Contender("curvlinops + eigsh", curvlinops_eigs))
        notes["curvlinops + eigsh"] = "eigsh LA tol=0"
    if _peer(cfg, "hessian_eigenthings"):
        from hessian_eigenthings import lanczos

        def eigenthings_eigs() -> Outcome:
            op = peers.eigenthings_operator(workload)
            res = lanczos(op, k=k, max_iter=lanczos_steps, which="LA", seed=cfg.seed)
            return Outcome(res.eigenvalues.double().numpy(), op.matvecs)

        contenders.append(Contender("hessian-eigenthings lanczos", eigenthings_eigs))
        notes["hessian-eigenthings lanczos"] = f"{lanczos_steps} Lanczos steps, full reorth."

    results = alternate(contenders, cfg.repeats)
    converged = converged_float32_top(workload, top=max(k, cfg.reference_top), use_cache=cfg.use_cache)[:k]
    errors, solver = {}, {}
    for tool, (_, outcome) in results.items():
        got = np.sort(np.asarray(outcome.value, dtype=np.float64))[::-1][:k]
        errors[tool] = _max_rel(got, ref_top)
        # float32 HVPs carry rounding noise of order eps32 * ||H||: the solver's convergence is
        # measured on the same float32 operator, relative to lambda_max = ||H|| (top of the spectrum)
        solver[tool] = float(np.max(np.abs(got - converged)) / abs(converged[0])) if got.shape == converged.shape else float("inf")
        notes[tool] = f"{notes[tool]}; vs converged float32 (rel. to lambda_max): {solver[tool]:.1e}"
    # The 1e-6 target holds where float32 allows it: the float32 operator's own converged top-k
    # (eigsh tol=0) is already `floor` away from the float64 truth (trained CIFAR CNN: ~3e-6, its
    # HVPs differ from float64 by ~8e-6), and two float32 solves can differ by twice that.
    floor = _max_rel(converged, ref_top)
    tolerance = max(EIG_TOL, 2 * floor)
    notes["riverscape hessian_eigs"] += f"; float32 floor {floor:.1e}, enforced tol max(1e-6, 2 x floor)"
    return _rows(workload, f"top{k}", results, errors, f"max rel. error vs {ref.method}", {"riverscape hessian_eigs": tolerance}, notes)


def _versus_peers(results: dict, tool: str) -> str:
    """``"; 0.45x PeerA, 0.61x PeerB"``: a second riverscape row's time ratios (the table's ratio
    column is against the task's first riverscape row)."""
    seconds = median(results[tool][0])
    ratios = [f"{seconds / median(times):.2f}x {peer}" for peer, (times, _) in results.items() if not peer.startswith("riverscape")]
    return "; " + ", ".join(ratios) if ratios else ""


def _max_rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref) / np.abs(ref))) if got.shape == ref.shape else float("inf")


# --------------------------------------------------------------------------- trace
def task_trace(workload: Workload, cfg: TaskConfig) -> list[Row]:
    """``tr H`` with a budget of ``cfg.trace_matvecs`` HVPs."""
    from riverscape.landscape import hessian_trace

    obj = workload.objective()
    theta = obj.theta0
    ref = trace_reference(workload, matvecs=cfg.trace_reference_matvecs, use_cache=cfg.use_cache)
    m = cfg.trace_matvecs

    def rs_trace() -> Outcome:
        op = obj.hessian(theta)
        est = hessian_trace(obj, theta, matvecs=m, method="hutch++", operator=op, seed=cfg.seed)
        op.release()
        return Outcome(est, op.matvecs)

    def rs_trace_rtol() -> Outcome:
        op = obj.hessian(theta)
        est = hessian_trace(obj, theta, matvecs=m, method="hutch++", operator=op, seed=cfg.seed, rtol=TRACE_RTOL)
        op.release()
        return Outcome(est, op.matvecs)

    adaptive = f"riverscape hessian_trace (rtol={TRACE_RTOL:g})"
    contenders = [Contender("riverscape hessian_trace", rs_trace), Contender(adaptive, rs_trace_rtol)]
    notes = {"riverscape hessian_trace": "Hutch++", adaptive: f"Hutch++, at most {m} matvecs, stops once 2 stderr <= {TRACE_RTOL:g} |estimate|"}
    if _peer(cfg, "pyhessian"):
        def pyhessian_trace() -> Outcome:
            session = peers.PyHessianSession(workload)
            return Outcome(session.trace(m, cfg.seed), session.hvps)

        contenders.append(Contender("PyHessian trace", pyhessian_trace))
        notes["PyHessian trace"] = "Hutchinson, tol=-inf (whole budget: with a negative running mean its relative test stops at once)"
    if _peer(cfg, "hessian_eigenthings"):
        from hessian_eigenthings import trace

        def eigenthings_trace() -> Outcome:
            op = peers.eigenthings_operator(workload)
            return Outcome(trace(op, num_matvecs=m, method="hutch++", seed=cfg.seed).estimate, op.matvecs)

        contenders.append(Contender("hessian-eigenthings trace", eigenthings_trace))
        notes["hessian-eigenthings trace"] = "Hutch++"
    if _peer(cfg, "curvlinops"):
        def curvlinops_trace() -> Outcome:
            value, used = peers.curvlinops_hutchpp(workload, m, cfg.seed)
            return Outcome(value, used)

        contenders.append(Contender("curvlinops hutchpp_trace", curvlinops_trace))
        notes["curvlinops hutchpp_trace"] = "Hutch++, vmapped columns"

    results = alternate(contenders, cfg.repeats)
    ours = ("riverscape hessian_trace", adaptive)
    estimates = {tool: results[tool][1].value for tool in ours}
    for tool in ours:
        results[tool][1].value = estimates[tool].value
    errors = {tool: _rel(float(out.value), ref.value) for tool, (_, out) in results.items()}
    for tool in ours:
        notes[tool] += f"; stderr {estimates[tool].stderr / abs(ref.value):.1e} rel.; 2% target {'met' if errors[tool] <= TRACE_TOL else 'NOT met'}"
    notes[adaptive] += _versus_peers(results, adaptive)
    rows = _rows(workload, "trace", results, errors, f"rel. error vs {ref.method}", {tool: 1.0 for tool in ours}, notes)
    # A stochastic estimate is wrong when it misses by more than the 2% target plus three of its
    # own (and the reference's) standard errors: that catches bias, not bad luck on an indefinite H.
    for row in rows:
        if row.tool in estimates:
            est = estimates[row.tool]
            allowed = TRACE_TOL * abs(ref.value) + 3 * (est.stderr**2 + ref.stderr**2) ** 0.5
            row.checked = abs(est.value - ref.value) / allowed
    return rows


# --------------------------------------------------------------------------- spectral density
def task_density(workload: Workload, cfg: TaskConfig) -> list[Row]:
    """SLQ with ``cfg.density_steps`` Lanczos steps; compare the extreme Ritz values."""
    obj = workload.objective()
    theta = obj.theta0
    ref = spectrum_reference(workload, top=max(1, cfg.reference_top), smallest=cfg.reference_smallest, use_cache=cfg.use_cache)
    lam_max, lam_min = float(ref.top[0]), ref.smallest
    steps = cfg.density_steps
    contenders, notes = [], {}
    density = riverscape_function("curvature", "spectral_density")
    results_kept = {}
    early = f"riverscape spectral_density (tol={DENSITY_STOP_TOL:g})"
    if density is not None:
        def rs_density(tol: float | None = None) -> Outcome:
            op = obj.hessian(theta)
            result = density(obj, theta, lanczos_steps=steps, probes=1, operator=op, seed=cfg.seed, tol=tol)
            op.release()
            results_kept[tol] = result
            return Outcome(result.ritz_values.double().numpy().reshape(-1), op.matvecs)

        contenders.append(Contender("riverscape spectral_density", rs_density))
        contenders.append(Contender(early, lambda: rs_density(DENSITY_STOP_TOL)))
        notes[early] = f"at most {steps} steps, stops when extremes and broadened density settle (tol {DENSITY_STOP_TOL:g})"
    if _peer(cfg, "pyhessian"):
        def pyhessian_density() -> Outcome:
            session = peers.PyHessianSession(workload)
            nodes, _ = session.density(steps, cfg.seed)
            return Outcome(nodes, session.hvps)

        contenders.append(Contender("PyHessian density", pyhessian_density))
        notes["PyHessian density"] = "with a torch.eig shim (torch.linalg.eigh): torch.eig was removed"
    if _peer(cfg, "hessian_eigenthings"):
        from hessian_eigenthings import spectral_density

        def eigenthings_density() -> Outcome:
            op = peers.eigenthings_operator(workload)
            res = spectral_density(op, num_runs=1, lanczos_steps=steps, num_grid_points=200, seed=cfg.seed)
            return Outcome(res.raw_eigenvalues.double().numpy().reshape(-1), op.matvecs)

        contenders.append(Contender("hessian-eigenthings spectral_density", eigenthings_density))
    results = alternate(contenders, cfg.repeats)
    errors = {}
    for tool, (_, out) in results.items():
        nodes = np.asarray(out.value)  # riverscape pads probes that stopped early with NaN
        errors[tool] = _rel(float(np.nanmax(nodes)), lam_max)
        low = f"{_rel(float(np.nanmin(nodes)), lam_min):.1e}" if np.isfinite(lam_min) else "not checked (no lambda_min reference)"
        notes[tool] = (notes.get(tool, "") + f"; min Ritz rel. err {low}").lstrip("; ")
    if density is not None:  # what stopping early costs: L1 distance to the full run's density
        full, stopped = results_kept[None], results_kept[DENSITY_STOP_TOL]
        l1 = float(torch.trapezoid((stopped.evaluate(full.grid) - full.density).abs(), full.grid))
        notes[early] += f"; L1 {l1:.1e} from the {steps}-step density (sigma {full.sigma:.2g})"
        notes[early] += _versus_peers(results, early)
    tolerances = {"riverscape spectral_density": DENSITY_TOL, early: DENSITY_TOL}
    rows = _rows(workload, "density", results, errors, f"rel. error of max Ritz value vs lambda_max ({ref.method})", tolerances, notes)
    if density is None:
        rows.insert(0, Row(workload.name, "density", "riverscape spectral_density", None, note="not available yet"))
    return rows


# --------------------------------------------------------------------------- 2D slice
def forward_loop(workload: Workload, points: Tensor) -> np.ndarray:
    """The loss at each point by a plain module forward (the reference and the forward limit)."""
    model = workload.fresh_model()
    params = list(model.parameters())
    out = np.empty(points.shape[0])
    with torch.no_grad():
        for i, p in enumerate(points):
            torch.nn.utils.vector_to_parameters(p, params)
            out[i] = float(workload.criterion(model(workload.x), workload.y))
    return out


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def task_slice(workload: Workload, cfg: TaskConfig) -> list[Row]:
    """A ``steps x steps`` filter-normalised 2D slice."""
    obj = workload.objective()
    theta = obj.theta0
    steps, span = cfg.slice_steps, cfg.slice_span
    random_direction = riverscape_function("directions", "random_direction")
    slice_2d = riverscape_function("slices", "slice_2d")
    if random_direction is None or slice_2d is None:
        return [Row(workload.name, "slice", "riverscape slice_2d", None, note="not available yet")]
    d1 = random_direction(obj, seed=cfg.seed)
    d2 = random_direction(obj, seed=cfg.seed + 1)
    grid_axis = riverscape_function("slices", "grid_axis")
    axis = grid_axis((-span, span), steps).to(obj.dtype)
    coords = torch.cartesian_prod(axis, axis)
    points = torch.addmm(theta, coords, torch.stack([d1, d2]))

    model = workload.fresh_model()

    def one_forward() -> Outcome:
        with torch.no_grad():
            return Outcome(float(workload.criterion(model(workload.x), workload.y)))

    contenders = [
        Contender("riverscape slice_2d", lambda: Outcome(slice_2d(obj, theta, d1, d2, span=span, steps=steps, progress=False).loss.numpy())),
        Contender("one forward", one_forward),
    ]
    if _peer(cfg, "loss_landscapes"):
        contenders.append(Contender("loss-landscapes planar_interpolation", lambda: Outcome(peers.loss_landscapes_plane(workload, theta, d1, d2, span, steps))))
        contenders.append(Contender("loss-landscapes random_plane", lambda: Outcome(peers.loss_landscapes_random_plane(workload, steps, cfg.seed))))
    results = alternate(contenders, cfg.repeats)
    ref_start = time.perf_counter()
    reference = forward_loop(workload, points).reshape(steps, steps)
    loop_seconds = time.perf_counter() - ref_start

    n = steps * steps
    # one forward timed 25 more times (a single timing per repeat is too noisy to extrapolate x625)
    forward_times = results["one forward"][0] + [_timed(one_forward) for _ in range(25)]
    forward_limit = n * median(forward_times)
    rows = []
    for tool, (times, out) in results.items():
        if tool == "one forward":
            continue
        grid = np.asarray(out.value, dtype=np.float64)
        t = median(times)
        note = f"{t / forward_limit:.2f}x forward limit"
        err, tol, kind = None, None, "max rel. error vs per-point forward loop"
        if tool.startswith("loss-landscapes"):
            note += "; its snake traversal evaluates odd columns one step off along d2"
        if tool == "loss-landscapes random_plane":
            note += f"; own directions, grid offset by half a step (centre not evaluated); max loss {grid.max():.3g}"
            kind = "not comparable point by point"
        else:
            err = float(np.max(np.abs(grid - reference) / np.maximum(np.abs(reference), 1e-12)))
        if tool.startswith("riverscape"):
            tol = SLICE_TOL
            centre = grid[steps // 2, steps // 2]
            centre_err = _rel(centre, obj.loss(theta))
            note += f"; centre rel. err {centre_err:.1e}"
            if not centre_err <= CENTRE_TOL:
                cfg.fail(f"{workload.name}/slice: centre value {centre} != loss {obj.loss(theta)} (rel. {centre_err:.2e})")
        rows.append(Row(workload.name, "slice", tool, t, times, None, err, kind, tol, None, note))
    rows.append(Row(workload.name, "slice", f"forward limit ({n} x one forward)", forward_limit, [], None, None, "", None, None, "lower bound"))
    rows.append(Row(workload.name, "slice", "plain loop of forwards (reference)", loop_seconds, [loop_seconds], None, 0.0, "", None, None, f"{loop_seconds / forward_limit:.2f}x forward limit"))
    return rows


# --------------------------------------------------------------------------- riverscape analyze
def _cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "riverscape", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def task_analyze(workload: Workload, cfg: TaskConfig) -> list[Row]:
    """Wall time of a whole ``riverscape analyze`` (subprocess) on a checkpoint from ``riverscape train``."""
    name = "riverscape analyze --bits 2"
    if _cli("analyze", "--help").returncode != 0 or _cli("train", "--help").returncode != 0:
        return [Row(workload.name, "analyze", name, None, note="not available yet")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "ckpt.pt")
        made = _cli("train", "--model", "mlp", "--data", "digits", "--out", ckpt)
        if made.returncode != 0:
            cfg.fail(f"riverscape train failed: {made.stderr.strip()[-300:]}")
            return []
        times = []
        for i in range(cfg.repeats):
            start = time.perf_counter()
            done = _cli("analyze", ckpt, "--bits", "2", "--out", str(Path(tmp) / f"out{i}"))
            times.append(time.perf_counter() - start)
            if done.returncode != 0:
                cfg.fail(f"riverscape analyze failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
                return []
    return [Row(workload.name, "analyze", name, median(times), times, None, None, "", None, None, "subprocess, digits MLP checkpoint")]


TASKS: dict[str, Callable[[Workload, TaskConfig], list[Row]]] = {
    "hvp": task_hvp,
    "top1": lambda w, c: task_eigs(w, c, 1),
    "top5": lambda w, c: task_eigs(w, c, 5),
    "trace": task_trace,
    "density": task_density,
    "slice": task_slice,
    "analyze": task_analyze,
}
