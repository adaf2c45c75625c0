"""benchmarks/ab.py: what it reads from a run's results and how it pairs the rounds of both sides."""

from __future__ import annotations

import pytest

from benchmarks.ab import _metrics, compare, markdown


def _result(ms: float, vmamba: float) -> dict:
    ok = {"runtime": "torch:cpu_kernel", "precision": "fp32", "status": "ok",
          "latency": [{"batch": 8, "median_ms": 10 * ms}, {"batch": 1, "median_ms": ms}],
          "stages": {"ms": {"vmamba_teacher": vmamba}}}
    skipped = {"runtime": "torch:triton", "precision": "fp32", "status": "skipped", "latency": []}
    fp16 = {**ok, "precision": "fp16", "latency": [{"batch": 1, "median_ms": 1.0}]}
    return {"runtimes": [ok, skipped, fp16]}


def test_metrics_take_fp32_smallest_batch_and_stages():
    assert _metrics(_result(100.0, 40.0)) == {"torch:cpu_kernel ms": 100.0,
                                              "torch:cpu_kernel vmamba_teacher ms": 40.0}


def test_compare_is_the_median_of_per_round_ratios():
    rounds = [{"before": _metrics(_result(b, 40.0)), "after": _metrics(_result(a, 20.0))}
              for b, a in ((100.0, 90.0), (200.0, 100.0), (100.0, 110.0))]
    rows = {r["metric"]: r for r in compare(rounds)}
    row = rows["torch:cpu_kernel ms"]
    assert row["before_ms"] == 100.0 and row["after_ms"] == 100.0
    # Ratios per round 0.9, 0.5, 1.1: the median is 0.9, not the 1.0 of the medians' ratio.
    assert row["ratio_median"] == pytest.approx(0.9)
    assert (row["ratio_min"], row["ratio_max"]) == pytest.approx((0.5, 1.1))
    assert rows["torch:cpu_kernel vmamba_teacher ms"]["ratio_median"] == pytest.approx(0.5)
    text = markdown({"rounds": 3, "command": "c", "commits": {"before": "a", "after": "b"}, "run_args": [],
                     "seconds": 1.0, "rows": compare(rounds)})
    assert "| torch:cpu_kernel ms | 100.0 | 100.0 | 0.900 | 0.500–1.100 |" in text


def test_compare_keeps_only_metrics_of_every_round_and_side():
    rounds = [{"before": {"x ms": 1.0, "y ms": 2.0}, "after": {"x ms": 2.0}}]
    assert [r["metric"] for r in compare(rounds)] == ["x ms"]
