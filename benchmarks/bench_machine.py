"""The machine a benchmark ran on, for its JSON (one description for every script in benchmarks/)."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def describe() -> dict:
    """Date (UTC), CPU model, core count and Python version; torch scripts add torch's own figures."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
    }
