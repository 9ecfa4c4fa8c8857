"""Conformance with the official Evo 2 inference engine (Vortex), and the Vortex layout on other configs.

`tests/fixtures/vortex_tiny/` was produced by running Vortex (vtx 1.1.0) on CPU in fp32 (see MANIFEST.json).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings

import pytest
import torch
from conftest import VORTEX_TINY
from torch.testing import assert_close

from evo2_cli.errors import InputError
from evo2_cli.model import StripedHyena, load_vortex, preset_config
from evo2_cli.model.model import modal_poles
from evo2_cli.model.vortex import (
    export_vortex,
    modal_from_poles,
    read_vortex_checkpoint,
    vortex_state_dict,
)

CONFIG = VORTEX_TINY / "tiny_config.yml"
WEIGHTS = VORTEX_TINY / "state_dict_checkpoint_layout.pt"


def _load(name: str):
    return torch.load(VORTEX_TINY / name, weights_only=True)


def test_fixture_is_intact():
    manifest = json.loads((VORTEX_TINY / "MANIFEST.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((VORTEX_TINY / name).read_bytes()).hexdigest() == digest, name


@pytest.fixture(scope="module", params=["modal", "vortex"])
def tiny(request):
    return load_vortex(CONFIG, WEIGHTS, hcl_form=request.param).eval()


def test_logits_match_vortex(tiny):
    with torch.no_grad():
        logits = tiny(_load("input_ids.pt"))
    expected = _load("logits_fp32.pt")
    assert logits.shape == (2, 300, 512) and logits.dtype == torch.float32
    assert_close(logits, expected, atol=1e-4, rtol=0)


def test_hcl_filters_match_vortex(tiny):
    filters = tiny.hcl_filters(300)
    expected = _load("hcl_filters.pt")
    assert sorted(filters) == [2, 6]
    for layer, h in filters.items():
        assert_close(h, expected[f"layer_{layer}"], atol=1e-5, rtol=0)


def test_greedy_cached_generation_matches_vortex(tiny):
    reference = _load("generation_greedy.pt")
    ids, step_logits = tiny.generate_greedy(reference["prompt_ids"], 32)
    assert torch.equal(ids, reference["generated_ids"])
    assert_close(step_logits, reference["step_logits"], atol=1e-4, rtol=0)


def test_export_reproduces_the_file_bit_for_bit(tiny):
    original = read_vortex_checkpoint(WEIGHTS)
    exported = vortex_state_dict(tiny)
    assert list(exported) == list(original) or set(exported) == set(original)
    for key, value in original.items():
        assert torch.equal(exported[key], value), key


def test_every_negative_fp32_pole_maps_to_the_modal_form_exactly():
    # exp over fp32 p does not reach every fp32 lambda (15 of the fixture's 1024 poles need gamma != 0).
    # Checked on every float of a binade slice, every float next to powers of two, log-uniform random poles.
    dense = torch.arange(2**17, dtype=torch.int32) + torch.tensor(1.5).view(torch.int32)
    edges = torch.tensor([2.0**e for e in range(-24, 10)]).view(torch.int32)[:, None] + torch.arange(-20, 20)
    torch.manual_seed(0)
    spread = torch.exp(torch.empty(4096).uniform_(-25.0, 8.0))
    for magnitude in (dense.view(torch.float32) * 2.0**-9, edges.view(torch.float32), spread):
        lam = -magnitude.reshape(-1, 16)
        p, gamma = modal_from_poles(lam)
        assert torch.equal(modal_poles(p, gamma), lam)
        # exp(gamma) only mends the last ulps: |gamma| within a few ulps of p
        assert (gamma.abs() <= 3 * 2.0**-23 * p.abs().clamp(min=1)).all()


# ---------------------------------------------------------------- other configs in the same schema


OTHER_CONFIGS = [
    # width, heads, hcs/hcm groups, layout, rotary base, scaling, state size, length (not powers of two)
    dict(hidden_size=48, num_attention_heads=3, hcs_filter_groups=12, hcm_filter_groups=6, layout="SDH*H"),
    dict(hidden_size=32, num_attention_heads=2, hcs_filter_groups=32, hcm_filter_groups=1, layout="*HDS*"),
    dict(hidden_size=40, num_attention_heads=5, hcs_filter_groups=8, hcm_filter_groups=40, layout="HSD*SDH*"),
    dict(hidden_size=24, num_attention_heads=2, layout="SDH*", rotary_emb_base=1e6, state_size=5),
    dict(hidden_size=16, num_attention_heads=2, layout="D*H", rotary_scaling_factor=4.0),
]


@pytest.mark.parametrize("overrides", OTHER_CONFIGS, ids=lambda o: o["layout"])
@pytest.mark.parametrize("form", ["modal", "vortex"])
def test_random_model_survives_vortex_round_trip(tmp_path, overrides, form):
    base = {"hcs_filter_groups": 4, "hcm_filter_groups": 4, "inner_mlp_size": 40, "state_size": 16}
    config = preset_config("test", **{**base, **overrides, "hcl_form": form})
    torch.manual_seed(0)
    model = StripedHyena(config).eval()
    with torch.no_grad():  # make every parameter matter (the init leaves hcm taps near zero); poles stay < 0
        for name, p in model.named_parameters():
            if not name.endswith(("log_poles", ".p", ".gamma")):
                p.add_(0.05 * torch.randn_like(p))
    weights, yml = tmp_path / "w.pt", tmp_path / "c.yml"
    export_vortex(model, weights, yml)
    assert "hcl_form" not in yml.read_text()  # the release schema has no such key
    loaded = load_vortex(yml, weights, hcl_form=form).eval()
    ids = torch.randint(0, 512, (2, 77))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))  # every tensor, and so every pole, comes back exactly


def test_bf16_release_style_file_loads_with_fp32_poles(tmp_path):
    torch.manual_seed(1)
    model = StripedHyena(preset_config("test")).eval()
    weights, yml = tmp_path / "w.pt", tmp_path / "c.yml"
    export_vortex(model, weights, yml, dtype=torch.bfloat16)
    stored = read_vortex_checkpoint(weights)
    assert stored["blocks.0.projections.weight"].dtype == torch.bfloat16
    assert stored["blocks.2.filter.log_poles"].dtype == torch.float32
    assert stored["blocks.2.filter.residues"].dtype == torch.float32
    loaded = load_vortex(yml, weights)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.blocks[0].projections.weight, stored["blocks.0.projections.weight"].float())
    assert torch.equal(loaded.blocks[2].filter.poles(), model.blocks[2].filter.poles())


def test_fp8_extra_state_keys_are_ignored(tmp_path):
    tensors = read_vortex_checkpoint(WEIGHTS)
    tensors["blocks.0.projections._extra_state"] = torch.zeros(3, dtype=torch.uint8)
    path = tmp_path / "fp8.pt"
    torch.save(tensors, path)
    with torch.no_grad():
        ids = _load("input_ids.pt")[:, :50]
        assert_close(load_vortex(CONFIG, path)(ids), _load("logits_fp32.pt")[:, :50], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- release shapes on the meta device


def _vortex_template(config) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a release checkpoint, written from DESIGN.md section 5 independently of our code."""
    d, inner, v, s = config.hidden_size, config.inner_mlp_size, config.vocab_size, config.state_size
    out = {"embedding_layer.weight": (v, d), "norm.scale": (d,)}
    for i, letter in enumerate(config.layout):
        b = f"blocks.{i}."
        out |= {b + "pre_norm.scale": (d,), b + "post_norm.scale": (d,)}
        out |= {
            b + "mlp.l1.weight": (inner, d),
            b + "mlp.l2.weight": (inner, d),
            b + "mlp.l3.weight": (d, inner),
        }
        if letter == "*":
            out |= {
                b + "inner_mha_cls.Wqkv.weight": (3 * d, d),
                b + "inner_mha_cls.out_proj.weight": (d, d),
                b + "inner_mha_cls.out_proj.bias": (d,),
                b + "inner_mha_cls.rotary_emb.inv_freq": (config.head_dim // 2,),
            }
            continue
        out |= {
            b + "projections.weight": (3 * d, d),
            b + "filter.short_filter_weight": (3 * d, 1, 3),
            b + "out_filter_dense.weight": (d, d),
            b + "out_filter_dense.bias": (d,),
        }
        if letter == "S":
            out[b + "filter.h"] = (config.hcs_filter_groups, 1, 7)
        elif letter == "D":
            out |= {b + "filter.h": (config.hcm_filter_groups, 1, 128), b + "filter.D": (d,)}
        else:
            out |= {b + "filter.log_poles": (d, s, 1), b + "filter.residues": (d, s), b + "filter.D": (d,)}
    return out


@pytest.mark.parametrize(
    "preset, params, entries, inv_freq",
    [
        ("evo2-1b", 1_107_989_760, 269, 4),
        ("evo2-7b", 6_481_059_584, 344, 5),
        ("evo2-40b", None, None, 8),
    ],
)
def test_release_presets_export_exact_vortex_keys_and_shapes(preset, params, entries, inv_freq):
    config = preset_config(preset)
    with torch.device("meta"):
        model = StripedHyena(config)
    exported = vortex_state_dict(model)
    shapes = {k: tuple(v.shape) for k, v in exported.items()}
    assert shapes == _vortex_template(config)
    assert sum(k.endswith("inv_freq") for k in exported) == inv_freq
    counted = sum(math.prod(s) for k, s in shapes.items() if not k.endswith("inv_freq"))
    if params is not None:
        assert len(exported) == entries
        assert counted == params
    else:  # 40b: 50 blocks, 8 of them attention, 14 hcs / 14 hcm / 14 hcl
        assert len(exported) == 2 + 14 * 10 + 14 * 11 + 14 * 12 + 8 * 9
        assert counted == 40_331_142_144


def test_loading_release_yaml_with_unknown_math_is_refused(tmp_path):
    bad = tmp_path / "flip.yml"
    bad.write_text(CONFIG.read_text().replace("hyena_flip_x1x2: False", "hyena_flip_x1x2: True"))
    with pytest.raises(InputError, match=r"flip\.yml:\d+: config key 'hyena_flip_x1x2'"):
        load_vortex(bad, WEIGHTS)


def test_no_warnings_on_the_clean_path():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_vortex(CONFIG, WEIGHTS)


# ---------------------------------------------------------------- the official engine itself (optional)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", OTHER_CONFIGS, ids=lambda o: o["layout"])
def test_vtx_engine_agrees_on_other_configs(tmp_path, overrides, vtx_logits):
    base = {"hcs_filter_groups": 4, "hcm_filter_groups": 4, "inner_mlp_size": 40, "state_size": 16}
    torch.manual_seed(0)
    model = StripedHyena(preset_config("test", **{**base, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith((".p", ".gamma")):
                p.add_(0.05 * torch.randn_like(p))
    export_vortex(model, tmp_path / "w.pt", tmp_path / "c.yml")
    ids = torch.randint(0, 512, (2, 77))
    with torch.no_grad():
        ours = model(ids)
    assert_close(vtx_logits(tmp_path / "c.yml", tmp_path / "w.pt", ids), ours, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_fixture_on_cuda_fp32_bf16_and_cached():
    model = load_vortex(CONFIG, WEIGHTS).eval().cuda()
    ids = _load("input_ids.pt").cuda()
    expected = _load("logits_fp32.pt")
    with torch.no_grad():
        assert_close(model(ids).cpu(), expected, atol=1e-3, rtol=0)  # TF32 matmuls may be on
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(ids).float().cpu()
    assert (bf16.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    reference = _load("generation_greedy.pt")
    generated, _ = model.generate_greedy(reference["prompt_ids"].cuda(), 32)
    assert torch.equal(generated.cpu(), reference["generated_ids"])
    exported = vortex_state_dict(model)  # poles computed on the CPU: the file comes back bit for bit
    for key, value in read_vortex_checkpoint(WEIGHTS).items():
        assert torch.equal(exported[key].cpu(), value), key
