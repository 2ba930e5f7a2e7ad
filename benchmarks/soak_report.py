"""The soak benchmark's bookkeeping and output: per-window counts, the
samples, the table, the summary and the verdict (benchmarks/soak.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .machine import describe
from .soak_http import Answer
from .soak_verdict import UPSTREAM, Growth, Kind, Outcome, detect_growth, percentile

if TYPE_CHECKING:
    from .soak import Settings

__all__ = ["Report", "Sample", "Window", "print_header", "print_row", "print_summary", "verdict"]

# Private memory (MB) and fds may move this much between the second and the
# last third of the run (the larger of the absolute and relative figure).
RSS_TOLERANCE_MB = 5.0
RSS_TOLERANCE = 0.05
FD_TOLERANCE = 8.0
FD_TOLERANCE_REL = 0.10
MAX_EXAMPLES = 20
_SLOW = frozenset({Kind.SLOW, Kind.TOO_SLOW})
_FAILED = frozenset({Outcome.GATEWAY_5XX, Outcome.WRONG})
_LOG_ERROR = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) ", re.M)


@dataclass
class Window:
    """What the workers saw between two samples."""

    outcomes: Counter[Outcome] = field(default_factory=Counter)
    answers: Counter[tuple[str, int, str]] = field(default_factory=Counter)  # kind, status, code
    latencies: list[float] = field(default_factory=list)  # seconds, the slow route left out
    errors: int = 0  # no answer: connection failures and hangs
    examples: list[str] = field(default_factory=list)

    def add(
        self,
        kind: Kind,
        outcome: Outcome,
        answer: Answer,
        code: str | None,
        elapsed: float,
        what: str,
    ) -> None:
        self.outcomes[outcome] += 1
        self.answers[
            (kind.value, answer.status, UPSTREAM if answer.from_upstream else code or "")
        ] += 1
        if kind not in _SLOW:
            self.latencies.append(elapsed)
        if outcome in _FAILED and len(self.examples) < MAX_EXAMPLES:
            body = answer.body[:200].decode("utf-8", "replace")
            self.examples.append(f"{outcome.value}: {kind.value} {what} -> {answer.status} {body}")

    def transport_error(self, kind: Kind, what: str) -> None:
        self.errors += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"no answer: {kind.value} {what}")


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the load began
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    rss_mb: float
    anon_mb: float
    fds: int
    ok: int
    refused: int
    limited: int
    upstream_5xx: int
    expected_504: int
    gateway_5xx: int
    wrong: int
    errors: int


@dataclass
class Report:
    settings: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    start: tuple[float, float, int] = (math.nan, math.nan, 0)  # rss, anon, fds before the load
    outcomes: Counter[Outcome] = field(default_factory=Counter)
    answers: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    examples: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # found during the run (reloads)
    reloads: list[str] = field(default_factory=list)
    revoked: int = 0
    created: int = 0
    seconds: float = 0.0
    upstream_answered: int = 0
    exit_status: int | None = None
    stopped: bool = False
    server_log: str = ""
    data_mb: float = math.nan
    began: float = 0.0

    def add_window(
        self, t: float, w: Window, rss: float, anon: float, fds: int, seconds: float
    ) -> Sample:
        self.outcomes.update(w.outcomes)
        self.answers.update(w.answers)
        self.latencies.extend(w.latencies)
        self.errors += w.errors
        self.examples.extend(w.examples[: MAX_EXAMPLES - len(self.examples)])
        lat = sorted(w.latencies)
        o = w.outcomes
        sample = Sample(
            t=round(t, 3),
            requests=o.total() + w.errors,
            rps=(o.total() + w.errors) / seconds,
            p50_ms=percentile(lat, 0.50) * 1e3,
            p99_ms=percentile(lat, 0.99) * 1e3,
            rss_mb=rss,
            anon_mb=anon,
            fds=fds,
            ok=o[Outcome.OK],
            refused=o[Outcome.REFUSED],
            limited=o[Outcome.LIMITED],
            upstream_5xx=o[Outcome.UPSTREAM_5XX],
            expected_504=o[Outcome.EXPECTED_504],
            gateway_5xx=o[Outcome.GATEWAY_5XX],
            wrong=o[Outcome.WRONG],
            errors=w.errors,
        )
        self.samples.append(sample)
        return sample

    def growth(self) -> dict[str, Growth]:
        return {
            "anon_mb": detect_growth(
                [s.anon_mb for s in self.samples],
                abs_tolerance=RSS_TOLERANCE_MB,
                rel_tolerance=RSS_TOLERANCE,
            ),
            "fds": detect_growth(
                [float(s.fds) for s in self.samples],
                abs_tolerance=FD_TOLERANCE,
                rel_tolerance=FD_TOLERANCE_REL,
            ),
        }


def verdict(report: Report) -> list[str]:
    """Why the run failed; empty when it passed."""
    reasons = list(report.failures)
    growth = report.growth()
    if growth["anon_mb"].growing:
        reasons.append(
            "private memory (RssAnon) keeps growing: " + growth["anon_mb"].describe("MB")
        )
    if growth["fds"].growing:
        reasons.append("open fds keep growing: " + growth["fds"].describe("fds", 0))
    if not growth["anon_mb"].judged:
        reasons.append("too few samples to judge growth")
    o = report.outcomes
    if o[Outcome.GATEWAY_5XX]:
        reasons.append(f"{o[Outcome.GATEWAY_5XX]} gateway-made 5xx that the upstream did not cause")
    if o[Outcome.WRONG]:
        reasons.append(f"{o[Outcome.WRONG]} answers other than their request kind must get")
    if report.errors:
        reasons.append(f"{report.errors} requests got no answer (connection failed or hung)")
    tracebacks = report.server_log.count("Traceback (most recent call last)")
    if tracebacks:
        reasons.append(f"the server logged {tracebacks} traceback(s)")
    if not report.stopped or report.exit_status != 0:
        status = "killed" if report.exit_status is None else f"status {report.exit_status}"
        reasons.append(f"the server did not stop cleanly on SIGTERM ({status})")
    return reasons


_COLUMNS = (
    f"{'t s':>6} {'req':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'RSS MB':>7} "
    f"{'anon MB':>7} {'fds':>5} {'2xx':>6} {'4xx':>6} {'429':>6} {'up5xx':>6} {'504':>5} "
    f"{'gw5xx':>5} {'wrong':>5} {'noans':>5}"
)


def print_header(settings: Settings) -> None:
    print("benchmark: soak, mixed traffic through a real triogate serve (real LMDB)")
    print(describe("not pinned"))
    print(
        f"load: {settings.concurrency} keep-alive client connections for {settings.seconds:.0f} s; "
        f"a sample every {settings.sample_seconds:g} s, a reload every "
        f"{settings.reload_seconds:g} s, a revocation every {settings.revoke_seconds:g} s"
    )
    print(
        "columns: latency over the window's answers (the slow route left out); RSS includes "
        "LMDB's mapped pages, anon (RssAnon) is the process's own memory; up5xx: the upstream's "
        "deliberate 5xx passed through; 504: the slow route over its timeout (expected); "
        "gw5xx, wrong, noans: failures"
    )
    print(_COLUMNS, flush=True)


def print_row(s: Sample) -> None:
    print(
        f"{s.t:>6.0f} {s.requests:>7} {s.rps:>7.0f} {s.p50_ms:>7.2f} {s.p99_ms:>7.2f} "
        f"{s.rss_mb:>7.1f} {s.anon_mb:>7.1f} {s.fds:>5} {s.ok:>6} {s.refused:>6} {s.limited:>6} "
        f"{s.upstream_5xx:>6} {s.expected_504:>5} {s.gateway_5xx:>5} {s.wrong:>5} {s.errors:>5}",
        flush=True,
    )


def _answers(report: Report) -> dict[str, dict[str, int]]:
    """Per request kind: its answers as "STATUS CODE" -> count."""
    out: dict[str, dict[str, int]] = {}
    for (kind, status, code), n in sorted(report.answers.items()):
        label = f"{status} {'(upstream)' if code == UPSTREAM else code}".strip()
        out.setdefault(kind, {})[label] = n
    return out


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if _LOG_ERROR.match(line)]


def _finite(value: Any) -> Any:
    """NaN (a figure with nothing to compute it from) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def print_summary(report: Report) -> int:
    """Print the summary (or the JSON document); the exit status."""
    reasons = verdict(report)
    growth = report.growth()
    lat = sorted(report.latencies)
    total = report.outcomes.total() + report.errors
    summary: dict[str, Any] = {
        "verdict": "fail" if reasons else "pass",
        "reasons": reasons,
        "settings": report.settings,
        "seconds": round(report.seconds, 1),
        "requests": total,
        "rps": total / report.seconds if report.seconds else 0.0,
        "p50_ms": percentile(lat, 0.50) * 1e3,
        "p99_ms": percentile(lat, 0.99) * 1e3,
        "worst_window_p99_ms": max((s.p99_ms for s in report.samples), default=math.nan),
        "outcomes": {o.value: report.outcomes[o] for o in Outcome},
        "no_answer": report.errors,
        "answers": _answers(report),
        "reloads": report.reloads,
        "keys_created_mid_run": report.created,
        "keys_revoked_mid_run": report.revoked,
        "start": {"rss_mb": report.start[0], "anon_mb": report.start[1], "fds": report.start[2]},
        "growth": {name: dataclasses.asdict(g) for name, g in growth.items()},
        "data_file_mb": report.data_mb,
        "upstream_answered": report.upstream_answered,
        "server_exit_status": report.exit_status,
        "server_log_errors": len(_error_lines(report.server_log)),
        "examples": report.examples,
        "samples": [dataclasses.asdict(s) for s in report.samples],
    }
    if report.settings.get("json"):
        print(json.dumps(_finite(summary), indent=2, default=str))
        return 1 if reasons else 0
    o = report.outcomes
    first, last = (report.samples[0], report.samples[-1]) if report.samples else (None, None)
    print()
    print(
        f"requests: {total:,} in {report.seconds:.0f} s ({summary['rps']:,.0f}/s); latency p50 "
        f"{summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms over the run, worst window "
        f"p99 {summary['worst_window_p99_ms']:.2f} ms (the slow route left out)"
    )
    print(
        f"answers: {o[Outcome.OK]:,} granted, {o[Outcome.REFUSED]:,} refused (401/404), "
        f"{o[Outcome.LIMITED]:,} limited (429), {o[Outcome.UPSTREAM_5XX]:,} upstream 5xx passed "
        f"through, {o[Outcome.EXPECTED_504]:,} expected 504 (slow route); failures: "
        f"{o[Outcome.GATEWAY_5XX]} gateway 5xx, {o[Outcome.WRONG]} wrong, {report.errors} no answer"
    )
    for kind, answers in summary["answers"].items():
        print(f"  {kind:<15} " + ", ".join(f"{label}: {n:,}" for label, n in answers.items()))
    print(
        f"keys: {report.created} created and {report.revoked} revoked mid-run; reloads: "
        f"{len(report.reloads)} applied ({report.reloads.count('SIGHUP')} by SIGHUP)"
    )
    if first is not None and last is not None:
        print(
            f"RSS {report.start[0]:.1f} MB before the load, {first.rss_mb:.1f} -> "
            f"{last.rss_mb:.1f} MB (first to last sample; LMDB's data file: "
            f"{report.data_mb:.1f} MB)"
        )
    print("private memory (RssAnon): " + growth["anon_mb"].describe("MB"))
    print("open fds: " + growth["fds"].describe("fds", 0))
    errors = _error_lines(report.server_log)
    if errors:
        print(f"server log: {len(errors)} ERROR records, e.g.:")
        for line in errors[:5]:
            print("  " + line[:300])
    for example in report.examples:
        print("  example: " + example[:300])
    print(f"server stopped on SIGTERM with status {report.exit_status}")
    if reasons:
        print("verdict: FAIL")
        for reason in reasons:
            print("  - " + reason)
        return 1
    print("verdict: PASS")
    return 0
