"""Parts of `evo2 train` that need no model: windows, loss weights, schedule, guard, checkpoint files."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evo2_cli.config import build_config, to_yaml
from evo2_cli.data.alphabet import EOD_ID, reverse_complement
from evo2_cli.data.indexed import IndexedDataset, IndexedDatasetWriter
from evo2_cli.errors import ConfigError, Evo2Error, InputError
from evo2_cli.model import StripedHyena, load_model, preset_config
from evo2_cli.model.checkpoint import latest_checkpoint, step_dirs, write_model_files
from evo2_cli.runtime import Runtime
from evo2_cli.train.checkpoint import RunDirectory, verify_checkpoint, write_checkpoint
from evo2_cli.train.config import GuardSection, OptimSection, TrainJob
from evo2_cli.train.data import TRAIN_STREAM, WindowSampler, resolve_split, token_losses
from evo2_cli.train.guard import GradientGuard, GuardState
from evo2_cli.train.loop import micro_batches_per_process
from evo2_cli.train.optim import learning_rate
from evo2_cli.train.step import backward_global_batch


def write_dataset(prefix: Path, documents: list[bytes]) -> Path:
    with IndexedDatasetWriter(prefix) as writer:
        for doc in documents:
            writer.add_document(np.frombuffer(doc, dtype=np.uint8))
    return prefix


def sampler(prefixes, seq_len=16, weights=None, **kwargs) -> WindowSampler:
    weights = weights or [1.0] * len(prefixes)
    return WindowSampler(
        [IndexedDataset(p) for p in prefixes], weights, seq_len, seed=7, stream=TRAIN_STREAM, **kwargs
    )


# ---------------------------------------------------------------- windows


def test_windows_depend_only_on_seed_and_index(tmp_path):
    rng = np.random.default_rng(0)
    doc = bytes(rng.choice(list(b"ACGT"), 4000).astype(np.uint8))
    prefix = write_dataset(tmp_path / "a_train", [doc])
    first, second = sampler([prefix]), sampler([prefix])
    for index in (0, 1, 999, 123456789):
        np.testing.assert_array_equal(first.window(index)[0], second.window(index)[0])
    assert not np.array_equal(first.window(0)[0], first.window(1)[0])
    assert len(first.window(5)[0]) == 17
    other_seed = WindowSampler([IndexedDataset(prefix)], [1.0], 16, seed=8, stream=TRAIN_STREAM)
    assert not np.array_equal(first.window(0)[0], other_seed.window(0)[0])


def test_blend_weights_pick_datasets_in_proportion(tmp_path):
    a = write_dataset(tmp_path / "a_train", [b"A" * 500])
    c = write_dataset(tmp_path / "c_train", [b"C" * 500])
    blend = sampler([a, c], weights=[3.0, 1.0])
    from_a = sum(blend.window(i)[0][0] == ord("A") for i in range(2000))
    assert 0.72 < from_a / 2000 < 0.78


def test_uppercase_lowercase_weight_and_eod(tmp_path):
    doc = b"ACGTacgtACGTacgtACGT"
    prefix = write_dataset(tmp_path / "d_train", [doc + b"\x00"])
    windows = sampler([prefix], seq_len=20, lowercase_weight=0.1)  # the whole dataset is one window
    batch = windows.batch([0])
    raw = np.frombuffer(doc + b"\x00", np.uint8)
    assert bytes(batch.input_ids[0].numpy().astype(np.uint8)) == b"ACGTACGTACGTACGTACGT"
    assert bytes(batch.labels[0].numpy().astype(np.uint8)) == b"CGTACGTACGTACGTACGT\x00"
    expected = np.where(np.char.islower(np.array(list(raw[1:].tobytes().decode())).astype(str)), 0.1, 1.0)
    np.testing.assert_allclose(batch.loss_weights[0].numpy(), expected)
    assert batch.labels[0, -1] == EOD_ID and batch.loss_weights[0, -1] == 1.0
    assert not batch.counts_as_base[0, -1] and batch.counts_as_base[0, :-1].all()


def test_the_objective_is_the_weighted_mean_over_the_whole_global_batch(tmp_path):
    prefix = write_dataset(tmp_path / "d_train", [b"ACGTACGTACGTACGTacgtacgtACGTACgtAC"])
    windows = sampler([prefix], seq_len=8, lowercase_weight=0.1)
    micro = [windows.batch([0, 1]), windows.batch([2])]  # unequal sizes and weights
    torch.manual_seed(0)
    model = torch.nn.Embedding(512, 512)  # logits = a row per input token: a different NLL per position

    sums = backward_global_batch(model, micro, Runtime(torch.device("cpu")))
    grad = model.weight.grad.clone()

    model.weight.grad = None
    nll = torch.cat([token_losses(model(b.input_ids), b.labels) for b in micro])
    weights = torch.cat([b.loss_weights for b in micro])
    assert 0.1 in weights and len(set(weights.sum(1).tolist())) > 1  # the test can tell the two means apart
    objective = (nll * weights).sum() / weights.sum()
    objective.backward()
    assert sums[0].item() == pytest.approx(objective.item(), abs=1e-6)
    torch.testing.assert_close(grad, model.weight.grad)
    bases = torch.cat([b.counts_as_base for b in micro])
    assert sums[2].item() == bases.sum().item() and sums[1].item() == pytest.approx(
        (nll * bases).sum().item()
    )


def test_tags_are_masked_pipes_included_even_when_cut(tmp_path):
    tag = b"|d__Bacteria;p__Pseudomonadota;s__coli|"
    doc = tag + b"ACGTACGTAC" + tag + b"GGCCAATT"
    prefix = write_dataset(tmp_path / "t_train", [doc])
    windows = sampler([prefix], seq_len=len(doc) - 1)
    batch = windows.batch([0])
    labels = bytes(batch.labels[0].numpy().astype(np.uint8))
    masked = batch.loss_weights[0].numpy() == 0
    in_tag = np.zeros(len(doc), bool)
    for start in (0, len(tag) + 10):
        in_tag[start : start + len(tag)] = True
    np.testing.assert_array_equal(masked, in_tag[1:])
    assert labels.endswith(b"GGCCAATT") and not masked[-8:].any()
    # A window that starts inside a tag still sees it as a tag (context is read around the window).
    short = sampler([prefix], seq_len=12)
    for index in range(200):
        window, tags = short.window(index)
        text = bytes(window)
        if text[0] in b"d_;Bacter" and b"|" in text:
            cut = text.index(b"|")
            assert tags[: cut + 1].all()


def test_reverse_complement_flip(tmp_path):
    rng = np.random.default_rng(1)
    doc = bytes(rng.choice(list(b"ACGTacgt"), 3000).astype(np.uint8))
    prefix = write_dataset(tmp_path / "r_train", [doc])
    plain, flipped = sampler([prefix]), sampler([prefix], reverse_complement_prob=1.0)
    for index in range(5):
        np.testing.assert_array_equal(flipped.window(index)[0], reverse_complement(plain.window(index)[0]))


def test_bad_datasets_are_input_errors(tmp_path):
    short = write_dataset(tmp_path / "s_train", [b"ACGT"])
    with pytest.raises(InputError, match="shorter than one window"):
        sampler([short], seq_len=16)
    empty = write_dataset(tmp_path / "e_train", [])
    with pytest.raises(InputError, match="0 tokens, shorter than one window"):
        sampler([empty])
    no_bin = write_dataset(tmp_path / "n_train", [b"ACGT" * 10])
    Path(f"{no_bin}.bin").unlink()
    with pytest.raises(InputError, match=r"n_train\.bin: not found"):
        sampler([no_bin])
    with pytest.raises(InputError, match="not found"):
        sampler([tmp_path / "missing_train"])
    corrupt = write_dataset(tmp_path / "c_train", [b"ACGT" * 10])
    Path(f"{corrupt}.idx").write_bytes(b"garbage!")
    with pytest.raises(InputError):
        sampler([corrupt])
    with pytest.raises(InputError, match="neither a directory nor a prefix"):
        resolve_split(tmp_path / "nothing", "train")
    (tmp_path / "out").mkdir()
    write_dataset(tmp_path / "out" / "x_train", [b"ACGT"])
    assert resolve_split(tmp_path / "out", "train") == tmp_path / "out" / "x_train"
    assert resolve_split(tmp_path / "s", "train") == tmp_path / "s_train"
    with pytest.raises(InputError, match=r"'\*_val.idx'"):
        resolve_split(tmp_path / "out", "val")


# ---------------------------------------------------------------- schedule and guard


def test_learning_rate_schedule():
    cfg = OptimSection(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert learning_rate(0, cfg, 110) == pytest.approx(1e-4)
    assert learning_rate(9, cfg, 110) == pytest.approx(1e-3)
    assert learning_rate(60, cfg, 110) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert learning_rate(110, cfg, 110) == pytest.approx(1e-4)
    assert learning_rate(500, cfg, 110) == pytest.approx(1e-4)


def test_guard_skips_non_finite_and_spikes_then_asks_for_rollback():
    guard = GradientGuard(GuardSection(spike_factor=5, warmup_steps=3, median_window=4, max_bad_steps=2))
    for norm in (1.0, 2.0, 1.5):
        assert guard.assess(1.0, norm).apply_step
    verdict = guard.assess(1.0, 7.0)  # below 5 x median 1.5
    assert verdict.apply_step and verdict.threshold == pytest.approx(7.5)
    spike = guard.assess(1.0, 50.0)
    assert not spike.apply_step and spike.problem == "spike" and not spike.roll_back
    assert guard.assess(math.nan, 1.0).problem == "non-finite"
    assert guard.state.consecutive_bad == 2
    assert guard.assess(1.0, math.inf).roll_back
    # back to the state saved with the checkpoint, one rollback more at half the lr
    saved = GuardState(good_norms=[1.0, 2.0], consecutive_bad=1, rollbacks=0, lr_scale=1.0)
    assert guard.rolled_back(saved)
    assert guard.state == GuardState(good_norms=[1.0, 2.0], consecutive_bad=0, rollbacks=1, lr_scale=0.5)
    assert saved.rollbacks == 0 and saved.consecutive_bad == 1  # the checkpoint's state is not changed
    # a full max_bad_steps again before the next rollback, though the checkpoint was saved after a bad step
    assert not guard.assess(math.nan, 1.0).roll_back
    assert guard.assess(math.nan, 1.0).roll_back


def test_guard_gives_up_after_the_rollback_budget():
    guard = GradientGuard(GuardSection(max_rollbacks=1))
    assert guard.rolled_back(GuardState())
    assert guard.state.rollbacks == 1 and guard.state.lr_scale == 0.5
    assert not guard.rolled_back(GuardState(rollbacks=0, lr_scale=1.0))  # the count carries over the restore
    assert guard.state.rollbacks == 2 and guard.state.lr_scale == 0.25


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        build_config(TrainJob, {"optim": {"lr": 0}})
    with pytest.raises(ConfigError, match="global_batch"):
        build_config(TrainJob, {"optim": {"global_batch": 6}, "train": {"micro_batch": 4}})
    job = build_config(
        TrainJob, {"model": {"preset": "test"}, "data": {"datasets": [{"path": "x", "weight": 2}]}}
    )
    assert job.model.hidden_size == 8 and job.data.datasets[0].weight == 2.0


# ---------------------------------------------------------------- checkpoint files


def toy_model_files(directory: Path, meta: dict) -> None:
    write_model_files(StripedHyena(preset_config("test")), directory, meta=meta)


def save(run_dir: Path, step: int, keep_last=2, is_best=False, write_model=toy_model_files) -> Path:
    state = {"loop": {"step": step}, "optimizer": {"state": {"w": {"exp_avg": torch.ones(2)}}}}
    return write_checkpoint(run_dir, step, write_model, state, {"tokens_seen": 1}, keep_last, is_best)


def test_checkpoints_rotate_keep_best_and_point_latest(tmp_path):
    for step in (0, 10, 20):
        save(tmp_path, step, is_best=step == 10)
    for step in (30, 40):
        save(tmp_path, step)
    names = [p.name for p in step_dirs(tmp_path)]
    assert names == ["step_00000010", "step_00000030", "step_00000040"]
    assert latest_checkpoint(tmp_path).name == "step_00000040"
    assert (tmp_path / "checkpoints" / "best").resolve().name == "step_00000010"
    meta = verify_checkpoint(tmp_path / "checkpoints" / "latest")
    assert meta["step"] == 40 and set(meta["files"]) == {"model.safetensors", "train_state.pt", "config.yaml"}
    assert load_model(tmp_path / "checkpoints").config.hidden_size == 8  # the model package reads it
    state = torch.load(tmp_path / "checkpoints" / "latest" / "train_state.pt", weights_only=True)
    assert state["loop"]["step"] == 40
    (tmp_path / "checkpoints" / "step_00000040" / "model.safetensors").write_bytes(b"flipped")
    with pytest.raises(InputError, match="sha256"):
        verify_checkpoint(tmp_path / "checkpoints" / "step_00000040")


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path):
    save(tmp_path, 5)

    def full_disk(directory: Path, meta: dict) -> None:
        (directory / "model.safetensors").write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(
        Evo2Error,
        match=r"no space left on device \(.* bytes free .*\); the previous checkpoint .*step_00000005 is",
    ):
        save(tmp_path, 6, write_model=full_disk)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.is_symlink()] == ["step_00000005"]
    assert latest_checkpoint(tmp_path).name == "step_00000005"
    verify_checkpoint(latest_checkpoint(tmp_path))


def claim_run_dir(run_dir, job, overwrite):
    with RunDirectory(run_dir, overwrite, print) as run:
        run.starting_checkpoint("auto", job)
        run.claim(to_yaml(job))
        run.committed()


TEST_RUN = {"model": {"preset": "test"}, "data": {"datasets": [{"path": "dataset"}]}}


def test_run_dir_of_another_config_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    job = build_config(TrainJob, TEST_RUN)
    claim_run_dir(run_dir, job, overwrite=False)
    claim_run_dir(run_dir, job, overwrite=False)  # same identity: fine
    longer = build_config(TrainJob, {**TEST_RUN, "train": {"max_steps": 5000}})
    claim_run_dir(run_dir, longer, overwrite=False)  # run control may change
    other = build_config(TrainJob, {**TEST_RUN, "optim": {"lr": 1e-2}})
    with pytest.raises(InputError, match=r"different config \(optim.lr differ\); pass --overwrite"):
        claim_run_dir(run_dir, other, overwrite=False)
    (run_dir / "metrics.jsonl").write_text("")
    claim_run_dir(run_dir, other, overwrite=True)
    assert not (run_dir / "metrics.jsonl").exists()
    # A file evo2 did not write: the directory is not replaced, and no flag is offered to force it.
    (run_dir / "keep.txt").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="not a training run directory written by evo2") as caught:
            claim_run_dir(run_dir, job, overwrite=overwrite)
        assert "--overwrite" not in str(caught.value) and "keep.txt" in str(caught.value)
    assert (run_dir / "keep.txt").read_text() == "x"
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"no config\.yaml"):
        claim_run_dir(stranger, job, overwrite=False)
    assert json.dumps(job.identity())  # plain data


# ---------------------------------------------------------------- optimizer, BioNeMo datasets, logging


def test_weight_decay_only_on_matrices_of_projections_mlp_and_attention():
    from evo2_cli.train.optim import build_optimizer

    model = StripedHyena(preset_config("test"))
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, OptimSection(weight_decay=0.1))
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    matrix = ("projections.weight", "out_filter_dense.weight", "mlp.l1.weight", "mlp.l2.weight")
    matrix += ("mlp.l3.weight", "attn.Wqkv.weight", "attn.out_proj.weight")
    assert decayed == {n for n in names.values() if n.endswith(matrix)}
    assert plain == set(names.values()) - decayed  # norms, biases, embedding, every filter parameter
    assert {"embedding_layer.weight", "norm.scale", "blocks.2.filter.p", "blocks.1.filter.h"} <= plain
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_bionemo_datasets_train_like_ours(tmp_path):
    """`preprocess_evo2` names its files PREFIX_byte-level_{train,val,test} and may store int32 tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(3)
    documents = [rng.choice(list(b"ACGTacgt"), 300).astype(np.uint8) for _ in range(3)]
    (tmp_path / "bionemo").mkdir()
    for split in ("train", "val", "test"):
        builder = IndexedDatasetBuilder(
            str(tmp_path / "bionemo" / f"promoters_byte-level_{split}.bin"), np.int32
        )
        for doc in documents:
            builder.add_item(torch.from_numpy(np.append(doc, EOD_ID).astype(np.int32)))
            builder.end_document()
        builder.finalize(str(tmp_path / "bionemo" / f"promoters_byte-level_{split}.idx"))
    ours = write_dataset(tmp_path / "ours_train", [bytes(d) + b"\x00" for d in documents])
    theirs = resolve_split(tmp_path / "bionemo", "train")
    assert theirs.name == "promoters_byte-level_train"
    a, b = sampler([ours]).batch(range(8)), sampler([theirs]).batch(range(8))
    for field_name in ("input_ids", "labels", "loss_weights", "counts_as_base"):
        torch.testing.assert_close(getattr(a, field_name), getattr(b, field_name))


def write_nucleotide_tokenizer_dataset(directory: Path, documents: list[bytes]) -> Path:
    """BioNeMo's current recipe: PREFIX_nucleotide_fast_tokenizer_256_{split}.bin/.idx, uint16 ids (megatron's
    choice for a vocab this small); the DNA bytes keep their ids, 0-4 are special tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    directory.mkdir()
    prefix = directory / "og2_nucleotide_fast_tokenizer_256"
    for split in ("train", "val", "test"):
        builder = IndexedDatasetBuilder(f"{prefix}_{split}.bin", np.uint16)
        for doc in documents:
            builder.add_item(torch.from_numpy(np.frombuffer(doc, np.uint8).astype(np.int32)))
            builder.end_document()
        builder.finalize(f"{prefix}_{split}.idx")
    return prefix


def test_bionemo_nucleotide_tokenizer_datasets_are_found_and_their_special_ids_are_not_bases(tmp_path):
    rng = np.random.default_rng(4)
    # id 2 opens each document and 0 ends it: both label positions weigh 1 but are not bases
    documents = [
        b"\x02" + bytes(rng.choice(list(b"ACGTacgt"), 40).astype(np.uint8)) + b"\x00" for _ in range(3)
    ]
    prefix = write_nucleotide_tokenizer_dataset(tmp_path / "bionemo", documents)
    ours = write_dataset(tmp_path / "ours_train", documents)
    for given in (tmp_path / "bionemo", prefix):  # the directory, or the prefix before _{split}
        assert resolve_split(given, "train") == Path(f"{prefix}_train")
        assert resolve_split(given, "val") == Path(f"{prefix}_val")
    a, b = sampler([ours]).batch(range(16)), sampler([Path(f"{prefix}_train")]).batch(range(16))
    for field_name in ("input_ids", "labels", "loss_weights", "counts_as_base"):
        torch.testing.assert_close(getattr(a, field_name), getattr(b, field_name))
    special = b.labels < 5
    assert special.any() and (b.labels == 2).any()
    assert not b.counts_as_base[special].any() and (b.loss_weights[special] == 1).all()
    assert b.counts_as_base[~special].all()


def test_metrics_log_writes_jsonl_and_tensorboard_scalars(tmp_path, monkeypatch):
    import sys
    import types

    from evo2_cli.train.metrics import MetricsLog

    scalars = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional)
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter)
    )
    log = MetricsLog(tmp_path, tensorboard=True)
    assert log.writer.log_dir == str(tmp_path / "tensorboard")
    log.write({"kind": "train", "step": 5, "loss": 1.5, "skipped": False})
    log.write({"kind": "val", "step": 5, "val_loss": 1.25})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"kind": "train", "step": 5, "loss": 1.5, "skipped": False},
        {"kind": "val", "step": 5, "val_loss": 1.25},
    ]
    assert scalars == [
        ("train/loss", 1.5, 5),
        ("train/skipped", False, 5),
        ("val/val_loss", 1.25, 5),
        "closed",
    ]

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed: jsonl only
    assert MetricsLog(tmp_path, tensorboard=True).writer is None


def test_peak_flops_prefers_the_configured_value_then_a_measurement():
    from evo2_cli.train.metrics import MATMUL_PROBES, PeakFlops, peak_flops

    assert peak_flops(torch.device("cpu"), bf16=False, configured=1e12) == PeakFlops(1e12, "train.peak_flops")
    rng_before = torch.get_rng_state()
    measured = peak_flops(torch.device("cpu"), bf16=False, configured=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the probe draws nothing from the global RNG
    assert 1e8 < measured.flops < 1e14
    assert measured.source.startswith(f"best of {MATMUL_PROBES} fp32 matmul probes")


def test_matmul_probe_reports_the_fastest_of_its_runs(monkeypatch):
    """A busy machine makes some runs slow; the peak is the fastest run, not the first or the mean."""
    from evo2_cli.train import metrics

    readings = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0, 30.0, 34.0])  # (start, stop) pairs: 3, 1, 2, 4 s
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(readings))
    assert metrics.measure_matmul_flops(size=8, probes=4) == 2 * 8**3 / 1.0


def test_memory_estimate_per_process_under_ddp_and_fsdp2():
    from evo2_cli.train.memory import estimate_memory, fake_mode

    with fake_mode():
        model = StripedHyena(preset_config("test"))  # 7,628 parameters: blocks of 764/1256/840/664, root 4104
        alone, ddp, fsdp = (
            estimate_memory(model, 2, 32, **kwargs)
            for kwargs in ({}, {"processes": 4}, {"processes": 4, "parallelism": "fsdp"})
        )
    fields = ("weight_bytes", "gradient_bytes", "optimizer_bytes", "parallel_bytes")
    assert [getattr(alone, f) for f in fields] == [4 * 7628, 4 * 7628, 8 * 7628, 0]
    assert [getattr(ddp, f) for f in fields] == [4 * 7628, 4 * 7628, 8 * 7628, 4 * 7628]  # + DDP's buckets
    # FSDP2: a quarter each, plus two gathered blocks (the largest), the root's own and one block's gradients
    assert [getattr(fsdp, f) for f in fields] == [7628, 7628, 2 * 7628, 4 * (2 * 1256 + 4104 + 1256)]
    assert alone.activation_bytes == ddp.activation_bytes == fsdp.activation_bytes > 0  # per process
    # the peak holds weights, AdamW state and parallel buffers, and the larger of activations and gradients
    assert alone.total_bytes == 12 * 7628 + max(alone.activation_bytes, 4 * 7628)
    assert fsdp.total_bytes == 3 * 7628 + fsdp.parallel_bytes + max(fsdp.activation_bytes, 7628)
    assert fsdp.layout == "FSDP2 over 4 processes" and ddp.layout == "DDP over 4 processes"
    assert "estimated memory per process (FSDP2 over 4 processes)" in fsdp.describe()


@pytest.mark.gpu
def test_rng_state_round_trips_the_cuda_generator():
    device = torch.device("cuda")
    runtime = Runtime(device)
    torch.manual_seed(5)
    saved = runtime.rng_state()
    expected = (torch.rand(3), torch.rand(3, device=device))
    torch.manual_seed(6)
    runtime.restore_rng_state(saved)
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, device=device), expected[1])


def test_example_configs_validate():
    from evo2_cli.config import load_config

    root = Path(__file__).resolve().parents[1] / "examples"
    job = load_config(TrainJob, root / "ecoli" / "train.yaml")
    assert job.model.hidden_size == 128 and job.data.seq_len == 1024


def test_the_global_batch_must_split_evenly_over_the_processes():
    assert micro_batches_per_process(8, 2, 2) == 2  # 4 micro-batches, 2 per process
    assert micro_batches_per_process(8, 2, 1) == 4
    with pytest.raises(
        InputError, match=r"global_batch=6 is not a multiple of train.micro_batch x processes = 2 x 2"
    ):
        micro_batches_per_process(6, 2, 2)  # 3 micro-batches over 2 processes


def test_step_watch_names_the_first_non_finite_output_in_forward_order():
    from evo2_cli.train.origin import StepWatch

    model = StripedHyena(preset_config("test"))
    watch = StepWatch(model)
    watch.start_step()
    watch.observe(1, torch.ones(3))
    watch.observe(5, torch.tensor([1.0, -math.inf]))  # -inf alone: its min is not finite
    watch.observe(2, torch.tensor([math.nan, 1.0]))
    assert watch.first_nonfinite_site() == watch.sites[5]
    watch.start_step()
    watch.observe(1, torch.ones(3))
    assert watch.first_nonfinite_site() is None
    watch.observe(1, torch.tensor([math.inf]))  # a later micro-batch of the same step
    assert watch.first_nonfinite_site() == watch.sites[1]
    model(torch.randint(0, 256, (1, 8))).sum().backward()
    assert watch.in_backward_order(["embedding_layer.weight", "blocks.3.mlp.l3.weight", "norm.scale"]) == [
        "norm.scale",
        "blocks.3.mlp.l3.weight",
        "embedding_layer.weight",  # tied: complete only when the input side adds its share
    ]
    watch.close()


def test_truncate_metrics_drops_a_half_written_last_line(tmp_path):
    from evo2_cli.train.checkpoint import truncate_metrics

    (tmp_path / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1}\n{"kind": "train", "step": 3}\n\n{"kind": "tra'  # kill -9 mid-write
    )
    truncate_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1}\n'


@pytest.mark.parametrize("name", ["RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"])
def test_a_non_integer_torchrun_variable_exits_2_naming_it(tmp_path, monkeypatch, name):
    """Once a ValueError traceback from int()."""
    from conftest import random_dataset
    from typer.testing import CliRunner

    from evo2_cli.cli import app

    prefix = random_dataset(tmp_path / "toy", 0, {"train": 400, "val": 200})
    monkeypatch.setenv(name, "two")
    args = ["train", "--set=model.preset=test", f"--set=data.datasets=[{{path: {prefix}}}]"]
    args += ["--set=data.seq_len=32", "--set=optim.global_batch=2", "--set=train.micro_batch=2"]
    args += ["--set=train.max_steps=1", f"--set=train.run_dir={tmp_path / 'run'}", "--device=cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"environment variable {name}='two' is not an integer" in " ".join(result.output.split())
