"""The proxy benchmark's pure parts: interleaving order, the median per
target, and the report writer. Never runs wrk, nginx or the peers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from triogate.benchmarks import proxy_report
from triogate.benchmarks.proxy_report import Round, interleave, median_row, write_report


def test_interleave_visits_every_target_once_per_round_in_order() -> None:
    order = interleave(["a", "b", "c"], 2)
    assert order == [(1, "a"), (1, "b"), (1, "c"), (2, "a"), (2, "b"), (2, "c")]
    assert interleave(["a"], 1) == [(1, "a")]


def test_median_per_figure_and_errors_summed() -> None:
    rounds = [
        Round(100.0, 1.0, 9.0, 50.0, 300),
        Round(300.0, 3.0, 5.0, 30.0, 900, non_2xx_3xx=2),
        Round(200.0, 2.0, 7.0, math.nan, 600, socket_errors={"read": 1}),
    ]
    warm = [Round(math.nan, math.nan, math.nan, math.nan, 10, socket_errors={"read": 3})]
    row = median_row("t", rounds, warm)
    assert row.requests_per_second == 200.0
    assert row.p50_ms == 2.0
    assert row.p99_ms == 7.0
    assert row.cpu_us_per_request == 40.0  # NaN rounds are left out
    assert row.requests == 1800
    assert row.non_2xx_3xx == 2
    assert row.socket_errors == {"read": 4}
    assert row.errors == 6


def test_median_of_two_rounds_is_their_mean() -> None:
    row = median_row("t", [Round(100.0, 1.0, 2.0, 10.0, 1), Round(200.0, 3.0, 4.0, 20.0, 1)])
    assert (row.requests_per_second, row.p50_ms, row.cpu_us_per_request) == (150.0, 2.0, 15.0)


def test_median_row_needs_a_round() -> None:
    with pytest.raises(ValueError):
        median_row("t", [])


def _rows() -> list[proxy_report.Row]:
    return [
        median_row("nginx as proxy", [Round(27104.0, 0.88, 4.88, 15.0, 81312)]),
        median_row(
            "triogate, no plugins",
            [Round(10002.0, 3.01, 25.84, 74.4, 30006, non_2xx_3xx=3)],
        ),
    ]


META: dict[str, object] = {
    "command": "python -m benchmarks proxy --rounds 1",
    "date": "2026-12-03 10:14 UTC",
    "load": "1-min load average 2.25 before, 2.73 after",
    "connections": 32,
    "flagged": True,
}


def test_report_writes_json_and_markdown(tmp_path: Path) -> None:
    done = write_report(tmp_path / "out", _rows(), META, chart=False)
    assert done == [f"wrote {tmp_path / 'out' / name}" for name in ("results.json", "results.md")]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["meta"] == META
    assert [r["target"] for r in data["results"]] == ["nginx as proxy", "triogate, no plugins"]
    assert data["results"][1]["requests_per_second"] == 10002.0
    assert data["results"][1]["rounds"][0]["non_2xx_3xx"] == 3
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| nginx as proxy | 27,104 | 0.88 ms | 4.88 ms | 15 µs | none |" in md
    row = "| triogate, no plugins | 10,002 | 3.01 ms | 25.84 ms | 74 µs | **3 non-2xx/3xx** |"
    assert row in md
    assert "- command: python -m benchmarks proxy --rounds 1" in md
    assert "FLAGGED" in md


def test_report_without_matplotlib_says_so_and_still_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy_report, "_matplotlib_python", lambda: None)
    done = write_report(tmp_path, _rows(), META)
    assert any(line.startswith("NO CHART: matplotlib is not installed") for line in done)
    assert (tmp_path / "results.json").exists()
    assert (tmp_path / "results.md").exists()
    assert not (tmp_path / "proxy.png").exists()
