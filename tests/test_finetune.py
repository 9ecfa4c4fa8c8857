"""`evo2 finetune` on the `test` preset: full, frozen and LoRA runs through the training loop, resume, merge,
Vortex starting points (tiny fixture, evo2-1b layout on the meta device), memory estimate, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VORTEX_TINY, quiet, random_dataset
from safetensors.torch import load_file
from typer.testing import CliRunner

from evo2_cli.cli import app
from evo2_cli.config import build_config
from evo2_cli.data.fasta import read_fasta
from evo2_cli.data.indexed import IndexedDatasetWriter
from evo2_cli.errors import InputError
from evo2_cli.finetune import FinetuneJob, finetune, load_finetuned, merge, prepare
from evo2_cli.finetune.freeze import frozen_names
from evo2_cli.finetune.lora import LoRALinear
from evo2_cli.finetune.run import adapt
from evo2_cli.model import StripedHyena, load_model, load_vortex, preset_config, save_model
from evo2_cli.model.checkpoint import load_weights_into
from evo2_cli.model.vortex import vortex_expected_shapes
from evo2_cli.train.data import split_windows, token_losses
from evo2_cli.train.loop import StepInfo, TrainHooks
from evo2_cli.train.memory import estimate_memory, fake_mode

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "yersinia_pestis_pPCP1_NC_005816.fa"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The Y. pestis plasmid sample: its first 80% as train, the rest as val (prefix `yp`)."""
    root = tmp_path_factory.mktemp("yp")
    sequence = next(iter(read_fasta(SAMPLE))).sequence
    tokens = np.frombuffer(sequence, dtype=np.uint8)
    cut = int(len(tokens) * 0.8)
    for split, part in (("train", tokens[:cut]), ("val", tokens[cut:])):
        with IndexedDatasetWriter(root / f"yp_{split}") as writer:
            writer.add_document(np.concatenate([part, [0]]).astype(np.uint8))
    return root / "yp"


def make_job(dataset: Path, start: Path, run_dir: Path, **finetune) -> FinetuneJob:
    raw = {
        "data": {"datasets": [{"path": str(dataset)}], "seq_len": 64, "val_windows": 8},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "global_batch": 4, "weight_decay": 0.0},
        "train": {
            "run_dir": str(run_dir),
            "max_steps": 8,
            "micro_batch": 4,
            "log_interval": 1,
            "eval_interval": 4,
            "save_interval": 4,
            "device": "cpu",
        },
        "finetune": {"init_from": str(start), **finetune},
    }
    return build_config(FinetuneJob, raw)


def val_loss(model: torch.nn.Module, dataset: Path, job: FinetuneJob) -> float:
    """The loop's validation objective over the same fixed val windows."""
    batch = split_windows(job.data, "val", job.train.seed).batch(range(job.data.val_windows))
    with torch.no_grad():
        nll = token_losses(model(batch.input_ids), batch.labels)
    return ((nll * batch.loss_weights).sum() / batch.loss_weights.sum()).item()


def test_full_finetune_lowers_the_validation_loss(dataset, base, tmp_path):
    job = make_job(dataset, base, tmp_path / "run")
    before = val_loss(load_model(base), dataset, job)
    result = finetune(job, console=quiet())
    assert result.step == 8
    after = val_loss(load_model(result.checkpoint), dataset, job)  # a plain checkpoint: load_model reads it
    assert result.last_val["val_loss"] == pytest.approx(after, abs=1e-5)
    assert after < before - 0.3


def test_lora_trains_only_the_adapters_and_merges_to_the_same_logits(dataset, base, tmp_path):
    job = make_job(
        dataset, base, tmp_path / "run", method="lora", lora={"rank": 2, "targets": ["mlp", "Wqkv"]}
    )
    prepared = prepare(job)
    assert prepared.trainable == {
        n for n, _ in prepared.model.named_parameters() if n.endswith(("lora_A", "lora_B"))
    }
    assert prepared.estimate.trainable == 4 * (2 * (8 + 16) + 2 * (16 + 8) + 2 * (16 + 8)) + 2 * (8 + 24)
    result = finetune(job, console=quiet())
    start = load_model(base).state_dict()
    adapted = load_finetuned(result.checkpoint)
    weights = adapted.state_dict()
    before, after = val_loss(load_model(base), dataset, job), val_loss(adapted, dataset, job)
    assert after < before - 0.15  # 6.06 -> 5.83 in 8 steps of rank-2 adapters
    for name, value in start.items():
        assert torch.equal(weights[name], value), name  # frozen weights: bit-identical
    assert all(weights[n].abs().sum() > 0 for n in weights if n.endswith("lora_B"))  # adapters moved

    merged_dir = tmp_path / "merged"
    _, layers = merge(result.checkpoint, merged_dir, vortex=tmp_path / "ft.pt")
    assert layers == 4 * 3 + 1
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = adapted(ids)
        torch.testing.assert_close(load_model(merged_dir)(ids), reference, rtol=0, atol=1e-5)
        exported = load_vortex(tmp_path / "ft.yml", tmp_path / "ft.pt")  # the official engine's layout
        torch.testing.assert_close(exported(ids), reference, rtol=0, atol=1e-5)


def test_lora_run_resumes_exactly(dataset, base, tmp_path):
    lora = {"method": "lora", "lora": {"rank": 4, "dropout": 0.1, "targets": ["mlp", "projections"]}}
    reference = finetune(make_job(dataset, base, tmp_path / "straight", **lora), console=quiet()).losses

    def stop_after_second_step(info: StepInfo) -> None:
        if info.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    job = make_job(dataset, base, tmp_path / "resumed", **lora)
    first = finetune(job, hooks=TrainHooks(after_step=stop_after_second_step), console=quiet())
    assert first.stop_reason == "signal" and first.step == 3
    second = finetune(job, console=quiet())
    assert first.losses + second.losses == reference  # bit for bit: dropout masks included


def test_partial_freeze_keeps_the_selected_weights(dataset, base, tmp_path):
    job = make_job(dataset, base, tmp_path / "run", freeze=["embedding", "blocks.0-1", "filters"])
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, max_steps=2, eval_interval=0))
    result = finetune(job, console=quiet())
    start, after = load_model(base).state_dict(), load_model(result.checkpoint).state_dict()
    frozen = frozen_names(load_model(base), ["embedding", "blocks.0-1", "filters"])
    assert "blocks.2.filter.p" in frozen and "blocks.3.attn.Wqkv.weight" not in frozen
    for name in start:
        assert torch.equal(start[name], after[name]) == (name in frozen), name


def test_freeze_selectors_and_their_errors(base):
    model = load_model(base)
    names = {n for n, _ in model.named_parameters()}
    assert frozen_names(model, ["blocks.*.mlp"]) == {n for n in names if ".mlp." in n}
    assert frozen_names(model, ["blocks.3.attn.out_proj"]) == {
        "blocks.3.attn.out_proj.weight",
        "blocks.3.attn.out_proj.bias",
    }
    assert frozen_names(model, ["attention"]) == frozen_names(model, ["blocks.3.attn"])
    with pytest.raises(InputError, match="matches no parameter"):
        frozen_names(model, ["blocks.4-9"])
    with pytest.raises(InputError, match="does not parse"):
        frozen_names(model, ["block0"])


def test_vortex_fixture_is_a_starting_point(dataset, tmp_path):
    weights = tmp_path / "tiny.pt"
    shutil.copy(VORTEX_TINY / "state_dict_checkpoint_layout.pt", weights)
    shutil.copy(VORTEX_TINY / "tiny_config.yml", tmp_path / "tiny.yml")  # found beside the .pt
    job = make_job(dataset, weights, tmp_path / "run", method="lora")
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, max_steps=1, eval_interval=0))
    prepared = prepare(job)
    reference = load_vortex(tmp_path / "tiny.yml", weights)
    ids = torch.load(VORTEX_TINY / "input_ids.pt", weights_only=True).reshape(1, -1)[:, :32].long()
    with torch.no_grad():  # adapters start at B = 0: the adapted model is the imported model
        torch.testing.assert_close(prepared.model(ids), reference(ids), rtol=0, atol=0)
    assert prepared.job.model.hidden_size == 64
    assert finetune(job, console=quiet()).step == 1


def test_evo2_1b_layout_on_the_meta_device(tmp_path):
    """The same loading and adapting path on an evo2-1b-layout .pt whose big tensors are meta (no data)."""
    config = preset_config("evo2-1b")
    tensors = {k: torch.empty(shape, device="meta") for k, shape in vortex_expected_shapes(config).items()}
    for key, shape in vortex_expected_shapes(config).items():  # the few tensors the importer inspects
        if key.endswith("log_poles"):
            tensors[key] = -torch.rand(shape) - 0.01
        elif key.endswith("inv_freq"):
            tensors[key] = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    torch.save(tensors, tmp_path / "evo2-1b.pt")
    (tmp_path / "release.yml").write_text(
        "model_name: evo2-1b\n"
        "hidden_size: 1920\nnum_layers: 25\nnum_filters: 1920\nnum_attention_heads: 15\n"
        "inner_mlp_size: 5120\n"
        "hcs_layer_idxs: [0, 4, 7, 11, 14, 18, 21]\nhcm_layer_idxs: [1, 5, 8, 12, 15, 19, 22]\n"
        "hcl_layer_idxs: [2, 6, 9, 13, 16, 20, 23]\nattn_layer_idxs: [3, 10, 17, 24]\n"
        "hcs_filter_groups: 128\nhcm_filter_groups: 128\nhcs_filter_length: 7\nhcm_filter_length: 128\n"
        "short_filter_length: 3\nstate_size: 16\nrotary_emb_base: 10000\neps: 0.000001\nvocab_size: 512\n"
        "tie_embeddings: true\nevo2_style_activations: true\nmlp_activation: gelu\n"
    )
    job = build_config(
        FinetuneJob,
        {
            "data": {"datasets": [{"path": "unused"}], "seq_len": 1024},
            "optim": {"global_batch": 1},
            "train": {"device": "cpu", "micro_batch": 1},
            "finetune": {
                "init_from": str(tmp_path / "evo2-1b.pt"),
                "init_config": str(tmp_path / "release.yml"),  # not beside the .pt: named explicitly
                "method": "lora",
            },
        },
    )
    prepared = prepare(job)
    assert prepared.job.model.layout == config.layout
    # Vortex's 1,107,989,760 (inv_freq excluded) + hcl poles in the modal form: p and gamma for log_poles
    assert prepared.estimate.parameters - prepared.estimate.adapters == 1_107_989_760 + 7 * 1920 * 16
    # rank 8 on projections + out_filter_dense (21 hyena blocks) and Wqkv + out_proj (4 attention blocks)
    assert prepared.estimate.adapters == 25 * 8 * (1920 + 3 * 1920 + 1920 + 1920) == 2_304_000
    assert prepared.estimate.trainable == prepared.estimate.adapters
    lora_layers = [m for m in prepared.model.modules() if isinstance(m, LoRALinear)]
    assert len(lora_layers) == 50 and lora_layers[0].weight.is_meta
    # fp32 on CPU: 4.16 GiB of weights, adapters + AdamW, and 3.29 MiB of saved activations per token
    assert prepared.estimate.static_bytes == 4_469_683_200
    # Activations follow what the model saves for backward: 2% leaves room for refactors of model.py, not for
    # a missing or doubled block (4% each) or a wrong dtype.
    assert prepared.estimate.activation_bytes == pytest.approx(3_527_892_996, rel=0.02)  # 3.29 GiB

    # The documented CUDA budget (docs/finetune.md): frozen matmul weights bf16, filters, norms and the
    # embedding fp32, fp32 adapters + AdamW; bf16 autocast activations.
    with fake_mode():
        skeleton, _ = adapt(StripedHyena(config), job, low_precision=True)
        dtypes = {name: p.dtype for name, p in skeleton.named_parameters()}
        estimate = estimate_memory(skeleton, 1, 1024, bf16_autocast=True)
        checkpointed = estimate_memory(skeleton, 1, 1024, bf16_autocast=True, activation_checkpointing=True)
    assert dtypes["blocks.0.projections.weight"] == dtypes["blocks.3.attn.Wqkv.weight"] == torch.bfloat16
    assert dtypes["blocks.0.mlp.l1.weight"] == torch.bfloat16
    for name in ("blocks.2.filter.p", "blocks.1.filter.h", "blocks.0.filter.short_filter_weight"):
        assert dtypes[name] == torch.float32, name
    assert dtypes["embedding_layer.weight"] == dtypes["blocks.0.projections.lora_A"] == torch.float32
    assert estimate.static_bytes == estimate.weight_bytes + 12 * 2_304_000 == 2_257_843_200  # 2.10 GiB
    assert estimate.activation_bytes == pytest.approx(2_723_592_196, rel=0.02)  # 2.54 GiB
    assert checkpointed.activation_bytes == pytest.approx(339_918_852, rel=0.02)  # 0.32 GiB


def test_memory_estimate_refuses_what_does_not_fit(dataset, base, tmp_path):
    # 7,628 parameters x (4 weights + 8 AdamW) bytes = 89.39 KiB, + 1.26 MiB of activations (> gradients)
    job = make_job(dataset, base, tmp_path / "run")
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, memory_limit_gb=1e-6))
    expected = (
        r"this finetune needs about 1.35 MiB, more than the 1.05 KiB train.memory_limit_gb=1e-06: parameters "
        r"7,628 .* weights 29.80 KiB \+ AdamW state 59.59 KiB \+ the larger of gradients 29.80 KiB and "
        r"activations 1.26 MiB \(micro_batch 4 x seq_len 64\)\. Use method: lora"
    )
    with pytest.raises(InputError, match=expected):
        finetune(job, console=quiet())
    # 1 MiB: only activations miss
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, memory_limit_gb=1e-3))
    with pytest.raises(InputError, match=r"Lower train.micro_batch or data.seq_len, or set train.activation"):
        finetune(job, console=quiet())
    assert not (tmp_path / "run").exists()


def test_bad_input_exits_2_with_a_clear_message(dataset, base, tmp_path, monkeypatch):
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["finetune", *args])

    common = ["--set", f"data.datasets=[{{path: {dataset}}}]", "--set", f"train.run_dir={tmp_path / 'r'}"]
    common += ["--set", "train.device=cpu"]
    # the release YAML given where the weights go
    result = run("--from", str(VORTEX_TINY / "tiny_config.yml"), *common)
    assert result.exit_code == 2 and "goes to --init-config" in " ".join(result.output.split())
    # everything frozen
    result = run("--from", str(base), "--freeze", "embedding,norm,blocks.*", *common)
    assert result.exit_code == 2 and "freezes every parameter" in result.output
    result = run("--from", str(base), "--method", "lora", "--freeze", "embedding", *common)
    assert result.exit_code == 2 and "LoRA already freezes every base weight" in " ".join(
        result.output.split()
    )
    # a --from that reads as a YAML boolean or number is still a path
    monkeypatch.chdir(tmp_path)
    for name in ("yes", "2024"):
        result = run("--from", name, *common)
        assert result.exit_code == 2 and f"error: {name}: model not found" in result.output, result.output
    # a LoRA target that matches no module (this model has no attention layer)
    torch.manual_seed(0)
    save_model(StripedHyena(preset_config("test", layout="SDH")), tmp_path / "noattn")
    result = run(
        "--from",
        str(tmp_path / "noattn"),
        "--method",
        "lora",
        "--set",
        "finetune.lora.targets=[Wqkv]",
        *common,
    )
    assert result.exit_code == 2 and "'Wqkv' matches no linear layer" in result.output
    # checkpoint shapes that do not match the config
    torch.save(
        torch.load(VORTEX_TINY / "state_dict_checkpoint_layout.pt", weights_only=True), tmp_path / "w.pt"
    )
    (tmp_path / "w.yml").write_text((VORTEX_TINY / "tiny_config.yml").read_text().replace("176", "192"))
    result = run("--from", str(tmp_path / "w.pt"), *common)
    assert result.exit_code == 2 and "mlp.l1.weight' has shape (176, 64), expected (192, 64)" in result.output
    # a growing hcl mode (lambda >= 0) has no stable form: refused unless clamped
    tensors = torch.load(VORTEX_TINY / "state_dict_checkpoint_layout.pt", weights_only=True)
    pole = next(key for key in tensors if key.endswith("log_poles"))
    tensors[pole][0, 0, 0] = 0.5
    torch.save(tensors, tmp_path / "grows.pt")
    shutil.copy(VORTEX_TINY / "tiny_config.yml", tmp_path / "grows.yml")
    result = run("--from", str(tmp_path / "grows.pt"), *common)
    assert result.exit_code == 2 and "1 pole(s) with lambda >= 0" in result.output
    result = run("--from", str(tmp_path / "grows.pt"), "--clamp-poles", "0.5", *common)
    assert result.exit_code == 2 and "clamp_poles" in result.output and "must be negative" in result.output
    clamped = build_config(
        FinetuneJob,
        {
            "data": {"datasets": [{"path": "unused"}]},
            "train": {"device": "cpu"},
            "finetune": {"init_from": str(tmp_path / "grows.pt"), "clamp_poles": -0.01},
        },
    )
    with pytest.warns(UserWarning, match="clamped 1 pole"):
        poles = prepare(clamped).model.blocks[int(pole.split(".")[1])].filter.poles()
    assert poles[0, 0].item() == pytest.approx(-0.01) and (poles < 0).all()
    # a model section that contradicts the checkpoint
    result = run("--from", str(base), "--set", "model.preset=small", *common)
    assert result.exit_code == 2 and "does not match the starting checkpoint" in result.output
    # no starting point
    result = run(*common)
    assert result.exit_code == 2 and "finetune.init_from is not set" in result.output
    # a Vortex .pt without its release YAML, and a release YAML for one of our checkpoints
    shutil.copy(VORTEX_TINY / "state_dict_checkpoint_layout.pt", tmp_path / "alone.pt")
    result = run("--from", str(tmp_path / "alone.pt"), *common)
    assert (
        result.exit_code == 2 and "needs its release config YAML; set finetune.init_config" in result.output
    )
    result = run("--from", str(base), "--init-config", str(VORTEX_TINY / "tiny_config.yml"), *common)
    assert result.exit_code == 2 and "init_config is only for a Vortex .pt" in result.output


def test_cli_lora_finetune_then_merge(dataset, base, tmp_path):
    runner = CliRunner()
    config = REPO / "configs" / "finetune" / "lora.yaml"
    args = ["finetune", "-c", str(config), "--from", str(base), "--device", "cpu"]
    args += ["--set", f"data.datasets=[{{path: {dataset}}}]", "--set", f"train.run_dir={tmp_path / 'run'}"]
    args += ["--set", "data.seq_len=32", "--set", "train.max_steps=2", "--set", "data.val_windows=2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # printed before the first step: rank 8 on projections, out_filter_dense, Wqkv, out_proj of 4 blocks
    said = " ".join(result.output.split())  # rich wraps lines
    assert "parameters 9,164 (trainable 1,536 = 16.8%, LoRA adapters 1,536); estimated memory" in said
    assert "(micro_batch 4 x seq_len 32)" in said
    merge_args = ["finetune", "merge", str(tmp_path / "run"), "-o", str(tmp_path / "plain")]
    result = runner.invoke(app, [*merge_args, "--vortex", str(tmp_path / "ft.pt")])
    assert result.exit_code == 0, result.output
    merged = load_model(tmp_path / "plain")
    assert merged.num_parameters() == load_model(base).num_parameters()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(load_vortex(tmp_path / "ft.yml", tmp_path / "ft.pt")(ids), merged(ids))
    # A LoRA run directory is a starting point: its adapters are merged first, bit for bit as `merge` does.
    job = make_job(dataset, tmp_path / "run", tmp_path / "next")
    start = prepare(job).model.state_dict()
    for name, value in merged.state_dict().items():
        assert torch.equal(start[name], value), name


def test_lora_layer_computes_the_scaled_low_rank_update_and_merges_to_it():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=3.0, dropout=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer.lora_B, torch.zeros(5, 2)) and layer.scaling == 1.5
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(5, 2))
    x = torch.randn(3, 6)
    expected = x @ base.weight.T + base.bias + 1.5 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merged()(x), expected)
    # dropout applies to the adapter's input only; in eval mode it is the identity
    dropped = LoRALinear(base, rank=2, alpha=3.0, dropout=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dropped.lora_B.copy_(layer.lora_B)
    torch.testing.assert_close(dropped.eval()(x), expected)
    assert not torch.allclose(dropped.train()(x), expected)


@pytest.mark.gpu
def test_lora_on_cuda_holds_frozen_weights_in_bf16_and_filters_in_fp32(dataset, base, tmp_path):
    job = make_job(dataset, base, tmp_path / "run", method="lora")
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, device="cuda", max_steps=4))
    prepared = prepare(job)
    dtypes = {name: p.dtype for name, p in prepared.model.named_parameters()}
    assert dtypes["blocks.0.projections.weight"] == torch.bfloat16
    assert dtypes["blocks.2.filter.p"] == dtypes["blocks.0.projections.lora_A"] == torch.float32
    result = finetune(job, console=quiet())
    assert all(np.isfinite(result.losses))
    weights = load_finetuned(result.checkpoint).state_dict()
    for name, value in load_model(base).state_dict().items():
        # frozen matmul weights were held in bf16: the checkpoint has them rounded, nothing else changed
        expected = value.bfloat16().float() if dtypes.get(name) == torch.bfloat16 else value
        assert torch.equal(weights[name], expected), name


@pytest.mark.slow
def test_merged_lora_export_runs_in_the_official_engine(dataset, tmp_path, vtx_logits):
    """LoRA finetune -> merge -> Vortex .pt: vtx (the official engine, on CPU) gives our logits."""
    torch.manual_seed(0)
    config = preset_config("test", hcs_filter_groups=4, hcm_filter_groups=4, inner_mlp_size=40, state_size=16)
    save_model(StripedHyena(config), tmp_path / "base")
    job = make_job(
        dataset, tmp_path / "base", tmp_path / "run", method="lora", lora={"targets": ["mlp", "Wqkv"]}
    )
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, max_steps=4, eval_interval=0))
    result = finetune(job, console=quiet())
    merge(result.checkpoint, tmp_path / "merged", vortex=tmp_path / "ft.pt")
    ids = torch.randint(0, 512, (2, 77), generator=torch.Generator().manual_seed(3))
    theirs = vtx_logits(tmp_path / "ft.yml", tmp_path / "ft.pt", ids)
    with torch.no_grad():
        ours = load_finetuned(result.checkpoint)(ids)  # the adapted model, adapters unmerged
        moved = (load_model(tmp_path / "base")(ids) - ours).abs().max().item()
    assert moved > 1e-2, moved  # the adapters changed the logits, far beyond the tolerance below
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_a_missing_dataset_fails_before_the_weights_load(base, tmp_path, monkeypatch):
    from evo2_cli.finetune.run import StartingPoint

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the dataset was checked")

    monkeypatch.setattr(StartingPoint, "load", no_load)
    job = make_job(tmp_path / "nodata", base, tmp_path / "run")
    with pytest.raises(InputError, match="nodata: neither a directory nor a prefix"):
        finetune(job, console=quiet())
    assert not (tmp_path / "run").exists()


def test_cli_finetune_resume_refuses_changed_data_unless_allowed(base, tmp_path):
    def write_data(seed: int) -> None:  # same lengths (same .idx), other content
        random_dataset(tmp_path / "d", seed, {"train": 2000, "val": 2000}, terminated=False)

    write_data(1)
    args = ["finetune", "--from", str(base), "--device", "cpu", "--method", "lora"]
    args += [
        "--set",
        f"data.datasets=[{{path: {tmp_path / 'd'}}}]",
        "--set",
        f"train.run_dir={tmp_path / 'run'}",
    ]
    args += ["--set", "data.seq_len=32", "--set", "data.val_windows=2", "--set", "train.save_interval=1"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--set", "train.max_steps=1"])
    assert result.exit_code == 0, result.output
    write_data(2)
    result = runner.invoke(app, [*args, "--set", "train.max_steps=2"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "d_train.bin content differs" in said and "--allow-data-change" in said
    result = runner.invoke(app, [*args, "--set", "train.max_steps=2", "--allow-data-change"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- checkpoints of trained tensors only


def full_weight_checkpoints(monkeypatch) -> None:
    """Make finetune write what it wrote before adapter-only checkpoints: every tensor, no base."""
    from evo2_cli.finetune.run import Prepared
    from evo2_cli.model.checkpoint import write_model_files

    def write_everything(self, model, directory, **kwargs):
        write_model_files(model, directory, dtype=torch.float32, **kwargs)

    monkeypatch.setattr(Prepared, "write_model_files", write_everything)


def stored_keys(checkpoint: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", "pt") as handle:
        return set(handle.keys())


def said(output: str, *fragments: str) -> bool:
    squeezed = "".join(output.split())
    return all("".join(fragment.split()) in squeezed for fragment in fragments)


def test_lora_checkpoint_holds_the_adapters_and_resumes_and_merges_as_a_full_one(
    dataset, base, tmp_path, monkeypatch
):
    lora = {"method": "lora", "lora": {"rank": 4, "dropout": 0.1, "targets": ["mlp", "projections"]}}

    def stop_after_second_step(info: StepInfo) -> None:
        if info.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    job = make_job(dataset, base, tmp_path / "adapters", **lora)
    first = finetune(job, hooks=TrainHooks(after_step=stop_after_second_step), console=quiet())
    second = finetune(job, console=quiet())  # resumed from a checkpoint holding the adapters only
    adapters = {n for n in load_finetuned(second.checkpoint).state_dict() if n.endswith(("lora_A", "lora_B"))}
    assert stored_keys(second.checkpoint) == adapters and len(adapters) == 2 * (
        4 * 3 + 3
    )  # mlp l1-l3 of 4 blocks, 3 hyena projections
    meta = json.loads((second.checkpoint / "meta.json").read_text())
    recorded = json.loads((base / "meta.json").read_text())["files"]
    assert meta["base"]["kind"] == "checkpoint" and meta["base"]["path"] == str(base)
    assert meta["base"]["sha256"] == {n: recorded[n] for n in ("model.safetensors", "config.yaml")}
    assert meta["parameters"] == load_finetuned(second.checkpoint).num_parameters()

    full_weight_checkpoints(monkeypatch)  # the old checkpoints, from an uninterrupted run
    full = finetune(make_job(dataset, base, tmp_path / "full", **lora), console=quiet())
    assert stored_keys(full.checkpoint) > adapters
    assert first.losses + second.losses == full.losses  # bit for bit, dropout masks included
    ours, theirs = merge(second.checkpoint, tmp_path / "m1")[0], merge(full.checkpoint, tmp_path / "m2")[0]
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name


def test_frozen_finetune_checkpoint_is_read_by_every_loader(dataset, base, tmp_path, monkeypatch):
    freeze = ["embedding", "blocks.0-1", "filters"]
    job = make_job(dataset, base, tmp_path / "run", freeze=freeze)
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, max_steps=2, eval_interval=0))
    result = finetune(job, console=quiet())
    trained = set(load_model(base).state_dict()) - frozen_names(load_model(base), freeze)
    assert stored_keys(result.checkpoint) == trained
    full_weight_checkpoints(monkeypatch)
    full = finetune(dataclasses.replace(job, train=dataclasses.replace(job.train, run_dir=tmp_path / "full")))
    fresh = StripedHyena(preset_config("test"))  # `evo2 train --resume` of it: the base comes along
    load_weights_into(fresh, result.checkpoint)
    for name, value in load_model(full.checkpoint).state_dict().items():
        assert torch.equal(load_model(result.checkpoint).state_dict()[name], value), name
        assert torch.equal(fresh.state_dict()[name], value), name
    fasta = tmp_path / "s.fa"
    fasta.write_text(">s\nACGTTGCAAGGCTTACGATC\n")
    runner = CliRunner()
    for checkpoint, name in ((result.checkpoint, "ours"), (full.checkpoint, "full")):
        for args in (
            [
                "infer",
                "score",
                str(checkpoint),
                str(fasta),
                "--device=cpu",
                f"--output={tmp_path / name}.tsv",
            ],
            ["convert", "to-vortex", str(checkpoint), "-o", str(tmp_path / f"{name}.pt")],
        ):
            outcome = runner.invoke(app, args)
            assert outcome.exit_code == 0, outcome.output
    assert (tmp_path / "ours.tsv").read_text() == (tmp_path / "full.tsv").read_text()
    exported, reference = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("ours", "full"))
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[name], reference[name]) for name in reference)


def test_a_changed_or_moved_base_is_refused_with_exit_2(dataset, base, tmp_path):
    start = Path(shutil.copytree(base, tmp_path / "base"))
    job = make_job(dataset, start, tmp_path / "run", method="lora", lora={"rank": 2})
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, max_steps=1, eval_interval=0))
    checkpoint = finetune(job, console=quiet()).checkpoint
    runner = CliRunner()
    merge_args = ["finetune", "merge", str(checkpoint), "-o", str(tmp_path / "merged")]

    start.rename(tmp_path / "elsewhere")
    result = runner.invoke(app, merge_args)
    assert result.exit_code == 2 and said(result.output, f"its base {start} is gone", '"absolute"')
    meta_path = checkpoint / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["base"]["absolute"] = str(tmp_path / "elsewhere")  # the fix the message gives
    meta_path.write_text(json.dumps(meta))
    result = runner.invoke(app, merge_args)
    assert result.exit_code == 0, result.output

    weights = tmp_path / "elsewhere" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    data = [f"--set=data.datasets=[{{path: {dataset}}}]", f"--set=train.run_dir={tmp_path / 'next'}"]
    for args in (
        [*merge_args, "--overwrite"],
        ["finetune", "--from", str(checkpoint), "--device=cpu", *data],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert said(result.output, f"{weights}: the base of {checkpoint} changed", "--no-verify")
    # A base saved anew in place (its own hashes consistent): a resume refuses it too.
    shutil.rmtree(tmp_path / "elsewhere")
    torch.manual_seed(1)
    save_model(StripedHyena(preset_config("test")), start)
    with pytest.raises(InputError, match="changed since"):
        finetune(dataclasses.replace(job, train=dataclasses.replace(job.train, max_steps=2)), console=quiet())


def test_finetune_from_an_adapter_checkpoint_continues_it(dataset, base, tmp_path):
    lora = {"method": "lora", "lora": {"rank": 2, "targets": ["mlp"]}}
    job = make_job(dataset, base, tmp_path / "first", **lora)
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, max_steps=2, eval_interval=0))
    first = finetune(job, console=quiet())
    merged = merge(first.checkpoint, tmp_path / "merged")[0].state_dict()
    assert merged["blocks.0.mlp.l1.weight"].ne(load_model(base).state_dict()["blocks.0.mlp.l1.weight"]).any()
    job = dataclasses.replace(
        job,
        finetune=dataclasses.replace(job.finetune, init_from=tmp_path / "first"),
        train=dataclasses.replace(job.train, run_dir=tmp_path / "second"),
    )
    second = finetune(job, console=quiet())
    meta = json.loads((second.checkpoint / "meta.json").read_text())
    assert meta["base"]["path"] == str(first.checkpoint) and meta["base"]["lora_scaling"] == 8.0
    weights = load_finetuned(second.checkpoint).state_dict()  # base of a base: folded as merge folds
    for name, value in merged.items():
        assert torch.equal(weights[name], value), name


def test_an_adapter_checkpoint_on_a_vortex_base(dataset, tmp_path):
    weights = tmp_path / "tiny.pt"
    shutil.copy(VORTEX_TINY / "state_dict_checkpoint_layout.pt", weights)
    shutil.copy(VORTEX_TINY / "tiny_config.yml", tmp_path / "tiny.yml")
    job = make_job(dataset, weights, tmp_path / "run", method="lora")
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, max_steps=1, eval_interval=0))
    checkpoint = finetune(job, console=quiet()).checkpoint
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["base"]["kind"] == "vortex" and list(meta["base"]["sha256"]) == ["tiny.pt"]
    adapted = load_finetuned(checkpoint).state_dict()
    for name, value in load_vortex(tmp_path / "tiny.yml", weights).state_dict().items():
        assert torch.equal(adapted[name], value), name


def test_lora_under_fsdp2_estimates_one_process_share(dataset, base, tmp_path, monkeypatch):
    """Under torchrun with FSDP2 the pre-flight estimate is per process (the frozen base split over them), and
    only rank 0 prints it."""
    job = make_job(dataset, base, tmp_path / "run", method="lora", lora={"rank": 2})
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, parallelism="fsdp"))
    alone = prepare(job).estimate
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them
    monkeypatch.setenv("RANK", "1")
    console = quiet()
    shared = prepare(job, console=console).estimate
    assert shared.layout == "FSDP2 over 2 processes" and alone.layout == "1 process"
    assert shared.weight_bytes == -(-alone.weight_bytes // 2) and shared.trainable == alone.trainable
    assert console.file.getvalue() == ""


def finetune_args(dataset: Path, start: Path, run_dir: Path, steps: int, micro_batch: int) -> list[str]:
    """`evo2 finetune` arguments of a tiny CPU run with a constant lr (a run may stop and continue with more
    steps), validated at its last step only."""
    sets = {
        "data.datasets": f"[{{path: {dataset}}}]",
        "data.seq_len": 32,
        "data.val_windows": 4,
        "optim.lr": 3e-3,
        "optim.min_lr": 3e-3,
        "optim.warmup_steps": 0,
        "optim.global_batch": 4,
        "train.micro_batch": micro_batch,
        "train.max_steps": steps,
        "train.log_interval": 1,
        "train.run_dir": run_dir,
    }
    return ["finetune", "--from", str(start), "--device", "cpu", *(f"--set={k}={v}" for k, v in sets.items())]


def assert_same_run(run: Path, reference: Path) -> None:
    """The same training losses and last validation loss (within the FSDP2 test of `evo2 train`'s 1e-5) and a
    last checkpoint with the same files holding the same tensors: weights and optimizer state."""
    records = [
        [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
        for r in (run, reference)
    ]
    for kind, key in (("train", "loss"), ("val", "val_loss")):
        ours, theirs = ([r[key] for r in rs if r["kind"] == kind] for rs in records)
        ours = ours if kind == "train" else ours[-1:]  # a run that stopped early validated then too
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5, err_msg=kind)
    ours, theirs = (r / "checkpoints" / "latest" for r in (run, reference))
    assert sorted(p.name for p in ours.resolve().iterdir()) == sorted(
        p.name for p in theirs.resolve().iterdir()
    )
    weights = [load_file(c / "model.safetensors") for c in (ours, theirs)]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[0][name], value, rtol=0, atol=1e-6, msg=name)
    states = [
        torch.load(c / "train_state.pt", weights_only=True)["optimizer"]["state"] for c in (ours, theirs)
    ]
    assert states[0].keys() == states[1].keys()
    for name, value in states[1].items():
        for key, tensor in value.items():
            torch.testing.assert_close(states[0][name][key], tensor, rtol=0, atol=1e-6, msg=f"{name} {key}")


@pytest.mark.slow
def test_lora_and_frozen_finetunes_under_fsdp2_match_one_process(dataset, base, tmp_path, torchrun):
    """2 gloo processes with FSDP2 (torchrun) give one process's losses and checkpoints: LoRA (adapters inside
    sharded frozen linears), stopped at step 2 and resumed to step 4 (its optimizer state loaded back into
    the shards), and a partial freeze that leaves whole blocks with nothing to train."""
    fsdp = "--set=train.parallelism=fsdp"
    runs = {
        "lora": (["--method", "lora", "--set=finetune.lora.rank=2"], (2, 4)),
        "frozen": (["--freeze", "embedding,blocks.0-1,filters"], (2,)),
    }
    for name, (extra, stops) in runs.items():
        one = CliRunner().invoke(
            app, [*finetune_args(dataset, base, tmp_path / f"{name}1", stops[-1], 4), *extra]
        )
        assert one.exit_code == 0, one.output
        for steps in stops:
            two = torchrun([*finetune_args(dataset, base, tmp_path / f"{name}2", steps, 1), *extra, fsdp], 2)
            assert two.returncode == 0, two.stderr[-3000:]
            assert two.stderr.count("checkpoint: ") == 1  # rank 0 reports
        assert_same_run(tmp_path / f"{name}2", tmp_path / f"{name}1")
    adapted = load_file(tmp_path / "lora2" / "checkpoints" / "latest" / "model.safetensors")
    assert all(adapted[n].abs().sum() > 0 for n in adapted if n.endswith("lora_B"))  # the adapters moved


def test_resume_refuses_a_checkpoint_made_by_the_other_kind_of_run(dataset, base, tmp_path):
    """A language-model checkpoint does not resume a head finetune, nor a head checkpoint a language model,
    nor does one of the earlier one-process head trainer resume: exit 2 naming the checkpoint and what made
    it, before anything is written."""
    from test_finetune_heads import labeled_fasta, task_job

    lm_job = make_job(dataset, base, tmp_path / "lm")
    lm_job = dataclasses.replace(lm_job, train=dataclasses.replace(lm_job.train, max_steps=1))
    lm = finetune(lm_job, console=quiet()).checkpoint
    labeled_fasta(tmp_path / "labeled.fa")

    def head_job(run: str) -> FinetuneJob:
        return task_job(
            tmp_path / "labeled.fa", base, tmp_path / run, "classify", r"label=(\S+)", {"max_steps": 1}
        )

    head = finetune(head_job("head"), console=quiet()).checkpoint
    with pytest.raises(InputError) as refused:
        finetune(head_job("head2"), resume=str(lm), console=quiet())
    message = " ".join(str(refused.value).split())
    assert f"cannot resume from {lm}: it was made by a run training a language model and this run" in message
    assert "this run trains a classify head; resume from a checkpoint of this kind of run" in message
    with pytest.raises(
        InputError, match="made by a run training a classify head and this run trains a language"
    ):
        finetune(make_job(dataset, base, tmp_path / "lm2"), resume=str(head), console=quiet())
    earlier = tmp_path / "earlier" / "step_00000001"  # as the old trainer wrote it: step and best only
    shutil.copytree(head, earlier)
    train_state = torch.load(earlier / "train_state.pt", weights_only=True)
    train_state["loop"] = {"step": 1, "best_val_loss": train_state["loop"]["best_val_loss"]}
    torch.save(train_state, earlier / "train_state.pt")
    with pytest.raises(InputError, match="one-process head trainer of an earlier version"):
        finetune(head_job("head3"), resume=str(earlier), verify=False, console=quiet())
    assert not any((tmp_path / run).exists() for run in ("head2", "lm2", "head3"))
