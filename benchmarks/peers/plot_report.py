"""Render the proxy benchmark's results.json as a PNG bar chart: req/s and CPU
per request per target, side by side. Run with an interpreter that has
matplotlib (the peers' venv, or the product's with ``triogate[bench]``).

    python plot_report.py results.json proxy.png
"""

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    source, out = sys.argv[1], sys.argv[2]
    with open(source) as f:
        data = json.load(f)
    rows = data["results"]
    names = [r["target"] for r in rows]
    rps = [r["requests_per_second"] for r in rows]
    cpu = [r["cpu_us_per_request"] for r in rows]
    colors = ["#4c72b0" if n.startswith("triogate") else "#a0a0a0" for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.55 * len(rows) + 1.8), sharey=True)
    y = list(range(len(rows)))
    left.barh(y, rps, color=colors)
    left.set_xscale("log")
    left.set_title("requests per second (log scale, higher is better)")
    right.barh(y, [0 if math.isnan(c) else c for c in cpu], color=colors)
    right.set_xscale("log")
    right.set_title("server CPU per request, µs (log scale, lower is better)")
    left.set_yticks(y, names)
    left.invert_yaxis()
    for axis, values, fmt in ((left, rps, "{:,.0f}"), (right, cpu, "{:,.0f} µs")):
        for i, v in enumerate(values):
            if not math.isnan(v) and v > 0:
                axis.text(v, i, " " + fmt.format(v), va="center", fontsize=8)
        axis.margins(x=0.25)
    meta = data.get("meta", {})
    fig.suptitle(
        f"triogate proxy benchmark, {meta.get('date', '')} "
        f"(wrk {meta.get('connections', '?')} connections, servers on one core)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
