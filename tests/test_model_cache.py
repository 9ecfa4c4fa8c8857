"""Cached decoding equals the full forward for every prompt length, position by position."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import VORTEX_TINY
from torch.testing import assert_close

from evo2_cli.model import StripedHyena, load_vortex, preset_config

TOTAL = 80


@pytest.fixture(scope="module")
def model():
    # Every layer kind, twice; hcm has 128 taps so its FIR state (127) is longer than most prompts.
    config = preset_config(
        "test",
        hidden_size=16,
        layout="SDH*SDH*",
        num_attention_heads=2,
        hcs_filter_groups=4,
        hcm_filter_groups=8,
    )
    torch.manual_seed(0)
    m = StripedHyena(config).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith((".p", ".gamma")):
                p.add_(0.1 * torch.randn_like(p))
    return m


def _cached_logits(model, ids, prompt_len):
    cache = model.new_cache(ids.shape[0])
    logits = [model.prefill(ids[:, :prompt_len], cache)]
    for t in range(prompt_len, ids.shape[1]):
        logits.append(model.step(ids[:, t], cache).unsqueeze(1))
    assert cache.seqlen == ids.shape[1]
    return torch.cat(logits, dim=1)


random.seed(7)
PROMPTS = [1, 2, 3, 5, 6, 7, 64, *random.sample(range(8, TOTAL), 3)]


@pytest.mark.parametrize("prompt_len", PROMPTS)
def test_prefill_then_steps_equal_full_forward(model, prompt_len):
    ids = torch.randint(0, 512, (2, TOTAL), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        full = model(ids)
    assert_close(_cached_logits(model, ids, prompt_len), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt_len", [1, 2, 5, 7])
def test_short_prompts_on_the_vortex_fixture(prompt_len):
    """Vortex itself is wrong below 6 prompt tokens; ours must match the full forward from 1 token up."""
    model = load_vortex(
        VORTEX_TINY / "tiny_config.yml", VORTEX_TINY / "state_dict_checkpoint_layout.pt"
    ).eval()
    ids = torch.load(VORTEX_TINY / "input_ids.pt", weights_only=True)[:, :40]
    with torch.no_grad():
        full = model(ids)
    assert_close(_cached_logits(model, ids, prompt_len), full, atol=1e-4, rtol=0)


def test_rotary_variants_decode_exactly():
    config = preset_config("test", layout="*H*", rotary_emb_base=1e6, rotary_scaling_factor=8.0)
    torch.manual_seed(1)
    model = StripedHyena(config).eval()
    ids = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        assert_close(_cached_logits(model, ids, 4), model(ids), atol=1e-4, rtol=0)


def test_cache_misuse_is_a_clear_error(model):
    cache = model.new_cache(1)
    with pytest.raises(ValueError, match="prefill"):
        model.step(torch.tensor([65]), cache)
    with pytest.raises(ValueError, match=r"shape \(1, P>=1\)"):
        model.prefill(torch.tensor([[65], [67]]), cache)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        model.prefill(torch.tensor([[65, 67]]), cache, chunk_size=0)
