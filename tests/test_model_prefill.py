"""Chunked prefill (exact long context) equals the one-shot forward: logits and every block's hidden state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from evo2_cli.model import StripedHyena, load_vortex, preset_config

FIXTURE = Path(__file__).parent / "fixtures" / "vortex_tiny"


def _random_model(seed: int = 0, **overrides) -> StripedHyena:
    """Every layer kind, twice; weights perturbed so no block is close to the identity."""
    settings = dict(
        hidden_size=16, layout="SDH*SDH*", num_attention_heads=2, hcs_filter_groups=4, hcm_filter_groups=8
    )
    torch.manual_seed(seed)
    model = StripedHyena(preset_config("test", **{**settings, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith((".p", ".gamma")):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model():
    return _random_model()


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def _chunked(model, ids, chunk_size):
    """Logits and every block's hidden state from prefill_chunks, concatenated."""
    layers = list(range(len(model.blocks)))
    cache = model.new_cache(ids.shape[0])
    outputs = list(model.prefill_chunks(ids, cache, chunk_size=chunk_size, return_hidden_layers=layers))
    assert cache.seqlen == ids.shape[1]
    assert [o[0].shape[1] for o in outputs] == [
        min(chunk_size, ids.shape[1] - s) for s in range(0, ids.shape[1], chunk_size)
    ]
    logits = torch.cat([o[0] for o in outputs], dim=1)
    return logits, {i: torch.cat([o[1][i] for o in outputs], dim=1) for i in layers}


def _assert_matches_forward(model, ids, chunk_size, atol=1e-4):
    with torch.no_grad():
        full, hidden = model(ids, return_hidden_layers=list(range(len(model.blocks))))
    logits, chunk_hidden = _chunked(model, ids, chunk_size)
    assert_close(logits, full, atol=atol, rtol=0)
    for i, h in hidden.items():
        assert_close(chunk_hidden[i], h, atol=atol, rtol=0, msg=lambda m, i=i: f"block {i}: {m}")


@pytest.mark.parametrize(("chunk_size", "length"), [(1, 150), (7, 300), (128, 1000), (4096, 9000)])
def test_chunked_prefill_equals_forward(model, chunk_size, length):
    _assert_matches_forward(model, _ids(2, length, seed=chunk_size), chunk_size)


@pytest.mark.parametrize("form", ["modal", "vortex"])
@pytest.mark.parametrize("chunk_size", [1, 7, 128])
def test_chunked_prefill_on_the_vortex_fixture(form, chunk_size):
    model = load_vortex(
        FIXTURE / "tiny_config.yml", FIXTURE / "state_dict_checkpoint_layout.pt", hcl_form=form
    )
    ids = torch.load(FIXTURE / "input_ids.pt", weights_only=True)  # (2, 300)
    _assert_matches_forward(model.eval(), ids, chunk_size)
