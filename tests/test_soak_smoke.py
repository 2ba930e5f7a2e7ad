"""The soak benchmark (benchmarks/soak.py): its sans-IO rules on synthetic
input, and a short real run through ``triogate serve`` that must complete
with a verdict and samples."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

from triogate.benchmarks.soak_verdict import (
    UPSTREAM,
    Kind,
    Outcome,
    detect_growth,
    judge,
    percentile,
)

RSS = {"abs_tolerance": 5.0, "rel_tolerance": 0.05}


# --- growth detection ----------------------------------------------------------


def test_flat_series_is_not_growing() -> None:
    growth = detect_growth([60.0] * 40, **RSS)
    assert growth.judged
    assert not growth.growing
    assert growth.baseline == growth.latest == 60.0


def test_steady_growth_is_flagged() -> None:
    # A leak of 0.5 MB per sample: 120 samples, the thirds' medians 20 MB apart.
    growth = detect_growth([50.0 + 0.5 * i for i in range(120)], **RSS)
    assert growth.judged
    assert growth.growing
    assert growth.latest > growth.baseline + growth.allowed


def test_noisy_flat_series_is_not_growing() -> None:
    rng = random.Random(7)
    series = []
    for _ in range(120):
        value = 60.0 + rng.uniform(-2.0, 2.0)  # jitter
        if rng.random() < 0.15:
            value += rng.uniform(10.0, 30.0)  # spikes: a GC pause, a burst of connections
        series.append(value)
    series[-1] = 200.0  # even a huge last sample is one sample
    growth = detect_growth(series, **RSS)
    assert growth.judged
    assert not growth.growing


def test_noisy_slow_leak_is_flagged() -> None:
    rng = random.Random(11)
    series = [60.0 + 0.25 * i + rng.uniform(-3.0, 3.0) for i in range(120)]
    assert detect_growth(series, **RSS).growing


def test_growth_during_the_warm_up_then_flat_is_not_flagged() -> None:
    # Caches and the allocator's arenas fill up at first, then stay.
    series = [40.0 + 2.0 * i for i in range(10)] + [60.0] * 30
    assert not detect_growth(series, **RSS).growing


def test_a_leak_that_stopped_is_not_flagged() -> None:
    # Grew through the first half of the judged samples, flat since: it does
    # not *keep* growing.
    series = [50.0] * 10 + [50.0 + i for i in range(15)] + [65.0] * 15
    assert not detect_growth(series, **RSS).growing


def test_fd_growth_with_a_small_absolute_tolerance() -> None:
    flat = [48.0, 52.0, 50.0, 49.0, 55.0, 50.0] * 6  # connections come and go
    assert not detect_growth(flat, abs_tolerance=8, rel_tolerance=0.1).growing
    leaking = [50.0 + i for i in range(60)]  # one fd per sample
    assert detect_growth(leaking, abs_tolerance=8, rel_tolerance=0.1).growing


def test_too_few_samples_are_not_judged() -> None:
    growth = detect_growth([1.0, 100.0, 1000.0, 10000.0], **RSS)
    assert not growth.judged
    assert not growth.growing
    assert math.isnan(growth.baseline)
    assert "not judged" in growth.describe("MB")


# --- classifying answers -------------------------------------------------------


def test_gateway_made_5xx_fail_unless_the_upstream_caused_them() -> None:
    # The slow route's timeout is exceeded on purpose: its 504 is expected.
    assert judge(Kind.TOO_SLOW, 504, "UPSTREAM_TIMEOUT", from_upstream=False) is (
        Outcome.EXPECTED_504
    )
    assert judge(Kind.SLOW, 504, "UPSTREAM_TIMEOUT", from_upstream=False) is Outcome.EXPECTED_504
    # The upstream's own 5xx pass through.
    assert judge(Kind.UPSTREAM_ERROR, 503, None, from_upstream=True) is Outcome.UPSTREAM_5XX
    # Anything else the gateway makes with a 5xx is a failure.
    assert judge(Kind.OK, 504, "UPSTREAM_TIMEOUT", from_upstream=False) is Outcome.GATEWAY_5XX
    assert judge(Kind.OK, 500, "INTERNAL_ERROR", from_upstream=False) is Outcome.GATEWAY_5XX
    assert judge(Kind.UPSTREAM_ERROR, 502, "BAD_GATEWAY", from_upstream=False) is (
        Outcome.GATEWAY_5XX
    )
    assert judge(Kind.INVALID, 503, None, from_upstream=False) is Outcome.GATEWAY_5XX
    # An upstream 5xx where the upstream was not asked for one is wrong.
    assert judge(Kind.OK, 500, None, from_upstream=True) is Outcome.WRONG


def test_each_kind_gets_only_its_answers() -> None:
    assert judge(Kind.OK, 200, None, from_upstream=True) is Outcome.OK
    assert judge(Kind.OK, 401, "INVALID_KEY", from_upstream=False) is Outcome.WRONG
    assert judge(Kind.INVALID, 401, "INVALID_KEY", from_upstream=False) is Outcome.REFUSED
    assert judge(Kind.INVALID, 200, None, from_upstream=True) is Outcome.WRONG
    assert judge(Kind.RATE, 429, "RATE_LIMITED", from_upstream=False) is Outcome.LIMITED
    assert judge(Kind.RATE, 429, "QUOTA_EXCEEDED", from_upstream=False) is Outcome.WRONG
    assert judge(Kind.CREDITS, 429, "QUOTA_EXCEEDED", from_upstream=False) is Outcome.LIMITED
    assert judge(Kind.NO_ROUTE, 404, "ROUTE_NOT_FOUND", from_upstream=False) is Outcome.REFUSED
    assert judge(Kind.TOO_SLOW, 200, None, from_upstream=True) is Outcome.WRONG
    # A 200 that did not come from the upstream is not a grant.
    assert judge(Kind.OK, 200, None, from_upstream=False) is Outcome.WRONG


def test_revocation_timing_decides_what_a_doomed_key_gets() -> None:
    revoked = (401, "KEY_REVOKED")
    assert judge(Kind.DOOMED, *revoked, from_upstream=False, revoked=True) is Outcome.REFUSED
    assert judge(Kind.DOOMED, 200, None, from_upstream=True, revoked=True) is Outcome.WRONG
    assert judge(Kind.DOOMED, 200, None, from_upstream=True, revoked=False) is Outcome.OK
    assert judge(Kind.DOOMED, *revoked, from_upstream=False, revoked=False) is Outcome.WRONG
    # Overlapping the revocation, either answer is right.
    assert judge(Kind.DOOMED, 200, None, from_upstream=True, revoked=None) is Outcome.OK
    assert judge(Kind.DOOMED, *revoked, from_upstream=False, revoked=None) is Outcome.REFUSED
    assert UPSTREAM  # the marker code of the upstream's answers


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert math.isnan(percentile([], 0.5))


# --- a short real run ----------------------------------------------------------------


def test_short_soak_passes_with_samples(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "triogate.benchmarks", "soak", "--seconds", "20"]
    argv += ["--sample-seconds", "1", "--reload-seconds", "6", "--revoke-seconds", "4"]
    argv += ["--concurrency", "8", "--json"]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=180, cwd=tmp_path, check=False
    )
    assert done.stdout.strip(), done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "pass", (report["reasons"], report["examples"], done.stderr)
    assert done.returncode == 0
    assert len(report["samples"]) == 20
    assert all(s["requests"] > 0 and s["fds"] > 0 for s in report["samples"])
    assert report["growth"]["anon_mb"]["judged"] and report["growth"]["fds"]["judged"]
    # Every kind of traffic was exercised: limits hit, keys revoked, the
    # upstream failing and slow, config reloaded both ways.
    outcomes = report["outcomes"]
    for outcome in ("ok", "refused", "limited", "upstream_5xx", "expected_504"):
        assert outcomes[outcome] > 0, outcome
    assert outcomes["gateway_5xx"] == outcomes["wrong"] == report["no_answer"] == 0
    answers = report["answers"]
    assert answers["rate_limited"].get("429 RATE_LIMITED", 0) > 0
    assert answers["credits"].get("429 QUOTA_EXCEEDED", 0) > 0
    assert answers["revoked"].get("401 KEY_REVOKED", 0) > 0
    assert report["keys_revoked_mid_run"] >= 3
    assert sorted(set(report["reloads"])) == ["POST /config/reload", "SIGHUP"]
    assert report["server_exit_status"] == 0
