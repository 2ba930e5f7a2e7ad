"""The pure part of the proxy benchmark: the order targets are loaded in
(interleaved rounds), the median per target over its rounds, and the report
(``results.json``, ``results.md`` and, when matplotlib is at hand,
``proxy.png``). No processes are started here except the chart's renderer."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PEERS = Path(__file__).resolve().parent / "peers"
PEERS_PYTHON = Path(__file__).resolve().parent / ".peers-venv" / "bin" / "python"
PLOT_SCRIPT = PEERS / "plot_report.py"


def interleave(targets: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, target) in load order: every target once per round, in the
    same order each round, so drift over the run hits all targets alike."""
    return [(r, t) for r in range(1, rounds + 1) for t in targets]


@dataclass(frozen=True)
class Round:
    """One measured load of one target."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    requests: int
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """A target's figures: the median of each figure over its rounds; the
    errors are summed over every round (warm-ups included)."""

    target: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    requests: int
    non_2xx_3xx: int
    socket_errors: dict[str, int]
    rounds: list[Round]

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())


def _median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def median_row(target: str, rounds: Sequence[Round], warmups: Sequence[Round] = ()) -> Row:
    if not rounds:
        raise ValueError(f"{target}: no rounds")
    sockets: dict[str, int] = {}
    for r in (*rounds, *warmups):
        for kind, n in r.socket_errors.items():
            sockets[kind] = sockets.get(kind, 0) + n
    return Row(
        target=target,
        requests_per_second=_median([r.requests_per_second for r in rounds]),
        p50_ms=_median([r.p50_ms for r in rounds]),
        p99_ms=_median([r.p99_ms for r in rounds]),
        cpu_us_per_request=_median([r.cpu_us_per_request for r in rounds]),
        requests=sum(r.requests for r in rounds),
        non_2xx_3xx=sum(r.non_2xx_3xx for r in (*rounds, *warmups)),
        socket_errors=sockets,
        rounds=list(rounds),
    )


def _num(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def markdown(rows: Sequence[Row], meta: dict[str, object]) -> str:
    """A Markdown table of the rows, with the run's command, date and load."""
    lines = [
        "| target | req/s | p50 | p99 | CPU per request | errors |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        errors = "none"
        if row.errors:
            parts = [f"{row.non_2xx_3xx} non-2xx/3xx"] if row.non_2xx_3xx else []
            parts += [f"{n} socket {kind}" for kind, n in row.socket_errors.items()]
            errors = "**" + ", ".join(parts) + "**"
        lines.append(
            f"| {row.target} | {_num(row.requests_per_second)} | {_num(row.p50_ms, 2)} ms "
            f"| {_num(row.p99_ms, 2)} ms | {_num(row.cpu_us_per_request)} µs | {errors} |"
        )
    notes = [""]
    for key in ("command", "date", "machine", "load", "rounds"):
        if key in meta:
            notes.append(f"- {key}: {meta[key]}")
    if meta.get("flagged"):
        notes.append("- **FLAGGED**: errors during the run; not a valid measurement")
    return "\n".join(lines + notes) + "\n"


def _matplotlib_python() -> str | None:
    """An interpreter with matplotlib: this one (``triogate[bench]``) or the
    peers' venv (benchmarks/setup.sh)."""
    if importlib.util.find_spec("matplotlib") is not None:
        return sys.executable
    if PEERS_PYTHON.exists():
        return str(PEERS_PYTHON)
    return None


def write_report(
    directory: Path, rows: Sequence[Row], meta: dict[str, object], *, chart: bool = True
) -> list[str]:
    """Write results.json, results.md and (if matplotlib is at hand) proxy.png
    into directory; returns what it wrote or could not write, one line each."""
    directory.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "results": [asdict(row) for row in rows]}
    json_path = directory / "results.json"
    json_path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    md_path = directory / "results.md"
    md_path.write_text(markdown(rows, meta))
    done = [f"wrote {json_path}", f"wrote {md_path}"]
    if not chart:
        return done
    png = directory / "proxy.png"
    python = _matplotlib_python()
    if python is None or not PLOT_SCRIPT.exists():
        done.append(
            "NO CHART: matplotlib is not installed (run 'bash benchmarks/setup.sh' for the "
            "peers' venv, or pip install 'triogate[bench]'); results.json and results.md "
            "are written"
        )
        return done
    plotted = subprocess.run(
        [python, str(PLOT_SCRIPT), str(json_path), str(png)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if plotted.returncode != 0:
        tail = (plotted.stderr.strip().splitlines() or ["?"])[-1]
        done.append(f"NO CHART: {PLOT_SCRIPT.name} failed with {python}: {tail}")
    else:
        done.append(f"wrote {png}")
    return done
