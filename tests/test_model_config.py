"""ModelConfig: presets, layouts, the Evo 2 release schema, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VORTEX_TINY
from typer.testing import CliRunner

from evo2_cli.cli import app
from evo2_cli.config import build_config
from evo2_cli.errors import ConfigError
from evo2_cli.model import PRESETS, ModelConfig, StripedHyena, load_model_config, preset_config

ROOT = Path(__file__).resolve().parents[1]
RELEASE = VORTEX_TINY / "tiny_config.yml"
runner = CliRunner()


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build(name):
    config = preset_config(name)
    assert config.preset == name and config.num_layers == len(config.layout)
    with torch.device("meta"):
        StripedHyena(config)


def test_evo2_40b_preset_is_the_8k_base_release():
    """The published `evo2-40b-8k.yml` (model_name shc-evo2-40b-8k-11T-v2, Evo2 name `evo2_40b_base`), key by
    key. The 1M-context `evo2-40b-1m.yml` is another shape (inner 22,528, rotary base 1e11, 128x
    interpolation) and must be loaded from its own YAML."""
    release = preset_config("evo2-40b").to_release_dict()
    assert {key: release[key] for key in RELEASE_40B_8K} == RELEASE_40B_8K


RELEASE_40B_8K = {
    "vocab_size": 512,
    "hidden_size": 8192,
    "num_layers": 50,
    "num_attention_heads": 64,
    "inner_mlp_size": 21888,
    "rotary_emb_base": 1e6,
    "state_size": 16,
    "short_filter_length": 3,
    "hcs_filter_length": 7,
    "hcm_filter_length": 128,
    "hcs_filter_groups": 512,
    "hcm_filter_groups": 512,
    "hcl_filter_groups": 8192,
    "attn_layer_idxs": [3, 10, 17, 24, 31, 35, 42, 49],
    "hcs_layer_idxs": [0, 4, 7, 11, 14, 18, 21, 25, 28, 32, 36, 39, 43, 46],
    "hcm_layer_idxs": [1, 5, 8, 12, 15, 19, 22, 26, 29, 33, 37, 40, 44, 47],
    "hcl_layer_idxs": [2, 6, 9, 13, 16, 20, 23, 27, 30, 34, 38, 41, 45, 48],
    "tie_embeddings": True,
    "evo2_style_activations": True,
    "mlp_activation": "gelu",
}


def test_test_preset_is_tiny_and_small_has_every_kind():
    assert 1_000 < StripedHyena(preset_config("test")).num_parameters() < 10_000
    small = preset_config("small")
    assert {small.kind(i) for i in range(small.num_layers)} == {"hcs", "hcm", "hcl", "attn"}


def test_layout_forms_agree():
    lists = {"hcs": [0, 4, 7], "hcm": [1, 5], "hcl": [2, 6], "attn": [3]}
    assert build_config(ModelConfig, {"layout": lists}).layout == "SDH*SDHS"
    assert build_config(ModelConfig, {"layout": "SDH* SDHS"}).layout == "SDH*SDHS"


def test_release_yaml_loads_as_it_is():
    config = load_model_config(RELEASE)
    assert (config.hidden_size, config.layout, config.num_attention_heads) == (64, "SDH*SDHS", 4)
    assert (config.hcs_filter_groups, config.hcm_filter_groups, config.inner_mlp_size) == (16, 16, 176)
    assert config.hcl_form == "modal"


def test_release_rotary_interpolation_is_read(tmp_path):
    path = tmp_path / "c.yml"
    text = RELEASE.read_text() + "use_interpolated_rotary_pos_emb: True\nrotary_emb_scaling_factor: 128\n"
    path.write_text(text)
    assert load_model_config(path).rotary_scaling_factor == 128.0


def _error(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_config(ModelConfig, raw, name="m.yaml")
    return info.value


@pytest.mark.parametrize(
    "raw, key, words",
    [
        ({"layout": {"hcs": [0, 1], "hcl": [1, 2]}}, "layout.hcl", "layer 1"),
        ({"layout": {"hcs": [0], "hcl": [2]}}, "layout", "[1]"),
        ({"layout": {"hcx": [0]}}, "layout.hcx", "did you mean 'hcs'"),
        ({"layout": "SDQ*"}, "layout", "'Q'"),
        ({"layout": "SDH*", "num_layers": 5}, "num_layers", "4 layers"),
        ({"hidden_size": 96, "num_attention_heads": 5}, "num_attention_heads", "does not divide"),
        ({"hidden_size": 96, "hcs_filter_groups": 7}, "hcs_filter_groups", "does not divide"),
        ({"hidden_size": 96, "hcm_filter_groups": 64}, "hcm_filter_groups", "does not divide"),
        ({"preset": "evo2-1c"}, "preset", "did you mean 'evo2-1b'"),
        ({"tie_embeddings": False}, "tie_embeddings", "tied"),
        ({"hcl_form": "complex"}, "hcl_form", "'modal'"),
        ({"hidden_sise": 64}, "hidden_sise", "did you mean 'hidden_size'"),
        ({"hyena_flip_x1x2": True}, "hyena_flip_x1x2", "only False"),
        ({"interleave": False}, "interleave", "only True"),
        ({"hidden_size": 64, "num_filters": 32, "num_attention_heads": 4}, "num_filters", "hidden_size"),
        ({"hidden_size": 64, "layout": "SDH*", "attn_layer_idxs": [3]}, "layout", "not both"),
    ],
)
def test_bad_configs_name_the_key(raw, key, words):
    error = _error(raw)
    assert error.key == key
    assert words in str(error)


def test_unknown_release_key_is_an_error_with_file_and_line(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(RELEASE.read_text() + "use_quantum_hyena: True\n")
    with pytest.raises(ConfigError, match=r"c\.yml:\d+: config key 'use_quantum_hyena': unknown key"):
        load_model_config(path)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "model").glob("*.y*ml")), ids=lambda p: p.name)
def test_shipped_model_configs_validate(path):
    assert isinstance(load_model_config(path), ModelConfig)
    result = runner.invoke(app, ["config", "validate", "--kind", "model", str(path)])
    assert result.exit_code == 0, result.output


def test_cli_bad_model_config_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: 100\n  num_attention_heads: 3\n")
    result = runner.invoke(app, ["config", "validate", "--kind", "model", str(path)])
    assert result.exit_code == 2
    assert "bad.yaml:3" in result.output and "num_attention_heads" in result.output
    assert "Traceback" not in result.output


def test_cli_presets_table():
    result = runner.invoke(app, ["config", "presets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in PRESETS:
        assert name in result.output
    assert "1,108,204,800" in result.output  # evo2-1b in our (modal) parameterization
