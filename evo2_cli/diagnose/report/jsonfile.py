"""report.json: the findings as JSON; non-finite numbers become the strings "nan", "inf" and "-inf"."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from evo2_cli import __version__
from evo2_cli.config import to_dict
from evo2_cli.diagnose.report.findings import Findings

# The first fields of both modes' report.json.
HEADER = {"tool": "evo2-cli", "version": __version__, "command": "diagnose-grads"}


def finite_or_text(value: Any) -> Any:
    """JSON-safe: non-finite floats become "nan", "inf" or "-inf"; containers are converted recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): finite_or_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_text(v) for v in value]
    return value


def report_data(found: Findings) -> dict[str, Any]:
    diagnosis = found.diagnosis
    return finite_or_text(
        {
            **HEADER,
            "healthy": diagnosis.healthy,
            "exploded": [v.name for v in found.variants if not v.result.healthy],
            "device": diagnosis.device,
            "source": diagnosis.source,
            "seq_len": diagnosis.seq_len,
            "overflow_lambda": found.overflow,
            "model": to_dict(diagnosis.model_config),
            "config": to_dict(diagnosis.job),
            "variants": [v.summary for v in found.variants],
        }
    )


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
