"""What machine a figure came from, and CPU pinning."""

from __future__ import annotations

import os
import platform
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pin(core: int | None) -> str:
    """Pin this process to one core (Linux); returns a description."""
    if core is None or not hasattr(os, "sched_setaffinity"):
        return "not pinned"
    os.sched_setaffinity(0, {core})
    return f"pinned to core {core}"


def describe(pinning: str) -> str:
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} cores; "
        f"Python {sys.version.split()[0]} on {platform.system()} {platform.release()}; {pinning}"
    )
