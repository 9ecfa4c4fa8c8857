"""The CLI surface: help, version, config commands, exit codes."""

from __future__ import annotations

import io
import subprocess
import sys

from typer.testing import CliRunner

from evo2_cli import __version__
from evo2_cli.cli import app

runner = CliRunner()


def test_help_and_version():
    result = runner.invoke(app, ["-h"])
    assert result.exit_code == 0 and "config" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_python_dash_m():
    out = subprocess.run(
        [sys.executable, "-m", "evo2_cli", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in out.stdout


def test_config_error_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nosuchsection:\n  x: 1\n")
    result = runner.invoke(app, ["config", "validate", str(bad)])
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "Traceback" not in result.output


def test_doctor_reports_versions_and_passes_the_self_test():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "self-test cpu" in result.output


def test_self_test_catches_a_broken_decoder(monkeypatch):
    from evo2_cli import doctor
    from evo2_cli.model import StripedHyena

    real_step = StripedHyena.step
    monkeypatch.setattr(StripedHyena, "step", lambda self, ids, cache: real_step(self, ids, cache) + 1e-3)
    check = doctor.self_test("cpu")
    assert not check.ok and "1.0e-03" in check.detail


def test_help_paragraphs_are_reflowed_to_the_terminal():
    from evo2_cli.cli import COMMANDS, _load_command

    for name in COMMANDS:
        command = _load_command(name)
        for each in [command, *getattr(command, "commands", {}).values()]:
            for paragraph in (each.help or "").split("\n\n"):
                assert "\n" not in paragraph, (name, each.name)


def test_a_device_that_cannot_run_the_self_test_is_a_failed_check(monkeypatch):
    from evo2_cli import doctor

    def broken(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(doctor, "self_test", broken)
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "RuntimeError: CUDA error" in result.output and "FAIL" in result.output


def test_root_help_lists_the_exit_codes(monkeypatch):
    import typer.rich_utils

    # Help is drawn in panels at the terminal's width (COLUMNS when piped): pin a width it fits in.
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 200)
    result = runner.invoke(app, ["-h"])
    assert result.exit_code == 0 and "Exit codes: 0 ok, 1 failure, 2 bad input" in result.output


def test_flags_reach_the_config_as_values_of_their_own_type():
    from pathlib import Path

    from evo2_cli.commands.common import comma_list, resolve_config
    from evo2_cli.data.preprocess.config import PreprocessJob

    assert comma_list("vortex, 1e-3,2") == ["vortex", 0.001, 2] and comma_list(None) is None
    flags = {
        "preprocess.output_dir": ("--output", Path("2024")),
        "preprocess.inputs": ("INPUTS", ["yes"]),
        "preprocess.seed": ("--seed", None),
    }
    cfg = resolve_config(PreprocessJob, None, None, flags).preprocess
    assert str(cfg.output_dir) == "2024" and cfg.inputs == ["yes"]  # not the number 2024 or True


def test_a_bad_flag_value_is_reported_under_the_flag_given_its_name():
    import pytest

    from evo2_cli.commands.common import resolve_config
    from evo2_cli.data.preprocess.config import PreprocessJob
    from evo2_cli.errors import ConfigError

    flags = {"preprocess.inputs": ("INPUTS", ["a.fa"]), "preprocess.split": ("--split", [0.5, "a"])}
    with pytest.raises(ConfigError) as info:
        resolve_config(PreprocessJob, None, None, flags)
    expected = "--split: config key 'preprocess.split': expected a list of 3 items, got [0.5, 'a']"
    assert str(info.value) == expected
    with pytest.raises(ConfigError) as info:  # the same value through --set is reported as a --set
        resolve_config(PreprocessJob, None, ["preprocess.inputs=[a.fa]", "preprocess.split=[0.5, a]"])
    assert info.value.where == "--set preprocess.split"


def test_doctor_judges_bf16_per_device(monkeypatch):
    from types import SimpleNamespace

    import torch

    from evo2_cli import doctor

    cards = [SimpleNamespace(name="A100", total_memory=80 * 2**30, major=8, minor=0)]
    cards.append(SimpleNamespace(name="V100", total_memory=32 * 2**30, major=7, minor=0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: cards[index])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # asks device 0
    details = {check.name: check.detail for check in doctor.environment_checks()}
    assert details["cuda:0"] == "A100, 80 GiB, compute 8.0, bf16"
    assert details["cuda:1"] == "V100, 32 GiB, compute 7.0, no bf16: train with fp32"


def test_a_device_that_cannot_be_queried_is_a_failed_check(monkeypatch):
    import torch

    from evo2_cli import doctor

    def broken(index):
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    checks = {check.name: check for check in doctor.environment_checks()}
    assert not checks["cuda:0"].ok and checks["cuda:0"].required
    assert checks["cuda:0"].detail == "RuntimeError: CUDA error: no CUDA-capable device is detected"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_wraps_only_in_a_terminal(monkeypatch):
    """A log or a pipe gets whole lines whatever COLUMNS says; a terminal gets lines cut at its width."""
    from evo2_cli.console import make_console

    monkeypatch.setenv("COLUMNS", "40")
    message = "error: " + "/a-long-directory" * 12 + "/missing: model not found"
    console = make_console()
    console.file = io.StringIO()
    console.print(message, highlight=False)
    assert console.file.getvalue() == message + "\n"
    console.file = _Terminal()
    console.print(message, highlight=False)
    lines = console.file.getvalue().splitlines()
    assert len(lines) > 1 and max(len(line) for line in lines) <= 40


def test_an_error_naming_a_long_path_stays_on_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    missing = tmp_path / ("d" * 150) / "missing"
    result = runner.invoke(app, ["convert", "to-vortex", str(missing), "--out", str(tmp_path / "o.pt")])
    assert result.exit_code == 2
    assert f"error: {missing}: model not found" in result.output.splitlines()[0]
