"""The model file: fast paths against their references, init, activation rule, param groups, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.testing import assert_close

from evo2_cli.model import (
    StripedHyena,
    estimate_flops,
    flops_breakdown,
    optimizer_param_groups,
    preset_config,
)
from evo2_cli.model.model import (
    HyenaBlock,
    attention_reference,
    causal_convolution_direct,
    causal_convolution_fft,
    causal_cross_correlation,
    causal_cross_correlation_reference,
    modal_filter,
    modal_filter_reference,
    modal_state,
    modal_state_reference,
)

torch.manual_seed(0)


@pytest.mark.parametrize("length", [1, 2, 7, 50, 129, 300])
@pytest.mark.parametrize("taps", [3, 7])
def test_fir_matches_tap_loop(length, taps):
    u, w = torch.randn(2, 6, length), torch.randn(6, taps)
    assert_close(causal_cross_correlation(u, w), causal_cross_correlation_reference(u, w))


def test_grouped_fir_matches_channel_loop():
    """hcs: channel d uses filter d // (D / G); tap K-1 multiplies the current step."""
    config = preset_config("test", hidden_size=8, hcs_filter_groups=2)
    block = StripedHyena(config).blocks[0]
    assert isinstance(block, HyenaBlock) and block.kind == "hcs"
    h = block.filter.h  # (G, 1, 7)
    u = torch.randn(1, 8, 20)
    expected = torch.zeros_like(u)
    for d in range(8):
        taps = h[d // 4, 0]
        for t in range(20):
            for k in range(7):
                if t - 6 + k >= 0:
                    expected[0, d, t] += taps[k] * u[0, d, t - 6 + k]
    with torch.no_grad():
        assert_close(block.filter.inner(u), expected)


@pytest.mark.parametrize(
    "length, taps", [(1, 128), (5, 128), (127, 128), (300, 128), (257, 257), (1000, 1000)]
)
def test_fft_convolution_matches_direct(length, taps):
    u, h = torch.randn(2, 4, length), torch.randn(4, taps) / math.sqrt(taps)
    assert_close(causal_convolution_fft(u, h), causal_convolution_direct(u, h), atol=1e-5, rtol=1e-5)


def test_fft_convolution_stays_fp32_under_bf16_autocast():
    config = preset_config("test")
    model = StripedHyena(config)
    ids = torch.randint(0, 512, (1, 40))
    seen = []
    for block in model.blocks:
        if isinstance(block, HyenaBlock):
            block.filter.register_forward_hook(lambda m, i, out: seen.append(out[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert seen == [torch.float32] * 3
    with torch.no_grad():
        assert_close(logits.float(), model(ids), atol=0.1, rtol=0.1)


def _poles(d: int, s: int) -> Tensor:
    """Fast and slow modes, as in trained checkpoints (|lambda| from 1e-4 to 1)."""
    return -torch.logspace(-4, 0, d * s).reshape(d, s)[torch.randperm(d)]


@pytest.mark.parametrize("length", [1, 2, 3, 17, 300, 1000, 4097])
def test_modal_state_matches_recurrence(length):
    lam, u = _poles(6, 4), torch.randn(3, 6, length)
    expected = modal_state_reference(lam, u)
    assert_close(modal_state(lam, u), expected.float(), atol=2e-6 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("length", [1, 2, 3, 17, 300, 1000, 4097])
def test_factored_modal_filter_matches_formula(length):
    lam, r = _poles(8, 16), torch.randn(8, 16)
    h = modal_filter(lam, r, length)
    assert h.shape == (8, length)
    assert_close(h, modal_filter_reference(lam, r, length), atol=1e-5, rtol=1e-5)


def test_modal_filter_formula():
    lam, r = -torch.rand(3, 4), torch.randn(3, 4)
    h = modal_filter(lam, r, 9)
    assert_close(h[1, 5], (r[1] * torch.exp(lam[1] * 5)).sum())


@pytest.mark.parametrize("lq, lk", [(9, 9), (1, 9)])
def test_sdpa_matches_explicit_softmax(lq, lk):
    q, k, v = torch.randn(2, 3, lq, 8), torch.randn(2, 3, lk, 8), torch.randn(2, 3, lk, 8)
    fast = F.scaled_dot_product_attention(q, k, v, is_causal=lq > 1)
    assert_close(fast, attention_reference(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["modal", "vortex"])
def test_init_never_has_growing_poles(form):
    model = StripedHyena(preset_config("small", hcl_form=form))
    for block in model.blocks:
        if block.kind == "hcl":
            lam = block.filter.poles()
            assert (lam < 0).all()
            assert lam.min() >= -0.1 * math.exp(-1) - 1e-6 and lam.max() <= -0.01 * math.exp(-1) + 1e-6


def test_evo2_activation_rule_is_per_layer():
    evo2 = StripedHyena(preset_config("small"))
    assert [b.mlp.activation for b in evo2.blocks] == ["gelu"] + ["identity"] * 7
    plain = StripedHyena(preset_config("small", evo2_style_activations=False, mlp_activation="silu"))
    assert {b.mlp.activation for b in plain.blocks} == {"silu"}


def test_param_groups_cover_every_parameter_once():
    model = StripedHyena(preset_config("test"))
    decay, no_decay = optimizer_param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    all_names = {n for n, _ in model.named_parameters()}
    assert set(decay["names"]) | set(no_decay["names"]) == all_names
    assert not set(decay["names"]) & set(no_decay["names"])
    assert set(decay["names"]) == {n for n in all_names if n.endswith("weight") and ".filter." not in n} - {
        "embedding_layer.weight"
    }
    for name in (
        "blocks.2.filter.p",
        "blocks.2.filter.gamma",
        "blocks.1.filter.h",
        "blocks.0.pre_norm.scale",
    ):
        assert name in no_decay["names"]
    torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=1e-3)  # accepts the groups as they are


def test_flops_golden_numbers():
    config = preset_config("small")
    parts = flops_breakdown(config, 1024)
    linear = 8 * (3 * 128 * 352 + 4 * 128 * 128) + 128 * 512
    assert parts["matmul"] == 2 * linear * 1024
    assert parts["attention"] == 2 * 2 * 128 * 1024 * 1024
    # conv, by hand: featurizer (3 taps over 3D channels) and the x1*v, x2 gates in 6 hyena layers; hcs 7
    # taps; hcm and hcl FFT convolutions of size 2048 (3 real FFTs at 2.5 n log2 n, the complex product 4 n),
    # their D * u terms, and the hcl filter from 16 modes.
    featurizer = 6 * 1024 * (2 * 3 * 384 + 4 * 128)
    hcs = 2 * 1024 * 2 * 128 * 7
    fft = 3 * 2.5 * 2048 * 11 + 4 * 2048
    hcm = 2 * 128 * (fft + 2 * 1024)
    hcl = 2 * 128 * (fft + 2 * 1024 + 3 * 16 * 1024)
    assert parts["conv"] == featurizer + hcs + hcm + hcl == 125_304_832
    assert estimate_flops(config, 1024) == sum(parts.values())
    assert estimate_flops(config, 4096) > 4 * estimate_flops(config, 1024)  # attention is quadratic


def test_hidden_layers_and_tied_head():
    model = StripedHyena(preset_config("test")).eval()
    ids = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        logits, hidden = model(ids, return_hidden_layers=[0, -1])
        assert_close(model.unembed(hidden[-1]), logits)
    assert hidden[0].shape == (2, 11, 8)
    assert model.embedding_layer.weight.data_ptr() == next(model.parameters()).data_ptr()
    with pytest.raises(ValueError, match="out of range"):
        model(ids, return_hidden_layers=[4])


def test_backward_is_finite_and_checkpointing_gives_same_grads():
    torch.manual_seed(3)
    model = StripedHyena(preset_config("test"))
    ids = torch.randint(0, 512, (2, 33))

    def grads():
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, 512), ids[:, 1:].reshape(-1)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    assert all(torch.isfinite(g).all() for g in plain.values())
    model.activation_checkpointing = True
    for name, grad in grads().items():
        assert_close(grad, plain[name], atol=1e-6, rtol=1e-5)
