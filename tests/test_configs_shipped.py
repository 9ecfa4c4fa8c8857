"""Every config shipped under configs/ parses and validates against the schema of its kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from evo2_cli.config import build_config, read_yaml
from evo2_cli.schemas import infer_kind, schema_for

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("**/*.yaml"))


def test_configs_exist():
    assert CONFIGS, "no configs found under configs/"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: str(path.relative_to(path.parents[2])))
def test_shipped_config_validates(path):
    raw, lines = read_yaml(path)
    kind = infer_kind(raw, path)
    build_config(schema_for(kind), raw, name=str(path), lines=lines)


def test_the_infer_example_is_an_infer_config():
    infer_configs = [path for path in CONFIGS if path.parent.name == "infer"]
    assert infer_configs
    for path in infer_configs:
        assert infer_kind(read_yaml(path)[0], path) == "infer"
