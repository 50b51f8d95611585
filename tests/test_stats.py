"""riverscape.stats: intervals, paired comparisons, nulls, survival (docs/statistics.md).

Statistical checks use fixed seeds, so they are deterministic; each tolerance is the band a
correct implementation would leave with probability >= 0.999 for a random seed (binomial or
normal bound stated next to it), and a plausible bug (wrong level, missing +1, unpaired
differences) lands outside it.
"""
from __future__ import annotations

import ast
import doctest
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as ss

import riverscape as rs
from riverscape.stats import (
    Interval,
    LogRankResult,
    PairedComparison,
    bootstrap_ci,
    empirical_p,
    holm,
    kaplan_meier,
    logrank,
    mean_ci,
    null_z,
    paired_comparison,
    stouffer,
)
from riverscape.stats import intervals as intervals_module
from riverscape.stats import nulls as nulls_module
from riverscape.stats import survival as survival_module

ROOT = Path(__file__).resolve().parents[1]
# two-sided 99.9 % normal quantile: the half-width of every binomial band below is Z999 * sd
Z999 = ss.norm.ppf(0.9995)  # 3.29


def _binomial_band(p: float, trials: int) -> float:
    return Z999 * math.sqrt(p * (1 - p) / trials)


# ---------------------------------------------------------------------- package
def test_stats_is_a_leaf_reachable_as_rs_stats_without_torch():
    assert rs.stats.mean_ci is mean_ci and "stats" in dir(rs)
    for path in sorted((ROOT / "riverscape" / "stats").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("riverscape") for a in node.names), path
            elif isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("riverscape"), path  # only its own modules
    code = "import sys, riverscape.stats; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_docstring_examples():
    for module in (intervals_module, nulls_module, survival_module):
        assert doctest.testmod(module, raise_on_error=True).attempted >= 1


# ---------------------------------------------------------------------- intervals
def test_t_interval_matches_the_textbook_formula():
    x = np.array([2.0, 4.0, 9.0])
    ci = mean_ci(x, method="t", level=0.9)
    half = ss.t.ppf(0.95, 2) * np.std(x, ddof=1) / math.sqrt(3)
    assert (ci.estimate, ci.level, ci.n) == (5.0, 0.9, 3)
    assert ci.low == pytest.approx(5.0 - half, rel=1e-12) and ci.high == pytest.approx(5.0 + half, rel=1e-12)


@pytest.mark.parametrize("method", ["t", "percentile", "bca"])
def test_95_percent_intervals_cover_the_true_mean_at_the_stated_rate(method):
    # 400 repeats of n = 20 N(1, 2^2) samples. If the true coverage is 0.95 the observed share has
    # sd sqrt(.95 .05 / 400) = 0.011; the 99.9 % band is 0.95 +- 0.036. A 90 % interval labelled
    # 95 % (coverage 0.90) falls outside it. The bootstrap intervals are known to under-cover
    # slightly at n = 20 (~0.93-0.94: they use normal, not t, quantiles), still inside the band.
    rng = np.random.default_rng(12345)
    repeats, n, mu = 400, 20, 1.0
    samples = rng.normal(mu, 2.0, size=(repeats, n))
    hits = 0
    for i, x in enumerate(samples):
        ci = mean_ci(x, method=method, n_boot=1000, seed=i)
        hits += ci.low <= mu <= ci.high
    assert abs(hits / repeats - 0.95) <= _binomial_band(0.95, repeats), hits / repeats


@pytest.mark.parametrize("method,scipy_method", [("percentile", "percentile"), ("bca", "BCa")])
def test_bootstrap_agrees_with_scipy(method, scipy_method):
    # Skewed data (exponential, n = 15), where BCa and percentile differ by ~20 % of the width.
    # Independent generators on both sides: each end is a quantile of B = 10^4 resampled means, whose
    # Monte Carlo sd is ~1 % of the interval width (sqrt(.025 .975 / B) / phi(1.96) sd_boot over a
    # width of 3.92 sd_boot); BCa's estimated z0 adds about as much. 5 % of the width is > 3.5 sd of the difference.
    x = np.random.default_rng(1).exponential(size=15)
    ours = bootstrap_ci(x, np.mean, method=method, n_boot=10_000, seed=7)
    theirs = ss.bootstrap((x,), np.mean, n_resamples=10_000, method=scipy_method, random_state=np.random.default_rng(99)).confidence_interval
    width = theirs.high - theirs.low
    assert abs(ours.low - theirs.low) < 0.05 * width and abs(ours.high - theirs.high) < 0.05 * width
    assert ours.estimate == pytest.approx(x.mean(), rel=1e-15)


def test_bootstrap_is_seeded_leaves_numpy_alone_and_takes_any_statistic():
    x = np.random.default_rng(2).normal(size=12)
    state = np.random.get_state()[1].copy()
    a, b = bootstrap_ci(x, np.median, n_boot=500, seed=3), bootstrap_ci(x, np.median, n_boot=500, seed=3)
    assert a == b and np.array_equal(np.random.get_state()[1], state)
    assert a != bootstrap_ci(x, np.median, n_boot=500, seed=4)
    # a statistic without an ``axis`` keyword is evaluated per resample: same draws, same interval
    assert bootstrap_ci(x, lambda v: float(np.median(v)), n_boot=500, seed=3) == a
    constant = mean_ci([1.5, 1.5, 1.5])
    assert (constant.low, constant.estimate, constant.high) == (1.5, 1.5, 1.5)


def test_bootstrap_blocks_do_not_change_the_result(monkeypatch):
    # resamples and jackknife samples are built in blocks of ~2^20 values; tiny blocks (2 rows) must
    # give the same draws, the same jackknife rows and so the same interval
    x = np.random.default_rng(0).exponential(size=10)
    whole = bootstrap_ci(x, n_boot=1001, seed=1)
    monkeypatch.setattr(intervals_module, "_BLOCK_VALUES", 25)
    jackknife = np.concatenate(list(intervals_module._leave_one_out(x)))
    assert np.array_equal(jackknife, np.array([np.delete(x, i) for i in range(10)]))
    assert bootstrap_ci(x, n_boot=1001, seed=1) == whole


def test_interval_str_and_dict():
    ci = Interval(0.0421, 0.0133, 0.0712, 0.95, 5)
    assert str(ci) == "0.0421 [0.0133, 0.0712] (n=5)"
    assert ci.to_dict() == {"estimate": 0.0421, "low": 0.0133, "high": 0.0712, "level": 0.95, "n": 5}
    with pytest.raises(ValueError, match="out of order"):
        Interval(0.0, 1.0, -1.0, 0.95, 3)


# ---------------------------------------------------------------------- paired
def test_paired_comparison_uses_the_paired_differences():
    # seeds differ a lot (sd 10) but arm a is arm b + 0.5 +- 0.1 on every seed: the paired interval is
    # narrow and excludes 0; an unpaired interval of mean(a) - mean(b) would be ~ +- 9 wide.
    rng = np.random.default_rng(5)
    base = rng.normal(0.0, 10.0, size=8)
    b_values = base
    a_values = base + 0.5 + rng.normal(0.0, 0.1, size=8)
    result = paired_comparison(a_values, b_values, a="QAT", b="PTQ", n_boot=2000, seed=1)
    assert isinstance(result, PairedComparison) and (result.a, result.b, result.n) == ("QAT", "PTQ", 8)
    assert result.difference == mean_ci(a_values - b_values, n_boot=2000, seed=1, method="bca")
    assert 0.3 < result.difference.low < result.difference.estimate < result.difference.high < 0.7
    unpaired_sd = math.sqrt(np.var(a_values, ddof=1) / 8 + np.var(b_values, ddof=1) / 8)
    assert result.difference.high - result.difference.low < 0.1 * unpaired_sd
    # all 8 differences positive: exact two-sided signed-rank p = 2 / 2^8
    assert result.wilcoxon_p == pytest.approx(2 / 2**8, rel=1e-12)


def test_wilcoxon_p_equals_scipy_and_is_exact_for_small_n():
    a = np.array([1.8, 2.9, 3.1, 4.6, 5.0, 6.2, 2.2])
    b = np.array([1.2, 3.3, 2.0, 4.0, 5.5, 5.1, 1.0])
    result = paired_comparison(a, b, n_boot=200)
    assert result.wilcoxon_p == ss.wilcoxon(a - b).pvalue
    # n = 5, all differences positive: exact p = 2 * (1/2)^5 (the normal approximation gives 0.043)
    assert paired_comparison([2, 3, 4, 5, 6.5], [1, 1, 1, 1, 1], n_boot=200).wilcoxon_p == pytest.approx(0.0625, rel=1e-12)
    assert math.isnan(paired_comparison([1.0, 2.0], [1.0, 2.0], n_boot=200).wilcoxon_p)


def test_paired_comparison_str_and_dict():
    result = paired_comparison([1.0, 2.0, 3.0, 4.5], [0.5, 1.0, 2.2, 3.0], a="STE", b="LSQ", n_boot=500)
    text = str(result)
    assert text.startswith("STE - LSQ: mean 0.95 [") and "(n=4)" in text and "p=0.125" in text
    d = result.to_dict()
    assert d["difference"]["estimate"] == pytest.approx(0.95) and d["n"] == 4 and d["wilcoxon_p"] == pytest.approx(0.125)


# ---------------------------------------------------------------------- nulls
def test_empirical_p_hand_counts_with_ties_and_the_plus_one():
    null = [1.0, 2.0, 2.0, 3.0, 5.0]
    assert empirical_p(2.0, null) == pytest.approx(5 / 6)  # {2, 2, 3, 5} >= 2: (1 + 4) / (1 + 5)
    assert empirical_p(2.0, null, alternative="less") == pytest.approx(4 / 6)  # {1, 2, 2} <= 2
    assert empirical_p(2.0, null, alternative="two-sided") == 1.0  # min(1, 2 * 4/6)
    assert empirical_p(6.0, null) == pytest.approx(1 / 6)  # never 0: the observed value counts once
    assert empirical_p(6.0, null, alternative="two-sided") == pytest.approx(2 / 6)
    assert empirical_p(0.0, null, alternative="less") == pytest.approx(1 / 6)


def test_empirical_p_is_uniform_under_a_continuous_null():
    # observed and N = 19 null draws exchangeable and continuous: (N + 1) p is uniform on {1..20}.
    # 4000 repeats, 200 expected per value; chi-square goodness of fit must not reject at 0.001.
    rng = np.random.default_rng(2024)
    draws = rng.normal(size=(4000, 20))
    ranks = np.array([round(20 * empirical_p(row[0], row[1:])) for row in draws])
    counts = np.bincount(ranks, minlength=21)
    assert counts[0] == 0 and counts.sum() == 4000
    assert ss.chisquare(counts[1:]).pvalue > 1e-3, counts


def test_empirical_p_is_super_uniform_with_ties():
    # discrete null (values 0..3): P(p <= alpha) <= alpha at every attainable alpha, for each side.
    # Each frequency of 4000 repeats has sd <= sqrt(alpha (1 - alpha) / 4000); band 3.29 sd.
    rng = np.random.default_rng(7)
    draws = rng.binomial(3, 0.4, size=(4000, 10)).astype(float)
    for alternative in ("greater", "less", "two-sided"):
        p = np.array([empirical_p(row[0], row[1:], alternative=alternative) for row in draws])
        for alpha in np.unique(p):
            assert np.mean(p <= alpha) <= alpha + _binomial_band(min(alpha, 0.5), 4000), (alternative, alpha)


def test_null_z():
    assert null_z(3.0, [1.0, 2.0, 3.0]) == pytest.approx(1.0)  # (3 - 2) / 1
    assert null_z(1.0, [0.0, 0.0]) == math.inf and null_z(-1.0, [0.0, 0.0]) == -math.inf
    assert math.isnan(null_z(0.0, [0.0, 0.0]))


def test_stouffer():
    z, p = stouffer([1.5] * 4)
    assert z == pytest.approx(1.5 * 2.0, rel=1e-15) and p == pytest.approx(ss.norm.sf(3.0), rel=1e-12)
    assert stouffer([1.0, 2.0], [3.0, 4.0])[0] == pytest.approx((3 + 8) / 5.0, rel=1e-15)
    assert stouffer([1.0, 2.0], [2.0, 2.0])[0] == pytest.approx(stouffer([1.0, 2.0])[0], rel=1e-15)  # scale-free
    assert stouffer([1.0, 5.0], [1.0, 0.0])[0] == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        stouffer([1.0, 2.0], [1.0, -1.0])


def test_holm_hand_example_monotone_and_capped():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.02 0.03 0.06 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    assert holm([0.5, 0.6]).tolist() == [1.0, 1.0]
    p = np.random.default_rng(0).uniform(size=50) ** 3
    adjusted = holm(p)
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0) and np.all(adjusted >= p) and np.all(adjusted <= 1.0)
    assert holm([0.2]).tolist() == [0.2]


# ---------------------------------------------------------------------- survival
# Group A: times 1, 3, 4+, 6 (+ = censored); group B: 2, 3+, 5, 7, 8+. The censored B unit at t = 3
# is still at risk at 3. At each event time (n_A, n_B, n, d; E_A += d n_A/n; V += d n_A n_B (n-d)/(n^2 (n-1))):
#   t=1: 4 5 9 1 (A)   E 4/9   V 20/81
#   t=2: 3 5 8 1 (B)   E 3/8   V 15/64
#   t=3: 3 4 7 1 (A)   E 3/7   V 12/49
#   t=5: 1 3 4 1 (B)   E 1/4   V 3/16
#   t=6: 1 2 3 1 (A)   E 1/3   V 2/9
#   t=7: 0 2 2 1 (B)   E 0     V 0
# O_A = 3, E_A = 923/504 = 1.8313, V = 1.1359, chi2 = (O_A - E_A)^2 / V = 1.2023 (1 df), p = 0.2728.
TIMES_A, EVENTS_A = [1, 3, 4, 6], [1, 1, 0, 1]
TIMES_B, EVENTS_B = [2, 3, 5, 7, 8], [1, 0, 1, 1, 0]


def _censored(times, events):
    return ss.CensoredData.right_censored(np.asarray(times, float), np.asarray(events) == 0)


def test_logrank_matches_the_hand_table_and_scipy():
    result = logrank(TIMES_A, EVENTS_A, TIMES_B, EVENTS_B)
    expected_a = Fraction(4, 9) + Fraction(3, 8) + Fraction(3, 7) + Fraction(1, 4) + Fraction(1, 3)
    variance = Fraction(20, 81) + Fraction(15, 64) + Fraction(12, 49) + Fraction(3, 16) + Fraction(2, 9)
    chi2 = (3 - expected_a) ** 2 / variance
    assert isinstance(result, LogRankResult) and result.n == (4, 5) and result.observed == (3.0, 3.0)
    assert result.expected == pytest.approx((float(expected_a), 6 - float(expected_a)), rel=1e-13)
    assert result.statistic == pytest.approx(float(chi2), rel=1e-13)
    assert result.p_value == pytest.approx(ss.chi2.sf(float(chi2), 1), rel=1e-12)
    if hasattr(ss, "logrank"):  # scipy >= 1.11 reports the signed z; z^2 is the chi-square
        reference = ss.logrank(_censored(TIMES_A, EVENTS_A), _censored(TIMES_B, EVENTS_B))
        assert result.statistic == pytest.approx(reference.statistic**2, rel=1e-12)
        assert result.p_value == pytest.approx(reference.pvalue, rel=1e-12)


def test_logrank_with_tied_events():
    # A: 2, 2, 3; B: 2, 4+. t=2: n=5, n_A=3, d=3 (two in A): E 9/5, V 3 (3/5)(2/5)(2/4) = 0.36;
    # t=3: n=2, n_A=1, d=1: E 1/2, V 1/4. O_A = 3, E_A = 2.3, V = 0.61, chi2 = 0.49 / 0.61.
    result = logrank([2, 2, 3], [1, 1, 1], [2, 4], [1, 0])
    assert result.expected == pytest.approx((2.3, 1.7), rel=1e-13)
    assert result.statistic == pytest.approx(0.49 / 0.61, rel=1e-13)
    if hasattr(ss, "logrank"):
        reference = ss.logrank(_censored([2, 2, 3], [1, 1, 1]), _censored([2, 4], [1, 0]))
        assert result.statistic == pytest.approx(reference.statistic**2, rel=1e-12)
    swapped = logrank([2, 4], [1, 0], [2, 2, 3], [1, 1, 1])
    assert swapped.statistic == pytest.approx(result.statistic, rel=1e-13) and swapped.observed == (1.0, 3.0)
    nothing = logrank([1, 2], [0, 0], [3], [0])
    assert math.isnan(nothing.statistic) and math.isnan(nothing.p_value) and nothing.expected == (0.0, 0.0)


def test_kaplan_meier_hand_values():
    # A: t=1 at risk 4 -> 3/4; t=3 at risk 3 -> 3/4 * 2/3 = 1/2; t=4 censored; t=6 at risk 1 -> 0
    t, s = kaplan_meier(TIMES_A, EVENTS_A)
    assert t.tolist() == [1.0, 3.0, 6.0] and s == pytest.approx([0.75, 0.5, 0.0], abs=1e-15)
    # B: t=2 at risk 5 -> 4/5; t=5 at risk 3 -> 8/15; t=7 at risk 2 -> 4/15
    t, s = kaplan_meier(TIMES_B, EVENTS_B)
    assert t.tolist() == [2.0, 5.0, 7.0] and s == pytest.approx([0.8, 8 / 15, 4 / 15], rel=1e-14)
    if hasattr(ss, "ecdf"):
        assert s == pytest.approx(ss.ecdf(_censored(TIMES_B, EVENTS_B)).sf.evaluate(t), rel=1e-12)
    t, s = kaplan_meier([5.0, 6.0], [0, 0])
    assert t.size == 0 and s.size == 0


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: mean_ci([]), "at least 2"),
        (lambda: mean_ci([1.0]), "at least 2"),
        (lambda: mean_ci([1.0, math.nan]), "NaN"),
        (lambda: mean_ci([[1.0, 2.0]]), "one-dimensional"),
        (lambda: mean_ci([1.0, 2.0], level=95), "strictly between"),
        (lambda: mean_ci([1.0, 2.0], method="basic"), "bca"),
        (lambda: bootstrap_ci([1.0, 2.0], method="t"), "percentile"),
        (lambda: bootstrap_ci([1.0, 2.0], n_boot=0), "n_boot"),
        (lambda: paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0]), "same length"),
        (lambda: empirical_p(1.0, []), "at least 1"),
        (lambda: empirical_p(math.nan, [1.0]), "finite"),
        (lambda: empirical_p(1.0, [1.0], alternative="both"), "two-sided"),
        (lambda: null_z(1.0, [1.0]), "at least 2"),
        (lambda: stouffer([1.0, math.inf]), "NaN or infinite"),
        (lambda: stouffer([1.0, 2.0], [1.0]), "same length"),
        (lambda: holm([0.1, 1.2]), r"\[0, 1\]"),
        (lambda: logrank([1, 2], [1, 2], [1], [1]), "0 \\(censored\\)"),
        (lambda: logrank([1, 2], [1], [1], [1]), "same length"),
        (lambda: kaplan_meier([], []), "at least 1"),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_numeric_input_raises_type_error():
    with pytest.raises(TypeError, match="sequence of numbers"):
        mean_ci(["a", "b"])
