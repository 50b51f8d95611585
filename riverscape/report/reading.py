"""A short plain-language reading of an analysis, generated from its numbers (no new computation)."""
from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["reading"]


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _times(x: Optional[float]) -> str:
    """A ratio for "N× ..." text: two significant digits, but never exponent notation (104, not 1e+02)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.2g}"


def _bits_paragraphs(result: Any, bits: Any) -> list[str]:
    fp = result.fp
    out = []
    acc_known = fp.get("accuracy") is not None and bits.ptq.get("accuracy") is not None
    if acc_known:
        out.append(
            f"**{bits.bits} bits ({bits.quantizer}).** PTQ moves {result.eval_split} accuracy from {_pct(fp['accuracy'])} "
            f"to {_pct(bits.ptq['accuracy'])} (loss {_num(fp['loss'])} → {_num(bits.ptq['loss'])})."
        )
    else:
        out.append(f"**{bits.bits} bits ({bits.quantizer}).** PTQ moves the {result.eval_split} loss from {_num(fp['loss'])} to {_num(bits.ptq['loss'])}.")
    dmg = bits.damage
    if dmg is not None:
        ratio = dmg.ratio
        tb = dmg.breakdown_scale
        if dmg.inside_basin:
            out.append(
                f"The second-order model predicts the training-loss increase well (predicted {_num(dmg.predicted_loss_increase)}, "
                f"measured {_num(dmg.measured_loss_increase)}, ratio {_times(ratio)}): the rounding perturbation stays inside "
                + (f"the basin (breakdown scale t_b = {_num(tb, 2)} > 1)." if tb is not None and math.isfinite(tb) else
                   "the basin (the loss never leaves the quadratic model along the probed range: t_b = ∞).")
            )
        else:
            out.append(
                f"The second-order model predicts a training-loss increase of {_num(dmg.predicted_loss_increase)} but "
                f"{_num(dmg.measured_loss_increase)} is measured ({_times(ratio)}× the prediction): along the rounding "
                f"perturbation the loss stops being quadratic at t_b = {_num(tb, 2)} of its length, so Q(θ) lies outside "
                f"the basin where a local (Hessian-based) PTQ objective is reliable."
            )
        if dmg.hill_fraction is not None and dmg.curvature_share is not None:
            out.append(
                f"Only {_pct(dmg.hill_fraction)} of the perturbation's energy lies in the top-{dmg.k} Hessian "
                f"directions (a random vector: {_pct(dmg.hill_energy_baseline)}), yet they carry {_pct(dmg.curvature_share)} "
                f"of its quadratic damage; moving the quantized point to the valley floor in those directions leaves a loss "
                f"increase of {_num(dmg.floor_recovery)} (a random {dmg.k}-dim subspace: {_num(dmg.random_subspace_recovery)})."
            )
    ali = bits.alignment
    if ali is not None:
        a = ali.to_dict()
        iso = a.get("random_baseline")
        ratio_iso = a["cosine_to_fp"] / iso if iso else None
        z = a.get("null_z")
        verdict = (
            "beyond what a random-sign perturbation of the same size produces"
            if z is not None and z > 2
            else "no more than a random-sign perturbation of the same size produces (the generic restoring force of curvature)"
        )
        out.append(
            f"The gradient at Q(θ) has cosine {_num(a['cosine_to_fp'])} with the direction back to θ_fp "
            f"({_times(ratio_iso)}× the isotropic baseline {_num(iso)}); the matched null gives {_num(a.get('null_mean'))} ± "
            f"{_num(a.get('null_sd'))} (z = {_num(z, 2)}), i.e. {verdict}. Along the top Hessian directions the alignment is "
            f"{_num(a.get('cosine_hill'))}, along the flat rest {_num(a.get('cosine_river'))}."
        )
    if bits.qat is not None:
        q = bits.qat
        hit = q.get("hit_step")
        tau = getattr(bits.qat_result, "tau", None)
        region = "the low-loss region" + (f" (training loss within {_num(tau)} of θ_fp's)" if tau is not None else "")
        if hit is None:
            hit_text = f"never enters {region} within the run"
        elif hit == 0:
            hit_text = f"starts in {region}: PTQ's point is already there"
        else:
            hit_text = f"first enters {region} at step {hit}"
        acc_text = f"{_pct(q['accuracy'])} {result.eval_split} accuracy" if q.get("accuracy") is not None else f"{result.eval_split} loss {_num(q['loss'])}"
        barrier = (bits.barrier_qat or {}).get("height")
        if barrier is None:
            basin = ""
        elif tau is not None and barrier <= tau:
            basin = f" with a linear-path barrier from θ_fp of {_num(barrier)}: back in θ_fp's basin, not back at θ_fp"
        else:
            basin = f", separated from θ_fp by a linear-path barrier of {_num(barrier)}: QAT settled in a different basin"
        out.append(
            f"QAT ({q['estimator']}, {q['steps']} steps) reaches {acc_text}; its quantized iterate {hit_text}. It ends "
            f"{_num(q['distance_to_fp'])} from θ_fp (PTQ: {_num(q['distance_ptq_to_fp'])}){basin}."
        )
    out.extend(bits.notes)
    return out


def _smallest_eigenvalue(value: Any) -> str:
    if value is None:
        return "."
    negative = " (negative curvature: the quantized point is not at a minimum of L)" if value < 0 else ""
    return f" and the smallest {_num(value)}{negative}."


def reading(result: Any) -> list[str]:
    """Paragraphs (markdown-ish) describing what the figures of ``result`` show."""
    fp = result.fp
    h = result.hessian_fp
    first = (
        f"The model has {result.n_params:,} parameters, {result.n_quantized:,} of them in the quantized weight tensors "
        f"({len(result.quantized_layers)} layers). At full precision its {result.eval_split} loss is {_num(fp['loss'])}"
        + (f" and accuracy {_pct(fp['accuracy'])}" if fp.get("accuracy") is not None else "")
        + f". The Hessian (on {result.analysis_samples} training samples) has top eigenvalue {_num(h['top_eigenvalues'][0])}, "
        f"trace {_num(h['trace'])} ± {_num(h['trace_stderr'], 2)}"
        + (f" and smallest eigenvalue {_num(h['min_eigenvalue'])}." if h.get("min_eigenvalue") is not None else " (the spectral density, which gives the smallest eigenvalue, was skipped).")
    )
    paragraphs = [first]
    for bits in result.by_bits:
        paragraphs.extend(_bits_paragraphs(result, bits))
        hq = bits.hessian_q
        if hq:
            paragraphs.append(
                f"At Q(θ_fp) ({bits.bits} bits) the top eigenvalue is {_num(hq['top_eigenvalues'][0])} "
                f"({_times(hq['top_eigenvalues'][0] / h['top_eigenvalues'][0])}× θ_fp's)"
                + _smallest_eigenvalue(hq.get("min_eigenvalue"))
            )
    return paragraphs
