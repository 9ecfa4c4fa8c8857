"""What a diagnosis writes, one module per output, all read from one model of its findings (findings.py):

    report.json       jsonfile.py: verdict, config, model, per-variant explosion (step, layer, parameter,
                      why), summaries and the main per-step series (non-finite numbers written as the
                      strings "nan", "inf", "-inf")
    steps.csv         csvfiles.py: one row per variant and step: loss, lr, total and per-block-type gradient
                      norms, largest update ratio, non-finite counts, hcl pole summary, largest activation
    parameters.csv    one row per variant, step and parameter: layer, block type, kind, gradient norm,
                      parameter norm, update-to-parameter ratio, non-finite gradient / parameter entries
    activations.csv   one row per variant, step and watched module: max |x|, rms, non-finite entries
    hcl.csv           one row per variant, step and hcl layer: max lambda, fraction of modes with lambda >= 0,
                      max |h[t]|
    grad_norms.svg    chart.py: gradient norm per block type over steps, log scale, one panel per variant
    hcl_lambda.svg    max lambda of each hcl layer over steps, with the fp32 overflow line 88.72 / (L - 1)
    report.html       html.py: all of the above in one file, the same charts inline
    (terminal)        terminal.py: the summary tables

The post-hoc review of a run writes its own outputs (diagnose/posthoc_report.py) into the same kind of
directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from evo2_cli.diagnose.report.chart import variant_charts, write_svg
from evo2_cli.diagnose.report.csvfiles import write_csvs
from evo2_cli.diagnose.report.findings import Findings
from evo2_cli.diagnose.report.html import html_report
from evo2_cli.diagnose.report.jsonfile import HEADER, report_data, write_json
from evo2_cli.errors import InputError
from evo2_cli.fsio import atomic_output_dir, check_replaceable, directory_kind, json_listing

REPORT_FILES = ("report.json", "steps.csv", "parameters.csv", "activations.csv", "hcl.csv", "report.html")
REVIEW_FILES = ("report.json", "steps.csv", "checkpoints.csv", "report.html")
CHART_FILES = ("grad_norms.svg", "hcl_lambda.svg", "grad_norm.svg")
OLD_CHART_FILES = ("grad_norms.png", "hcl_lambda.png", "grad_norm.png")  # earlier versions: still replaceable
# What `--overwrite` may replace: a directory of our report.json and the files a report holds, nothing else.
REPORT_DIR = directory_kind(
    "a diagnose-grads report directory",
    "report.json",
    json_listing(
        "report.json",
        lambda data: data.get("tool") == HEADER["tool"],
        {*REPORT_FILES, *REVIEW_FILES, *CHART_FILES, *OLD_CHART_FILES},
    ),
)


def check_output_dir(directory: Path, overwrite: bool) -> None:
    """Refuse an output that may not be replaced before any training rather than after it."""
    directory = Path(directory)
    check_replaceable(directory, REPORT_DIR, overwrite)
    parent = directory.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(
            f"{directory}: cannot be created under {parent} (not a writable directory); choose another "
            "(-o / diagnose.output_dir)"
        )


def write_report(found: Findings, directory: Path, overwrite: bool = False) -> list[str]:
    """Write every output into `directory` atomically; returns the file names written."""
    with atomic_output_dir(Path(directory), REPORT_DIR, overwrite=overwrite) as tmp:
        write_json(tmp / "report.json", report_data(found))
        write_csvs(found, tmp)
        (tmp / "report.html").write_text(html_report(found), encoding="utf-8")
        charts = variant_charts(found)
        for name, drawn in charts.items():
            write_svg(tmp / name, drawn)
    return [*REPORT_FILES, *charts]
