"""Every command that reads a checkpoint of ours checks it against the sha256 in its meta.json, refuses one
without hashes unless --no-verify, and refuses pickles and checkpoints of another model in a few lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import random_dataset
from typer.testing import CliRunner

from evo2_cli.cli import app
from evo2_cli.config import build_config
from evo2_cli.errors import InputError
from evo2_cli.fsio import sha256_file
from evo2_cli.train.config import TrainJob
from evo2_cli.train.loop import train

SEQUENCE = "ACGTTGCAAGGCTTACGATCGATCGGATCCATGCAAGT"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return random_dataset(tmp_path_factory.mktemp("data") / "toy", 0, {"train": 600, "val": 600}, documents=3)


def job_for(dataset: Path, run_dir: Path, **model) -> TrainJob:
    return build_config(
        TrainJob,
        {
            "model": {"preset": "test", **model},
            "data": {"datasets": [{"path": str(dataset)}], "seq_len": 32, "val_windows": 0},
            "optim": {"lr": 1e-3, "warmup_steps": 0, "global_batch": 2},
            "train": {"run_dir": str(run_dir), "max_steps": 1, "micro_batch": 2, "device": "cpu"},
        },
    )


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory) -> Path:
    """A training checkpoint (model, config, meta with hashes, train state) of the `test` preset."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    return train(job_for(dataset, run_dir), console=None).checkpoint


@pytest.fixture()
def copy(checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


@pytest.fixture()
def inputs(tmp_path) -> dict[str, Path]:
    fasta = tmp_path / "seqs.fa"
    fasta.write_text(f">rec0\n{SEQUENCE}\n")
    listing = tmp_path / "variants.tsv"
    listing.write_text(f"rec0\t5\t{SEQUENCE[4]}\tA\n")
    return {"fasta": fasta, "listing": listing}


def flip_a_byte(path: Path) -> None:
    """One bit of one weight (the middle of the file is tensor data): the file still parses."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def said(output: str, *fragments: str) -> bool:
    """Every fragment is in `output`, whitespace ignored: a terminal may wrap a long path or hash anywhere."""
    squeezed = "".join(output.split())
    return all("".join(fragment.split()) in squeezed for fragment in fragments)


def readers(dataset: Path, source: Path, tmp: Path, inputs: dict[str, Path]) -> dict[str, list[object]]:
    """Each command that reads a checkpoint, pointed at `source`."""
    data = [f"--set=data.datasets=[{{path: {dataset}}}]", "--set=data.seq_len=32", "--device=cpu"]
    return {
        "infer score": ["infer", "score", source, inputs["fasta"], "--device=cpu"],
        "infer generate": ["infer", "generate", source, "-p", "ACGT", "-n", 2, "--device=cpu"],
        "infer embed": ["infer", "embed", source, inputs["fasta"], "-o", tmp / "e.npy", "--device=cpu"],
        "infer variants": [
            "infer",
            "variants",
            source,
            inputs["listing"],
            "-r",
            inputs["fasta"],
            "--device=cpu",
        ],
        "convert to-vortex": ["convert", "to-vortex", source, "-o", tmp / "out.pt"],
        "finetune --from": ["finetune", "--from", source, *data, f"--set=train.run_dir={tmp / 'ft'}"],
        "finetune merge": ["finetune", "merge", source, "-o", tmp / "merged"],
        "diagnose-grads --checkpoint": [
            "diagnose-grads",
            "--checkpoint",
            source,
            *data,
            "--steps=1",
            f"--output={tmp / 'diag'}",
        ],
        "train --resume": [
            "train",
            "--set=model.preset=test",
            *data,
            "--set=optim.global_batch=2",
            "--set=train.micro_batch=2",
            "--set=train.max_steps=2",
            f"--set=train.run_dir={tmp / 'run'}",
            "--resume",
            source,
        ],
    }


READERS = list(readers(Path(), Path(), Path(), {"fasta": Path(), "listing": Path()}))
OUTPUTS = ("e.npy", "out.pt", "ft", "merged", "diag", "run")


@pytest.mark.parametrize("reader", READERS)
def test_one_flipped_byte_is_refused_by_every_reader(dataset, copy, tmp_path, inputs, reader):
    weights = copy / "model.safetensors"
    expected = sha256_file(weights)
    flip_a_byte(weights)
    code, out = invoke(*readers(dataset, copy, tmp_path, inputs)[reader])
    assert code == 2, out
    assert said(out, "model.safetensors: corrupt: its sha256 does not match meta.json", "--no-verify")
    assert said(out, f"expected {expected}", f"found {sha256_file(weights)}") and "Traceback" not in out
    # nothing written, above all no merged checkpoint whose fresh hashes would vouch for the flipped weights
    assert not [name for name in OUTPUTS if (tmp_path / name).exists()]


@pytest.mark.parametrize("reader", ["infer score", "convert to-vortex", "finetune merge"])
def test_no_verify_reads_weights_changed_on_purpose(dataset, copy, tmp_path, inputs, reader):
    flip_a_byte(copy / "model.safetensors")
    code, out = invoke(*readers(dataset, copy, tmp_path, inputs)[reader], "--no-verify")
    assert code == 0, out


@pytest.mark.parametrize("reader", ["infer generate", "finetune merge", "train --resume"])
def test_a_checkpoint_without_hashes_is_refused_unless_no_verify(dataset, copy, tmp_path, inputs, reader):
    meta = json.loads((copy / "meta.json").read_text())
    del meta["files"]
    (copy / "meta.json").write_text(json.dumps(meta))
    args = readers(dataset, copy, tmp_path, inputs)[reader]
    code, out = invoke(*args)
    assert code == 2, out
    assert said(out, "no sha256 of the checkpoint's files in meta.json", "--no-verify")
    code, out = invoke(*args, "--no-verify")
    assert code == 0, out


def test_a_config_edited_after_saving_is_refused(copy):
    from evo2_cli.model.checkpoint import CheckpointError, load_checkpoint_config, load_model

    config = copy / "config.yaml"
    config.write_text(config.read_text() + "# edited\n")
    for read in (load_checkpoint_config, load_model):
        with pytest.raises(CheckpointError, match=r"config\.yaml: corrupt"):
            read(copy)
        read(copy, verify=False)


class Payload:
    """Unpickling this would mean running code of the file's choosing."""


def test_a_pickled_train_state_is_refused_without_running_it(dataset, copy, tmp_path, inputs):
    state = copy / "train_state.pt"
    torch.save({"loop": Payload()}, state)
    meta = json.loads((copy / "meta.json").read_text())
    meta["files"]["train_state.pt"] = sha256_file(state)  # a hash that matches: the content is refused
    (copy / "meta.json").write_text(json.dumps(meta))
    code, out = invoke(*readers(dataset, copy, tmp_path, inputs)["train --resume"])
    assert code == 2, out
    assert said(out, "train_state.pt: not a tensor-only file; refusing to unpickle", "Payload")
    assert "Traceback" not in out and "weights_only" not in out


def test_resuming_from_another_model_names_the_first_mismatches(dataset, checkpoint, tmp_path):
    job = job_for(dataset, tmp_path / "run", hidden_size=16, layout="SDH")
    with pytest.raises(InputError) as info:
        train(job, resume=str(checkpoint), console=None)
    message = str(info.value)
    assert len(message.splitlines()) <= 5, message
    assert "model.safetensors: the tensors do not match the model:" in message
    assert "unexpected key(s) blocks.3." in message and "(and" in message  # the first few, then a count
    assert "key 'blocks.0.mlp.l1.weight' has shape (16, 8), expected (16, 16)" in message
    assert "hint: the checkpoint holds another model" in message


def test_a_meta_json_that_is_not_an_object_is_refused_even_without_verification(tmp_path):
    from evo2_cli.train.checkpoint import verify_checkpoint

    (tmp_path / "meta.json").write_text("[]")
    with pytest.raises(InputError, match=r"meta\.json: not a JSON object"):
        verify_checkpoint(tmp_path, verify=False)


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda base: "step_00000010", "base"),
        (lambda base: {k: v for k, v in base.items() if k != "sha256"}, "base.sha256"),
        (lambda base: {**base, "sha256": ["not", "a", "mapping"]}, "base.sha256"),
        (lambda base: {**base, "kind": "other"}, "base.kind"),
        (lambda base: {**base, "path": 7}, "base.path"),
        (lambda base: {**base, "lora_scaling": "2"}, "base.lora_scaling"),
    ],
)
def test_a_malformed_base_in_meta_json_exits_2_naming_the_key(tmp_path, change, key):
    """Once a traceback (AttributeError, KeyError, TypeError) from every reader of the checkpoint."""
    import torch

    from evo2_cli.model import StripedHyena, preset_config
    from evo2_cli.model.checkpoint import base_reference, save_model, write_model_files

    torch.manual_seed(0)
    model = StripedHyena(preset_config("test"))
    save_model(model, tmp_path / "base")
    (tmp_path / "ck").mkdir()
    base = base_reference(tmp_path / "base")
    write_model_files(model, tmp_path / "ck", trained={"norm.scale"}, base=base)
    meta_path = tmp_path / "ck" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "base": change(meta["base"])}))
    code, out = invoke("convert", "to-vortex", tmp_path / "ck", "-o", tmp_path / "out.pt")
    assert code == 2, out
    assert said(out, f"{meta_path}: key '{key}' is missing or malformed")
