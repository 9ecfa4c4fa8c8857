"""Chunked prefill (exact long context) equals the one-shot forward: logits and every block's hidden state,
for chunk sizes from 1 up, on random configs and the Vortex fixture; its fast kernels against references."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import VORTEX_TINY
from torch.nn.attention.bias import causal_lower_right
from torch.testing import assert_close

from evo2_cli.model import StripedHyena, load_vortex, preset_config
from evo2_cli.model import model as model_module
from evo2_cli.model.model import (
    KVCache,
    attention_reference,
    causal_attention_after_cache,
    causal_attention_blocked,
    modal_continue,
    modal_continue_reference,
    modal_filter,
    modal_filter_reference,
)


def _random_model(seed: int = 0, **overrides) -> StripedHyena:
    """Every layer kind, twice by default; weights perturbed so no block is close to the identity."""
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


@functools.cache
def _vortex_fixture(form: str = "modal") -> StripedHyena:
    config, weights = VORTEX_TINY / "tiny_config.yml", VORTEX_TINY / "state_dict_checkpoint_layout.pt"
    return load_vortex(config, weights, hcl_form=form).eval()


@pytest.fixture(scope="module")
def model():
    return _random_model()


def _ids(batch: int, length: int, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _assert_chunked_equals_forward(model, ids, chunk_size, atol=1e-4):
    """prefill_chunks against forward, chunk by chunk: logits and every block's hidden state."""
    layers = list(range(len(model.blocks)))
    with torch.no_grad():
        full, hidden = model(ids, return_hidden_layers=layers)
    cache = model.new_cache(ids.shape[0])
    start = 0
    for logits, chunk_hidden in model.prefill_chunks(ids, cache, chunk_size, return_hidden_layers=layers):
        end = start + logits.shape[1]
        assert logits.shape[1] == min(chunk_size, ids.shape[1] - start)
        assert_close(logits, full[:, start:end], atol=atol, rtol=0)
        for i in layers:
            assert_close(chunk_hidden[i], hidden[i][:, start:end], atol=atol, rtol=0, msg=f"block {i}")
        start = end
    assert start == ids.shape[1] == cache.seqlen


@pytest.mark.parametrize(("chunk_size", "length"), [(1, 30), (7, 300), (128, 1000), (4096, 4400)])
def test_chunked_prefill_equals_forward(model, chunk_size, length):
    _assert_chunked_equals_forward(model, _ids(2, length, seed=chunk_size), chunk_size)


def test_chunked_prefill_equals_forward_at_64k():
    """The long case on a model without attention (its O(L^2) is the KV cache's business, tested above)."""
    model = _random_model(
        hidden_size=8, layout="SDH", vocab_size=256, hcs_filter_groups=2, hcm_filter_groups=4
    )
    _assert_chunked_equals_forward(model, _ids(2, 65536, vocab=256), 4096)


@pytest.mark.parametrize(
    ("form", "chunk_size", "length"),
    [
        *[
            (form, chunk, length)
            for form in ("modal", "vortex")
            for chunk, length in ((1, 20), (7, 300), (128, 300))
        ],
        ("modal", 4096, 4300),  # the forms differ only in where lambda comes from
    ],
)
def test_chunked_prefill_on_the_vortex_fixture(form, chunk_size, length):
    ids = torch.load(VORTEX_TINY / "input_ids.pt", weights_only=True)  # (2, 300)
    if length > ids.shape[1]:
        ids = torch.cat((ids, _ids(2, length - ids.shape[1])), dim=1)
    _assert_chunked_equals_forward(_vortex_fixture(form), ids[:, :length], chunk_size)


@pytest.mark.parametrize("fixture", ["random", "vortex"])
def test_prefills_and_steps_in_any_mix_equal_forward(model, fixture):
    """prefill (chunked), another prefill continuing the cache, then single steps: the forward's logits."""
    net = model if fixture == "random" else _vortex_fixture()
    ids = _ids(2, 200, seed=3)
    with torch.no_grad():
        full = net(ids)
    cache = net.new_cache(2)
    logits = [net.prefill(ids[:, :100], cache, chunk_size=7), net.prefill(ids[:, 100:150], cache)]
    logits += [net.step(ids[:, t], cache).unsqueeze(1) for t in range(150, 200)]
    assert cache.seqlen == 200
    assert_close(torch.cat(logits, dim=1), full, atol=1e-4, rtol=0)


def test_bf16_drift_stays_at_the_one_shot_forwards_level():
    """Under bf16 autocast chunked prefill is as far from the fp32 forward as the bf16 forward itself
    (measured 1.05-1.15x on this fixture, see docs/model.md): the hcl state stays fp64, filters and FFTs
    fp32."""
    model, ids = _vortex_fixture(), _ids(2, 600, seed=1)
    with torch.no_grad():
        fp32 = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            one_shot = model(ids).float()
            chunked = model.prefill(ids, model.new_cache(2), chunk_size=128).float()
    one_shot_error = (one_shot - fp32).abs().max().item()
    assert 0 < one_shot_error < 0.35  # logits of magnitude ~35: a few bf16 steps
    assert (chunked - fp32).abs().max().item() <= 1.5 * one_shot_error


def test_without_logits_stops_after_the_last_hidden_layer(model):
    """logits=False (embeddings): the same hidden states, no logits, and no block after the one asked for."""
    ids, ran = _ids(2, 50), []
    hooks = [block.register_forward_hook(lambda m, i, o: ran.append(m)) for block in model.blocks]
    with torch.no_grad():
        _, hidden = model(ids, return_hidden_layers=[1, -1])
        ran.clear()
        logits, early = model(ids, return_hidden_layers=[1], logits=False)
    for hook in hooks:
        hook.remove()
    assert logits is None and torch.equal(early[1], hidden[1])
    assert ran == list(model.blocks[:2])
    cache = model.new_cache(2)
    chunks = list(model.prefill_chunks(ids, cache, 16, return_hidden_layers=[1], logits=False))
    assert [c[0] for c in chunks] == [None] * 4
    assert_close(torch.cat([c[1][1] for c in chunks], dim=1), hidden[1], atol=1e-4, rtol=0)
    assert all(state is None or isinstance(state, KVCache) for state in cache.layers[2:])  # no hyena state
    assert model(ids, [], logits=False) == (None, {})  # the embeddings alone: no block runs


def test_prefill_returns_hidden_layers_like_forward(model):
    ids = _ids(2, 50)
    with torch.no_grad():
        full, hidden = model(ids, return_hidden_layers=[1, -1])
    logits, prefilled = model.prefill(ids, model.new_cache(2), chunk_size=16, return_hidden_layers=[1, -1])
    assert sorted(prefilled) == [-1, 1]
    assert_close(logits, full, atol=1e-4, rtol=0)
    for layer in (1, -1):
        assert_close(prefilled[layer], hidden[layer], atol=1e-4, rtol=0)


def test_chunk_memory_does_not_grow_with_the_sequence(model, monkeypatch):
    """hcl never builds a filter, FFT or state sum longer than a chunk; the KV buffer is allocated once, at
    the final length (no doubling). Each hcl layer computes its decay exponentials once per chunk."""
    longest = {"filter": 0, "fft": 0, "state": 0, "decay": 0}
    decays = []

    def spy(name, function, length_of):
        def wrapped(*args, **kwargs):
            longest[name] = max(longest[name], length_of(*args))
            return function(*args, **kwargs)

        monkeypatch.setattr(model_module, function.__name__, wrapped)

    spy("filter", model_module.modal_filter, lambda poles, residues, length, *_: length)
    spy("fft", model_module.causal_convolution_fft, lambda u, h: max(u.shape[-1], h.shape[-1]))
    spy("state", model_module.modal_state, lambda poles, u, *_: u.shape[-1])
    spy("decay", model_module._decay_blocks, lambda poles, length: decays.append(length) or length)
    cache = model.new_cache(2)
    for _ in model.prefill_chunks(_ids(2, 1000), cache, chunk_size=64):
        pass
    assert longest == {"filter": 64, "fft": 64, "state": 64, "decay": 64}
    hcl_layers = sum(block.kind == "hcl" for block in model.blocks)
    assert len(decays) == hcl_layers * 16  # 1000 tokens in 16 chunks
    attention = [layer for layer in cache.layers if isinstance(layer, KVCache)]
    assert len(attention) == 2 and all(layer.k.shape[-2] == layer.length == 1000 for layer in attention)


def test_max_length_sizes_the_kv_buffers_once(model):
    cache = model.new_cache(1, max_length=60)
    model.prefill(_ids(1, 20), cache, chunk_size=8)
    for t in range(40):
        model.step(torch.tensor([t]), cache)
    attention = [layer for layer in cache.layers if isinstance(layer, KVCache)]
    assert all(layer.k.shape[-2] == layer.length == 60 for layer in attention)


def test_growing_vortex_poles_are_refused_after_the_first_chunk():
    torch.manual_seed(0)
    config = preset_config("test", hidden_size=16, layout="SDH*SDH*", hcl_form="vortex")
    model = StripedHyena(config).eval()  # the training stacks' init: every pole < 0
    with torch.no_grad():
        model.blocks[2].filter.log_poles[0, 0] = 1e-3
    ids = _ids(1, 20)
    model.prefill(ids, model.new_cache(1))  # one chunk on a fresh cache: as the forward does
    with pytest.raises(ValueError, match=r"layer 2: 1 hcl pole\(s\) with lambda >= 0"):
        model.prefill(ids, model.new_cache(1), chunk_size=8)
    cache = model.new_cache(1)
    model.prefill(ids, cache)
    with pytest.raises(ValueError, match="lambda >= 0"):
        model.prefill(ids, cache)


# ------------------------------------------------------------ fast kernels against their references


@pytest.mark.parametrize(("lq", "lk"), [(1, 1), (1, 40), (5, 5), (5, 77), (64, 64), (100, 333), (37, 37)])
@pytest.mark.parametrize("block", [16, 1024])
def test_blocked_attention_matches_explicit_softmax(lq, lk, block):
    q = torch.randn(2, 3, lq, 8)
    k, v = torch.randn(2, 3, lk, 8), torch.randn(2, 3, lk, 8)
    assert_close(
        causal_attention_blocked(q, k, v, block=block), attention_reference(q, k, v), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(("lq", "lk"), [(2, 3), (5, 77), (64, 64 + 1), (100, 333)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_cpu_attention_matches_explicit_softmax(lq, lk, dtype):
    """The CPU path: fused attention over the cache and over the chunk, merged by log-sum-exp."""
    q = torch.randn(2, 3, lq, 8)
    k, v = torch.randn(2, 3, lk, 8), torch.randn(2, 3, lk, 8)
    out = causal_attention_after_cache(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype
    assert_close(
        out.float(), attention_reference(q, k, v), atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0
    )


def test_chunked_prefill_without_the_fused_cpu_kernel(model, monkeypatch):
    """Where the fused CPU kernel is missing, the tiles give the same numbers."""
    monkeypatch.setattr(model_module, "_cpu_flash_attention", None)
    _assert_chunked_equals_forward(model, _ids(2, 300, seed=9), 7)


@pytest.mark.parametrize(("lq", "lk"), [(5, 77), (100, 333)])
def test_lower_right_causal_bias_is_the_chunk_mask(lq, lk):
    """The CUDA path hands SDPA a lower-right causal bias; on a CPU the same call materializes the mask,
    which shows it means what `attention_reference` does (query i at key position Lk - Lq + i)."""
    q = torch.randn(2, 3, lq, 8)
    k, v = torch.randn(2, 3, lk, 8), torch.randn(2, 3, lk, 8)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(lq, lk))
    assert_close(fused, attention_reference(q, k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [1, 2, 7, 64, 300])
def test_modal_continue_matches_recurrence(length):
    """A chunk after a carried state (past part + own convolution) against the token-by-token recurrence."""
    d, s = 6, 4
    poles = -torch.exp(torch.randn(d, s)) * torch.exp(torch.rand(d, s) * 3 - 6)  # slow and fast modes
    residues, u = torch.randn(d, s), torch.randn(2, d, length)
    state = torch.randn(2, d, s, dtype=torch.float64) * 10
    y, new_state = modal_continue(poles, residues, u, state, skip=torch.zeros(d))
    y_ref, state_ref = modal_continue_reference(poles, residues, u, state)
    assert new_state.dtype == torch.float64
    # The chunk's own sum runs in fp32 (modal_state), the carried part in fp64.
    assert_close(new_state, state_ref, atol=2e-6 * state_ref.abs().max().item(), rtol=0)
    assert_close(y, y_ref, atol=1e-4, rtol=1e-5)


def test_batched_modal_filter_matches_formula():
    poles = -torch.rand(5, 4) * 0.1
    residues = torch.randn(3, 5, 4)  # a batch of residue sets (chunked prefill's carried state)
    assert_close(modal_filter(poles, residues, 100), modal_filter_reference(poles, residues, 100))


def test_rotary_positions_continue_across_chunks():
    model = _random_model(seed=1, layout="*H*", rotary_emb_base=1e6, rotary_scaling_factor=8.0)
    _assert_chunked_equals_forward(model, _ids(2, 100, seed=5), 7)


def test_bad_arguments_fail_before_the_first_chunk(model):
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="out of range"):
        model.prefill_chunks(_ids(2, 10), cache, 4, return_hidden_layers=[99])  # not iterated
    with pytest.raises(ValueError, match=r"shape \(2, P>=1\)"):
        model.prefill_chunks(_ids(3, 10), cache, 4)
    assert cache.seqlen == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunked_prefill_on_cuda_uses_the_fused_kernels_exactly():
    """On CUDA a chunk after the cache goes through SDPA with a lower-right causal bias."""
    model = _vortex_fixture().cuda()
    try:
        ids = _ids(2, 700).cuda()
        with torch.no_grad():
            full = model(ids).cpu()
        for chunk_size in (7, 256):
            chunked = model.prefill(ids, model.new_cache(2), chunk_size=chunk_size).cpu()
            assert_close(chunked, full, atol=1e-3, rtol=0)  # TF32 matmuls may be on
    finally:
        model.cpu()  # the cached fixture is shared with the CPU tests
