"""evo2_cli.infer core: sampling, cached generation vs re-forward, windowed scoring vs unwindowed and the
stitching rule, embeddings, variants, the model loader."""

from __future__ import annotations

import ctypes
import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import VORTEX_TINY
from torch.testing import assert_close

from evo2_cli.config import FieldError
from evo2_cli.data.alphabet import reverse_complement
from evo2_cli.errors import InputError
from evo2_cli.infer import context as context_module
from evo2_cli.infer import embedding as embedding_module
from evo2_cli.infer import outputs as outputs_module
from evo2_cli.infer.context import Context
from evo2_cli.infer.embedding import Layer, embed_sequences, hidden_states, resolve_layer
from evo2_cli.infer.generation import generate, generate_reference
from evo2_cli.infer.loading import load_inference_model
from evo2_cli.infer.outputs import atomic_text_output
from evo2_cli.infer.sampling import SamplingSettings, filtered_probs, row_generator, sample, sample_reference
from evo2_cli.infer.scoring import Score, _StrandSum, score_reference, score_sequences
from evo2_cli.infer.sequences import Sequence, encode_dna, tokens_to_text
from evo2_cli.infer.variants import Variant, read_variants, score_variants
from evo2_cli.infer.windows import plan_windows
from evo2_cli.model import StripedHyena, load_vortex, preset_config, save_model
from evo2_cli.model.checkpoint import resolve_checkpoint

CONFIG = VORTEX_TINY / "tiny_config.yml"
WEIGHTS = VORTEX_TINY / "state_dict_checkpoint_layout.pt"


@pytest.fixture(scope="module")
def tiny():
    """The Vortex conformance model: every layer kind, attention included."""
    return load_inference_model(WEIGHTS, CONFIG)


@pytest.fixture(scope="module")
def test_model():
    torch.manual_seed(0)
    return StripedHyena(preset_config("test")).eval().requires_grad_(False)


def _dna(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.frombuffer(b"ACGT", np.uint8), n)


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(top_k=1),
        SamplingSettings(top_k=4, temperature=1.0, top_p=1.0),
        SamplingSettings(top_k=0, temperature=0.7, top_p=0.9),
        SamplingSettings(top_k=20, temperature=1.5, top_p=0.5),
        SamplingSettings(top_k=3, temperature=0.2, top_p=0.3),
    ],
)
def test_sample_matches_plain_python_reference(settings):
    logits = torch.randn(64, 40, generator=torch.Generator().manual_seed(1)) * 3
    picked = sample(logits, settings, [row_generator(7, i) for i in range(64)])
    for i in range(64):
        u = float(torch.rand((), generator=row_generator(7, i), dtype=torch.float64))
        assert int(picked[i]) == sample_reference(logits[i], settings, u)


def test_top_p_is_applied_within_top_k_after_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs, ids = filtered_probs(logits, SamplingSettings(top_k=0, top_p=0.7))
    assert ids[0, :2].tolist() == [0, 1]
    assert_close(probs[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # top-k first: only 2 candidates; then temperature 2 flattens them: p ∝ sqrt(0.5), sqrt(0.3)
    probs, ids = filtered_probs(logits, SamplingSettings(top_k=2, temperature=2.0))
    expected = torch.tensor([math.sqrt(0.5), math.sqrt(0.3)])
    assert_close(probs[0], expected / expected.sum())
    # top-p after temperature: the flattened top-1 (0.5637) no longer reaches 0.56 -> 2 kept... 0.55 keeps 1
    probs, _ = filtered_probs(logits, SamplingSettings(top_k=2, temperature=2.0, top_p=0.55))
    assert probs[0].tolist() == [1.0, 0.0]


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(20000, 4)
    picked = sample(logits, SamplingSettings(top_k=0), [row_generator(3, i) for i in range(20000)])
    freq = torch.bincount(picked, minlength=4).double() / 20000
    assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.015, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0, "top_k": 0}, "temperature"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_bad_sampling_settings(kwargs, message):
    with pytest.raises(FieldError) as caught:  # the config names the flag or key (test_infer_cli.py)
        SamplingSettings(**kwargs)
    assert caught.value.field == message


def test_greedy_ignores_temperature():
    assert SamplingSettings(top_k=1, temperature=0.0).greedy


# ---------------------------------------------------------------- prompts


def test_encode_dna_uppercases_and_names_the_bad_position():
    assert encode_dna("acgTn", "p").tobytes() == b"ACGTN"
    with pytest.raises(InputError, match=r"--prompt 2: position 3 holds 'X'"):
        encode_dna("ACXT", "--prompt 2")
    assert encode_dna("ACXT", "p", policy="n").tobytes() == b"ACNT"
    with pytest.raises(InputError, match="empty"):
        encode_dna("  ", "p")
    assert tokens_to_text(np.array([65, 0, 300, 99])) == "ANNc"


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("model_name, prompt_length", [("tiny", 7), ("test", 1), ("test", 2), ("test", 30)])
def test_greedy_generation_equals_argmax_of_full_forward(request, model_name, prompt_length):
    model = request.getfixturevalue("tiny" if model_name == "tiny" else "test_model")
    prompt = _dna(prompt_length, prompt_length)
    cached = generate(model, [prompt], 8, SamplingSettings(top_k=1), alphabet=None)[0]
    ids = torch.from_numpy(prompt.astype(np.int64))[None]
    for n in range(8):  # argmax of the full forward, re-run from scratch per token
        with torch.no_grad():
            logits = model(ids)[0, -1]
        assert int(cached.tokens[n]) == int(logits.argmax())
        assert cached.logprobs[n] == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-4)
        ids = torch.cat((ids, logits.argmax().reshape(1, 1)), dim=1)


def test_long_prompts_are_prefilled_in_chunks(tiny):
    """A prompt longer than the chunk: the chunked prefill continues exactly as the full forward, the
    prefill reports its progress and the pre-flight sees prompt + new tokens."""
    prompts = [_dna(45, 1), _dna(45, 2), _dna(10, 3)]
    prefilled, long = [], []
    settings = SamplingSettings(top_k=1)
    chunked = generate(
        tiny, prompts, 6, settings, chunk=8, alphabet=None, on_prefill=prefilled.append,
        before_long=lambda length, rows: long.append((length, rows)),
    )  # fmt: skip
    slow = generate_reference(tiny, prompts, 6, settings, alphabet=None)
    for a, b in zip(chunked, slow, strict=True):
        assert a.tokens.tolist() == b.tokens.tolist()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert sum(prefilled) == 100 and prefilled[0] == 8  # one row of 10, then two rows of 45, 8 at a time
    assert long == [(16, 1), (51, 2)]  # prompt + 6 new tokens, rows


def test_sampled_generation_equals_the_uncached_reference(test_model):
    prompts = [_dna(5, 1), _dna(9, 2), _dna(5, 3)]  # two lengths: grouped into separate batches
    settings = SamplingSettings(top_k=0, temperature=1.3, top_p=0.95)
    cached = generate(test_model, prompts, 8, settings, num_samples=2, seed=11, batch_size=3, alphabet=None)
    slow = generate_reference(test_model, prompts, 8, settings, num_samples=2, seed=11, alphabet=None)
    assert [(g.prompt_index, g.sample_index) for g in cached] == [(p, s) for p in range(3) for s in range(2)]
    for a, b in zip(cached, slow, strict=True):
        assert a.tokens.tolist() == b.tokens.tolist()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_same_seed_same_output_whatever_the_batch(test_model):
    prompts = [_dna(4, 5), _dna(4, 6), _dna(6, 7)]
    settings = SamplingSettings(top_k=4)
    runs = [generate(test_model, prompts, 10, settings, num_samples=2, seed=5, batch_size=b) for b in (1, 6)]
    for other in runs[1:]:
        assert [g.tokens.tolist() for g in other] == [g.tokens.tolist() for g in runs[0]]
    different = generate(test_model, prompts, 10, settings, num_samples=2, seed=6)
    assert [g.tokens.tolist() for g in different] != [g.tokens.tolist() for g in runs[0]]
    generated = np.concatenate([g.tokens for g in runs[0]])
    assert set(generated.tolist()) <= set(b"ACGT")  # the default alphabet


# ---------------------------------------------------------------- windows and scoring


@pytest.mark.parametrize(
    "length, window, overlap", [(1, 4, 1), (10, 10, 3), (11, 10, 3), (100, 16, 5), (37, 8, 7)]
)
def test_window_plan_covers_every_position_once(length, window, overlap):
    windows = plan_windows(length, window, overlap)
    owned = np.concatenate([np.arange(w.keep_from, w.stop) for w in windows])
    assert owned.tolist() == list(range(length))
    for k, w in enumerate(windows):
        assert w.stop - w.start == min(window, length) and w.start <= w.keep_from < w.stop
        if k > 0:
            assert w.keep_from - w.start >= overlap


def test_score_matches_the_official_engine_logits(tiny):
    """Golden numbers: per-token log-probs from Vortex's own fp32 logits (the conformance vector)."""
    ids = torch.load(VORTEX_TINY / "input_ids.pt", weights_only=True)  # (2, 300)
    logits = torch.load(VORTEX_TINY / "logits_fp32.pt", weights_only=True)  # (2, 300, 512)
    expected = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    records = [Sequence(f"r{i}", ids[i].numpy().astype(np.uint8)) for i in range(2)]
    scores = list(score_sequences(tiny, records))
    for i, s in enumerate(scores):
        np.testing.assert_allclose(s.logprobs[1:], expected[i].numpy(), atol=2e-4)
        assert s.sum_ll == pytest.approx(float(expected[i].sum()), abs=5e-3)
        assert s.bits_per_base == pytest.approx(-float(expected[i].mean()) / math.log(2), abs=1e-4)
        assert s.n_scored == 299 and np.isnan(s.logprobs[0])


def test_windowed_score_equals_unwindowed_when_the_window_covers(tiny):
    records = [Sequence("a", _dna(150, 1)), Sequence("b", _dna(90, 2)), Sequence("c", _dna(3, 3))]
    scores = list(
        score_sequences(tiny, records, Context("windows", window=150, overlap=10, batch_tokens=400))
    )
    assert [s.id for s in scores] == ["a", "b", "c"]
    for record, s in zip(records, scores, strict=True):  # bucketed, padded batches change nothing
        np.testing.assert_allclose(s.logprobs[1:], score_reference(tiny, record.tokens)[1:], atol=2e-5)


def test_stitching_rule_on_a_long_record(tiny):
    tokens = _dna(50, 4)
    window, overlap = 16, 5
    got = next(
        score_sequences(tiny, [Sequence("x", tokens)], Context("windows", window=window, overlap=overlap))
    ).logprobs
    windows = plan_windows(50, window, overlap)
    assert [(w.start, w.keep_from) for w in windows] == [(0, 0), (11, 16), (22, 27), (33, 38), (34, 49)]
    for p in range(1, 50):  # brute force: the containing window that gives p the most left context
        start = min(w.start for w in windows if w.start <= p < w.stop)
        expected = score_reference(tiny, tokens[start : p + 1])[-1]
        assert got[p] == pytest.approx(float(expected), abs=2e-5), p
    full = score_reference(tiny, tokens)  # beyond the window the context is cut: the numbers differ
    assert not np.allclose(got[window:], full[window:], atol=1e-3)


@pytest.mark.parametrize("chunk", [5, 64])
def test_exact_mode_equals_one_forward_over_the_whole_record(tiny, chunk):
    """Records longer than the chunk go through the chunked prefill: every position sees its whole left
    context, the one-shot forward's numbers (the windows of the test above do not); --window is ignored."""
    records = [Sequence("a", _dna(150, 1)), Sequence("b", _dna(5, 2)), Sequence("c", _dna(67, 3))]
    context = Context("exact", chunk=chunk, window=16, overlap=5)
    scores = list(score_sequences(tiny, records, context, reverse_complement=True))
    assert [s.id for s in scores] == ["a", "b", "c"]
    for record, s in zip(records, scores, strict=True):
        assert np.isnan(s.logprobs[0])
        np.testing.assert_allclose(s.logprobs[1:], score_reference(tiny, record.tokens)[1:], atol=1e-4)
        rc = float(np.sum(score_reference(tiny, reverse_complement(record.tokens))[1:]))
        assert s.sum_ll_rc == pytest.approx(rc, abs=2e-3)


def test_strand_sum_adds_pieces_as_numpy_sums_the_whole_array():
    """A strand's sum, streamed piece by piece, has the very digits of np.sum over the whole array (position 0
    skipped); summing piece by piece would not (checked, so the data can tell them apart)."""
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(30_000) * rng.choice([1e-7, 1.0, 300.0], 30_000)).astype(np.float32)
    cuts = [0, 1, 2, 5000, 8193, 8194, 20_000, 30_000]
    pieces = [values[a:b] for a, b in itertools.pairwise(cuts)]
    strand = _StrandSum(keep=False)
    for piece in pieces:
        strand.add(piece)
    expected = float(np.sum(values[1:], dtype=np.float64))
    assert strand.finish() == (expected, None)
    assert sum(float(np.sum(p, dtype=np.float64)) for p in [values[1:2], *pieces[2:]]) != expected


def test_scores_without_logprobs_keep_only_the_same_sums(tiny):
    """keep_logprobs=False (score without --per-token): no per-token arrays, bit-identical sums."""
    records = [Sequence("a", _dna(150, 1)), Sequence("b", _dna(1, 2)), Sequence("c", _dna(67, 3))]
    for context in (Context("exact", chunk=7), Context("windows", window=32, overlap=8)):
        kept = list(score_sequences(tiny, records, context, reverse_complement=True))
        summed = list(score_sequences(tiny, records, context, reverse_complement=True, keep_logprobs=False))
        for k, s in zip(kept, summed, strict=True):
            assert s.logprobs is None and repr(s.row()) == repr(k.row())  # NaN for a 1-base record
            assert k.sum_ll_forward == float(np.sum(k.logprobs[1:], dtype=np.float64))


def test_exact_mode_reports_long_records_and_progress(test_model):
    records = [Sequence("a", _dna(40, 1)), Sequence("b", _dna(8, 2)), Sequence("c", _dna(33, 3))]
    long, progress = [], []
    list(
        score_sequences(
            test_model, records, Context(chunk=8), before_long=long.append, on_tokens=progress.append
        )
    )
    assert long == [40, 33]  # the pre-flight hook: once per record longer than a chunk
    assert sum(progress) == 81 and progress[:5] == [8, 8, 8, 8, 8]
    long.clear()
    list(
        score_sequences(test_model, records, Context("windows", window=8, overlap=2), before_long=long.append)
    )
    assert long == []  # windows hold no growing cache


def test_exact_mode_keeps_large_buffers_out_of_the_heap(test_model, monkeypatch):
    """A record longer than a chunk first fixes malloc's mmap threshold (else the heap crept by about 150
    bytes per token over a 1M-token record); short records and windows leave the allocator alone."""
    calls = []
    monkeypatch.setattr(context_module, "unmap_large_buffers", lambda: calls.append(1))
    records = [Sequence("a", _dna(40, 1)), Sequence("b", _dna(8, 2))]
    list(score_sequences(test_model, records[1:], Context(chunk=8)))
    list(score_sequences(test_model, records, Context("windows", window=8, overlap=2)))
    assert calls == []
    list(score_sequences(test_model, records, Context(chunk=8)))
    assert calls == [1]


_MAPPED_4MIB = """
import ctypes, sys
import numpy as np
from evo2_cli.memory import unmap_large_buffers
libc = ctypes.CDLL(None)
fields = [(f"field{i}", ctypes.c_size_t) for i in range(10)]  # struct mallinfo2; field4 = hblkhd (mmapped)
libc.mallinfo2.restype = type("Mallinfo2", (ctypes.Structure,), {"_fields_": fields})
np.ones(16 << 20, np.uint8)  # by default, freeing this raises glibc's threshold past 4 MiB
if sys.argv[1] == "unmap":
    unmap_large_buffers()
mapped = libc.mallinfo2().field4
buffer = np.ones(4 << 20, np.uint8)
print(libc.mallinfo2().field4 - mapped >= 4 << 20)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc >= 2.33 only")
def test_large_buffers_are_mappings_of_their_own_once_unmapped():
    # A fresh process: in a big one, glibc serves the buffer from a free heap chunk whatever the threshold.
    def mapped(mode: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", _MAPPED_4MIB, mode], capture_output=True, text=True, check=True
        )
        return run.stdout.strip()

    assert (mapped("default"), mapped("unmap")) == ("False", "True")


def test_per_token_lines_come_in_blocks_not_one_string():
    tokens = np.frombuffer(b"ACGTA", np.uint8)
    logprobs = np.array([np.nan, -1.5, -0.25, -2.0, -1.0], np.float32)
    score = Score("r", 5, -4.75, -4.75 / 4, 0.0, tokens, logprobs, -4.75)
    assert list(score.per_token_lines(block=3)) == [
        "r\t1\tC\t-1.5\nr\t2\tG\t-0.25\nr\t3\tT\t-2.0\n",
        "r\t4\tA\t-1.0\n",
    ]


def test_reverse_complement_average(test_model):
    tokens = _dna(60, 8)
    both = next(score_sequences(test_model, [Sequence("x", tokens)], reverse_complement=True))
    fwd = float(np.sum(score_reference(test_model, tokens)[1:]))
    rc = float(np.sum(score_reference(test_model, reverse_complement(tokens))[1:]))
    assert both.sum_ll == pytest.approx((fwd + rc) / 2, abs=1e-4)
    assert both.mean_ll == pytest.approx((fwd + rc) / 2 / 59, abs=1e-5)
    assert both.row()["sum_ll_rc"] == pytest.approx(rc, abs=1e-4)


def test_scoring_pools_keep_input_order(test_model):
    records = [Sequence(str(i), _dna(10 + 7 * i, i)) for i in range(9)]
    one = [s.sum_ll for s in score_sequences(test_model, records, pool_tokens=1)]
    many = [s.sum_ll for s in score_sequences(test_model, records, pool_tokens=10**6)]
    np.testing.assert_allclose(one, many, atol=1e-4)


# ---------------------------------------------------------------- embeddings


def test_embeddings_mean_and_per_token(tiny):
    records = [Sequence("a", _dna(50, 1)), Sequence("b", _dna(30, 2))]
    per_token = embed_sequences(tiny, records, layer=3, pooling="none")
    mean = embed_sequences(tiny, records, layer="blocks.3")
    assert per_token.layer == mean.layer == "blocks.3"
    assert per_token.vectors.shape == (80, 64) and mean.vectors.shape == (2, 64)
    for i, record in enumerate(records):
        ids = torch.from_numpy(record.tokens.astype(np.int64))[None]
        with torch.no_grad():
            _, hidden = tiny(ids, return_hidden_layers=[3])
        rows = per_token.vectors[per_token.offsets[i] : per_token.offsets[i + 1]]
        np.testing.assert_allclose(rows, hidden[3][0].numpy(), atol=1e-5)
        np.testing.assert_allclose(mean.vectors[i], hidden[3][0].mean(0).numpy(), atol=1e-5)


def test_a_resolved_layer_is_not_resolved_again(tiny, monkeypatch):
    """The embed command resolves --layer once (on the meta model) and hands the Layer on."""
    layer = resolve_layer(tiny, "blocks.3")
    monkeypatch.setattr(embedding_module, "resolve_layer", lambda *_: pytest.fail("resolved again"))
    result = embed_sequences(tiny, [Sequence("a", _dna(20, 1))], layer=layer)
    assert result.layer == "blocks.3" and result.vectors.shape == (1, 64)


def test_embeddings_windowed_follow_the_stitching_rule(tiny):
    tokens = _dna(45, 9)
    got = embed_sequences(
        tiny,
        [Sequence("x", tokens)],
        layer=-1,
        pooling="none",
        context=Context("windows", window=16, overlap=5),
    ).vectors
    windows = plan_windows(45, 16, 5)
    for p in (0, 15, 16, 30, 44):
        start = min(w.start for w in windows if w.start <= p < w.stop)
        with torch.no_grad():
            ids = torch.from_numpy(tokens[start : p + 1].astype(np.int64))[None]
            expected = hidden_states(tiny, ids, Layer("blocks.7", "blocks.7"))
        np.testing.assert_allclose(got[p], expected[0, -1].numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "name", ["blocks.2", "-1", "blocks.3.inner_mha_cls", "blocks.6.filter", "blocks.5.mlp.l1", "norm"]
)
def test_exact_mode_embeddings_equal_one_forward(tiny, name):
    records = [Sequence("a", _dna(70, 5)), Sequence("b", _dna(9, 6))]
    got = embed_sequences(tiny, records, layer=name, pooling="none", context=Context(chunk=16))
    mean = embed_sequences(tiny, records, layer=name, context=Context(chunk=16))
    for i, record in enumerate(records):
        ids = torch.from_numpy(record.tokens.astype(np.int64))[None]
        expected = _official_hook(tiny, resolve_layer(tiny, name).module, ids)
        np.testing.assert_allclose(got.vectors[got.offsets[i] : got.offsets[i + 1]], expected, atol=1e-4)
        np.testing.assert_allclose(mean.vectors[i], expected.mean(0), atol=1e-5)


def test_layer_names(tiny):
    assert resolve_layer(tiny, None) == Layer("blocks.4", "blocks.4")  # default: the middle block
    assert resolve_layer(tiny, "-1") == Layer("blocks.7", "blocks.7")
    assert resolve_layer(tiny, "final_norm") == Layer("final_norm", "norm")
    assert resolve_layer(tiny, "blocks.-5.inner_mha_cls.Wqkv") == Layer(
        "blocks.3.inner_mha_cls.Wqkv", "blocks.3.attn.Wqkv"
    )
    for bad in (
        "8",
        "-9",
        "mlp",
        "blocks",
        "3.mlp",
        "blocks.3.filter",
        "blocks.2.mlp.l4",
        "blocks.3.attn.rotary_emb",
    ):
        with pytest.raises(InputError, match="--layer") as caught:
            resolve_layer(tiny, bad)
        if bad not in ("8", "-9"):
            assert "blocks.N.{pre_norm,post_norm,projections,filter," in str(caught.value)  # lists names


def _official_hook(model, name, ids):
    """What the official engine's embedding hook returns: output[0] of a tuple, else the output."""
    found = []
    module = model.get_submodule(name.replace("inner_mha_cls", "attn"))
    handle = module.register_forward_hook(
        lambda _m, _i, out: found.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        model(ids)
    handle.remove()
    return found[0][0].float().numpy()


@pytest.mark.parametrize(
    "name, width",
    [
        ("blocks.6.mlp.l3", 64),
        ("blocks.6.mlp.l1", 176),
        ("blocks.2.filter", 64),
        ("blocks.1.projections", 192),
        ("blocks.3.inner_mha_cls", 64),
        ("embedding_layer", 64),
        ("norm", 64),
    ],
)
def test_submodule_embeddings_are_the_forward_hook_output(tiny, name, width):
    records = [Sequence("a", _dna(50, 1)), Sequence("b", _dna(20, 2))]
    got = embed_sequences(tiny, records, layer=name, pooling="none")
    assert got.layer == name and got.vectors.shape == (70, width)
    for i, record in enumerate(records):
        ids = torch.from_numpy(record.tokens.astype(np.int64))[None]
        rows = got.vectors[got.offsets[i] : got.offsets[i + 1]]
        np.testing.assert_allclose(rows, _official_hook(tiny, name, ids), atol=1e-5)


def test_block_output_is_its_input_plus_mixer_and_mlp_outputs(tiny):
    """The names mean what the block computes: blocks.2 = blocks.1 + out_filter_dense + mlp.l3."""
    records = [Sequence("a", _dna(40, 3))]
    parts = {
        name: embed_sequences(tiny, records, layer=name, pooling="none").vectors
        for name in ("blocks.1", "blocks.2", "blocks.2.out_filter_dense", "blocks.2.mlp", "blocks.2.mlp.l3")
    }
    np.testing.assert_array_equal(parts["blocks.2.mlp"], parts["blocks.2.mlp.l3"])
    summed = parts["blocks.1"] + parts["blocks.2.out_filter_dense"] + parts["blocks.2.mlp.l3"]
    np.testing.assert_allclose(parts["blocks.2"], summed, atol=1e-5)


# ---------------------------------------------------------------- variants


def test_variants_delta_equals_direct_scoring(test_model, tmp_path):
    chrom = _dna(200, 10)
    pos = 101
    ref = chr(chrom[pos - 1])
    alt = "A" if ref != "A" else "C"
    listing = tmp_path / "v.vcf"
    listing.write_text(f"##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\nchr1\t{pos}\t.\t{ref}\t{alt},GG\n")
    variants = read_variants(listing)
    assert [(v.alt, v.line) for v in variants] == [(alt, 3), ("GG", 3)]
    results = score_variants(test_model, variants, {"chr1": chrom}, window=40)
    mutated = chrom.copy()
    mutated[pos - 1] = ord(alt)
    ref_sum = float(np.sum(score_reference(test_model, chrom[80:120])[1:]))
    alt_sum = float(np.sum(score_reference(test_model, mutated[80:120])[1:]))
    assert results[0].window_start == 80 and results[0].status == "ok"
    assert results[0].ref_sum_ll == results[1].ref_sum_ll  # one site, one reference window scored once
    assert results[0].delta_sum_ll == pytest.approx(alt_sum - ref_sum, abs=1e-4)
    assert results[1].delta_sum_ll == pytest.approx(
        float(
            np.sum(
                score_reference(
                    test_model,
                    np.concatenate((chrom[80:100], np.frombuffer(b"GG", np.uint8), chrom[101:120])),
                )[1:]
            )
        )
        - ref_sum,
        abs=1e-4,
    )
    chunked = score_variants(test_model, variants, {"chr1": chrom}, window=40, chunk=6)  # exact, in chunks
    for whole, parts in zip(results, chunked, strict=True):
        assert parts.ref_sum_ll == pytest.approx(whole.ref_sum_ll, abs=1e-4)
        assert parts.delta_mean_ll == pytest.approx(whole.delta_mean_ll, abs=1e-5)


def test_variant_ref_mismatch(test_model, tmp_path):
    chrom = np.frombuffer(b"ACGTACGTAC", np.uint8)
    bad = Variant("c", 2, "G", "T", line=7)
    with pytest.raises(InputError, match=r"v.tsv:7: ref allele G does not match .* c:2, which holds C"):
        score_variants(test_model, [bad], {"c": chrom}, window=8, source="v.tsv")
    skipped = score_variants(test_model, [bad], {"c": chrom}, window=8, on_mismatch="skip")
    assert skipped[0].status == "ref_mismatch" and math.isnan(skipped[0].delta_sum_ll)


@pytest.mark.parametrize(
    "text, message",
    [
        ("c\tx\tA\tC\n", "not an integer"),
        ("c\t0\tA\tC\n", ">= 1"),
        ("c\t3\tA\n", "expected the columns"),
        (">chr1\nACGT\n", "expected the columns"),  # a FASTA given as the variant list
        ("c\t3\tA\t<DEL>\n", "symbolic"),
        ("c\t3\tA\tQ\n", "alt allele: position 1"),
        ("# nothing\n", "no variants"),
    ],
)
def test_bad_variant_lists(tmp_path, text, message):
    path = tmp_path / "v.tsv"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_variants(path)


# ---------------------------------------------------------------- outputs


def test_atomic_text_output_renames_when_complete_and_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "sub" / "scores.tsv"
    with pytest.raises(RuntimeError), atomic_text_output(out) as handle:
        handle.write("half\n")
        raise RuntimeError("stopped")
    assert list((tmp_path / "sub").iterdir()) == []  # neither the output nor its temporary
    with atomic_text_output(out) as handle:
        handle.write("id\tvalue\n")
        assert not out.exists()  # the final name appears only when complete
    assert out.read_text() == "id\tvalue\n" and list(out.parent.iterdir()) == [out]


def test_each_output_is_probed_for_writing_once(tmp_path, monkeypatch):
    """check_output probes the directory before any work; the writers that follow do not probe again."""
    probes, probe = [], outputs_module._check_writable
    monkeypatch.setattr(outputs_module, "_check_writable", lambda path: probes.append(path) or probe(path))
    table, vectors = tmp_path / "sub" / "t.tsv", tmp_path / "e.npy"
    outputs_module.check_output(table, outputs_module.table_kind("a table", ("id",), "tsv"))
    outputs_module.check_embeddings_output(vectors)
    outputs_module.write_table(table, [{"id": 1}], "tsv")
    outputs_module.write_embeddings(vectors, np.zeros((1, 2), np.float32), ["a"], [3], None, {})
    assert probes == [table, vectors, outputs_module.embeddings_index(vectors)]


# ---------------------------------------------------------------- loading


def test_loader_accepts_every_source(tmp_path, test_model):
    save_model(test_model, tmp_path / "ck")
    run = tmp_path / "run" / "checkpoints"
    save_model(test_model, run / "step_00000010")
    (run / "latest").symlink_to("step_00000010")
    ids = torch.from_numpy(_dna(20, 1).astype(np.int64))[None]
    expected = test_model(ids)
    for source in (tmp_path / "ck", tmp_path / "ck" / "model.safetensors", tmp_path / "run", run):
        assert_close(load_inference_model(source)(ids), expected)
    assert resolve_checkpoint(tmp_path / "run") == (run / "step_00000010").resolve()
    # every source comes back as the checkpoint directory itself (a `latest` pointer followed)
    assert resolve_checkpoint(run) == (run / "step_00000010").resolve()
    assert resolve_checkpoint(tmp_path / "ck" / "model.safetensors") == tmp_path / "ck"
    assert resolve_checkpoint(WEIGHTS) == WEIGHTS
    model = load_inference_model(WEIGHTS, CONFIG)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert_close(model(ids), load_vortex(CONFIG, WEIGHTS)(ids))


def test_loader_errors(tmp_path, test_model):
    with pytest.raises(InputError, match="--vortex-config"):
        load_inference_model(WEIGHTS)
    with pytest.raises(InputError, match="not found"):
        load_inference_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a checkpoint directory"):
        load_inference_model(tmp_path / "empty")
    wrong = tmp_path / "wrong.yml"  # a config that does not match the weights
    wrong.write_text(CONFIG.read_text().replace("inner_mlp_size: 176", "inner_mlp_size: 192"))
    with pytest.raises(InputError, match="shape"):
        load_inference_model(WEIGHTS, wrong)
    save_model(test_model, tmp_path / "ck")
    with pytest.raises(InputError, match="only for Vortex"):
        load_inference_model(tmp_path / "ck", CONFIG)
    with pytest.raises(InputError, match="--clamp-poles is only for Vortex"):
        load_inference_model(tmp_path / "ck", clamp_poles=-1e-4)
    with pytest.raises(InputError, match="--dtype"):
        load_inference_model(tmp_path / "ck", dtype="fp8")


def test_bf16_keeps_hyena_filters_fp32():
    model = load_inference_model(WEIGHTS, CONFIG, dtype="bf16")
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert (
        dtypes["blocks.2.filter.p"] == torch.float32
        and dtypes["blocks.2.projections.weight"] == torch.bfloat16
    )
    tokens = _dna(64, 3)
    low = next(score_sequences(model, [Sequence("x", tokens)]))
    full = next(score_sequences(load_inference_model(WEIGHTS, CONFIG), [Sequence("x", tokens)]))
    assert low.mean_ll == pytest.approx(full.mean_ll, abs=0.05)


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_cuda_generation_scoring_and_embeddings_match_the_cpu(tiny):
    gpu = load_inference_model(WEIGHTS, CONFIG, device="cuda", dtype="fp32")
    prompts = [_dna(7, 1), _dna(7, 2), _dna(3, 3)]
    greedy = SamplingSettings(top_k=1)
    on_cpu = generate(tiny, prompts, 16, greedy, alphabet=None)
    on_gpu = generate(gpu, prompts, 16, greedy, alphabet=None)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert a.tokens.tolist() == b.tokens.tolist()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-3)  # TF32 matmuls may be on
    records = [Sequence("a", _dna(300, 4)), Sequence("b", _dna(40, 5))]
    cpu_scores = list(score_sequences(tiny, records, Context("windows", window=128, overlap=32)))
    gpu_scores = list(score_sequences(gpu, records, Context("windows", window=128, overlap=32)))
    for a, b in zip(cpu_scores, gpu_scores, strict=True):
        assert b.mean_ll == pytest.approx(a.mean_ll, abs=1e-3)
    cpu_embeddings = embed_sequences(tiny, records, layer=5).vectors
    np.testing.assert_allclose(embed_sequences(gpu, records, layer=5).vectors, cpu_embeddings, atol=1e-3)
    bf16 = load_inference_model(WEIGHTS, CONFIG, device="cuda", dtype="bf16")
    low = list(score_sequences(bf16, records))
    assert low[0].mean_ll == pytest.approx(cpu_scores[0].mean_ll, abs=0.05)
    sampled = [g.tokens for g in generate(bf16, prompts, 16, SamplingSettings(top_k=4), seed=3)]
    assert all(len(t) == 16 and set(t.tolist()) <= set(b"ACGT") for t in sampled)


# ---------------------------------------------------------------- memory pre-flight


def test_kv_cache_estimate_is_what_the_chunked_prefill_allocates(tiny):
    from evo2_cli.infer.memory import estimate_inference_memory, kv_cache_bytes

    ids = torch.from_numpy(np.stack([_dna(40, 1), _dna(40, 2)]).astype(np.int64))
    cache = tiny.new_cache(2)
    for _ in tiny.prefill_chunks(ids, cache, 16):
        pass
    allocated = sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers if hasattr(layer, "k"))
    assert allocated == kv_cache_bytes(tiny.config, 40, 2, 4) == 2 * 2 * 40 * 64 * 4  # one attention layer
    estimate = estimate_inference_memory(tiny, 40, 16, 2)
    assert estimate.kv_cache_bytes == allocated and estimate.chunk == 16
    assert estimate.weight_bytes == sum(p.numel() * 4 for p in tiny.parameters())
    cache = tiny.new_cache(2, max_length=45)  # as generation sizes it: prompt + every new token, once
    tiny.prefill(ids, cache, chunk_size=16)
    for _ in range(5):
        tiny.step(torch.zeros(2, dtype=torch.long), cache)
    assert [layer.k.shape[-2] for layer in cache.layers if hasattr(layer, "k")] == [45]


def test_chunk_activation_estimate_fits_the_measured_peak():
    """Golden: per token, 1.8 x the hidden-size tensors + two fp32 logits rows (memory.py's measured fit:
    `small` peaked at 22.7-25.1 kB per token, `test` at 4.6-4.9 kB)."""
    from evo2_cli.infer.memory import chunk_activation_bytes

    assert chunk_activation_bytes(preset_config("small"), 8192, 1, 4) == int(8192 * (1.8 * 11776 + 4096))
    assert chunk_activation_bytes(preset_config("test"), 4096, 2, 4) == int(2 * 4096 * (1.8 * 736 + 4096))


def test_memory_preflight_refuses_with_the_fix(tiny, monkeypatch):
    from evo2_cli.infer import memory

    estimate = memory.estimate_inference_memory(tiny, 1_000_000, 4096)
    assert estimate.kv_cache_bytes == 2 * 1_000_000 * 64 * 4
    monkeypatch.setattr(memory, "available_memory", lambda device: 100 * 2**20)
    with pytest.raises(InputError) as caught:
        memory.check_inference_memory(estimate, torch.device("cpu"))
    text = " ".join(str(caught.value).split())
    for fragment in (
        "1,000,000 tokens",
        "KV cache 488.28 MiB",
        "100.00 MiB free on cpu",
        "--chunk",
        "--mode windows",
    ):
        assert fragment in text
