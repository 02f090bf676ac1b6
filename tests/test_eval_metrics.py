"""pass@k, confidence intervals and percentiles against values computed by hand."""

from __future__ import annotations

import math

import pytest

from moecoder.evals.metrics import bootstrap_mean_ci, pass_at_k, percentile, sample_score, summarize, wilson_ci


@pytest.mark.parametrize(
    "n,c,k,want",
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (10, 3, 1, 3 / 10),  # pass@1 is the fraction correct
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5) = 1 - 21/252
        (4, 1, 3, 1 - 1 / 4),  # 1 - C(3,3)/C(4,3) = 1 - 1/4
        (6, 5, 2, 1.0),  # n - c = 1 < k: every 2-subset holds a correct sample
        (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),
    ],
)
def test_pass_at_k_matches_the_binomial_formula(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(3, 4, 1), (3, 1, 4), (3, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_wilson_interval_by_hand():
    # 2 of 5, z = 1.96: centre = (0.4 + z^2/10) / (1 + z^2/5) = 0.78415/1.76829 = 0.44345,
    # half = z*sqrt(0.4*0.6/5 + z^2/100) / 1.76829 = 0.32583 -> (0.1176, 0.7693)
    lo, hi = wilson_ci(2, 5)
    assert lo == pytest.approx(0.11762, abs=1e-4) and hi == pytest.approx(0.76929, abs=1e-4)
    # 3 of 5 is the mirror image
    lo3, hi3 = wilson_ci(3, 5)
    assert lo3 == pytest.approx(1 - hi, abs=1e-12) and hi3 == pytest.approx(1 - lo, abs=1e-12)
    # 0 of 10: lower bound 0, upper z^2/(n+z^2) = 3.8415/13.8415 = 0.27753
    assert wilson_ci(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-4))
    assert wilson_ci(0, 0) == (0.0, 1.0)


def test_bootstrap_interval_is_seeded_and_sensible():
    vals = [0.0, 0.25, 0.5, 1.0, 1.0, 0.75, 0.0, 1.0]
    a, b = bootstrap_mean_ci(vals), bootstrap_mean_ci(vals)
    assert a == b  # reproducible report
    mean = sum(vals) / len(vals)
    assert a[0] < mean < a[1]
    # roughly the normal interval mean +- 1.96 * sd / sqrt(n) for this sample
    sd = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * sd / len(vals) ** 0.5, rel=0.2)
    assert bootstrap_mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_percentiles_interpolate_linearly():
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 95) == pytest.approx(3 + 0.85)  # rank 0.95 * 3 = 2.85
    assert percentile([], 50) is None


def rec(task, status, passed=0, total=0, syntax=True, out=10, cost=0.01, latency=1.0):
    return {"task_id": task, "status": status, "checks_passed": passed, "checks_total": total, "syntax_ok": syntax,
            "output_tokens": out, "input_tokens": 5, "cost_usd": cost, "latency_s": latency, "ttft_s": None}


def test_summary_pass_at_k_over_tasks_and_infra_left_out():
    rs = [rec("a", "pass", 2, 2), rec("a", "fail", 1, 2), rec("a", "pass", 2, 2),
          rec("b", "fail", 0, 2), rec("b", "fail", 1, 2), rec("b", "infra", syntax=False, out=0, cost=0.0)]
    s = summarize(rs, ks=(1, 2))
    assert s["scored"] == 5 and s["status_counts"] == {"fail": 3, "infra": 1, "pass": 2}
    assert s["pass@1"] == pytest.approx((2 / 3 + 0 / 2) / 2)
    assert s["pass@2"] == pytest.approx(((1 - 0 / 3) + 0) / 2)  # a: C(1,2)=0 -> 1; b: 0
    assert s["logical_correctness"] == pytest.approx((1 + 0.5 + 1 + 0 + 0.5) / 5)
    assert s["cost_usd"] == pytest.approx(0.05) and s["solved_tasks"] == 1
    assert s["usd_per_1m_output_tokens"] == pytest.approx(0.05 / 50 * 1e6)
    assert s["latency_p50_s"] == 1.0  # the infra sample has no latency entry here either


def test_sample_score_without_checks_is_pass_or_fail():
    assert sample_score(rec("a", "pass")) == 1.0 and sample_score(rec("a", "syntax")) == 0.0
