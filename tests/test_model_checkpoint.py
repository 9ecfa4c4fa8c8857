"""Our checkpoint directory, Vortex checkpoint errors, and `evo2 convert` both ways."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml
from conftest import VORTEX_TINY
from torch.testing import assert_close
from typer.testing import CliRunner

from evo2_cli.cli import app
from evo2_cli.errors import InputError
from evo2_cli.fsio import sha256_file
from evo2_cli.model import (
    StripedHyena,
    load_checkpoint_config,
    load_model,
    load_model_config,
    load_vortex,
    preset_config,
    save_model,
)
from evo2_cli.model.checkpoint import (
    CheckpointError,
    all_finite,
    check_tensors,
    load_source,
    write_model_files,
)
from evo2_cli.model.vortex import export_vortex, read_vortex_checkpoint, state_dict_from_vortex

CONFIG = VORTEX_TINY / "tiny_config.yml"
WEIGHTS = VORTEX_TINY / "state_dict_checkpoint_layout.pt"
runner = CliRunner()


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return StripedHyena(preset_config("test")).eval()


def test_save_load_round_trip_is_exact(tmp_path, model):
    directory = save_model(model, tmp_path / "ckpt", meta={"step": 7})
    assert sorted(os.listdir(directory)) == ["config.yaml", "meta.json", "model.safetensors"]
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["format"] == "evo2-cli-checkpoint" and meta["step"] == 7
    assert set(meta["files"]) == {"model.safetensors", "config.yaml"} and meta["parameters"] == 7628
    loaded = load_model(directory)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert load_checkpoint_config(directory) == model.config


def test_other_config_sections_are_kept_and_ignored(tmp_path, model):
    directory = tmp_path / "run"
    directory.mkdir()
    write_model_files(model, directory, config={"train": {"lr": 3e-4}, "model": {"stale": True}})
    written = yaml.safe_load((directory / "config.yaml").read_text())
    assert written["train"] == {"lr": 3e-4} and written["model"]["hidden_size"] == 8
    assert load_model(directory).config == model.config


def test_latest_pointer_is_followed(tmp_path, model):
    save_model(model, tmp_path / "runs" / "step_10")
    (tmp_path / "runs" / "latest").write_text("step_10\n")
    assert load_model(tmp_path / "runs").config == model.config


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.write_bytes(b"\xff\xfe")])
def test_unreadable_latest_pointer_is_a_checkpoint_error(tmp_path, make):
    make(tmp_path / "latest")
    with pytest.raises(InputError, match="latest: not a readable pointer"):
        load_model(tmp_path)


def test_save_refuses_to_overwrite(tmp_path, model):
    save_model(model, tmp_path / "ckpt")
    with pytest.raises(InputError, match="--overwrite"):
        save_model(model, tmp_path / "ckpt")
    save_model(model, tmp_path / "ckpt", overwrite=True)


def _tamper(directory: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda t: t.pop("blocks.1.filter.D"), "missing key(s) blocks.1.filter.D"),
        (lambda t: t.update(extra=torch.zeros(1)), "unexpected key(s) extra"),
        (lambda t: t.update({"norm.scale": torch.ones(9)}), "key 'norm.scale' has shape (9,), expected (8,)"),
        (
            lambda t: t["blocks.2.filter.p"].__setitem__((0, 0), float("nan")),
            "'blocks.2.filter.p' has 1 non-finite",
        ),
    ],
)
def test_bad_checkpoint_names_the_key(tmp_path, model, change, words):
    directory = save_model(model, tmp_path / "ckpt")
    _tamper(directory, change)
    with pytest.raises(CheckpointError) as info:
        load_model(directory, verify=False)  # past the sha256 check, which refuses any change
    assert words in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, InputError)


def test_weights_are_streamed_to_disk(tmp_path):
    """Python-level allocations while writing stay far below the file size: no `bytes` of the whole file
    (safetensors `save`, a BytesIO for torch.save) is built on the way, for either format."""
    small = StripedHyena(preset_config("small"))  # 1.7 M parameters, 6.5 MiB in fp32
    size = 4 * small.num_parameters()
    tracemalloc.start()
    try:
        write_model_files(small, tmp_path)
        written = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        export_vortex(small, tmp_path / "small.pt", tmp_path / "small.yml")
        exported = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written < size / 2 and exported < size / 2, (written, exported, size)
    assert sorted(os.listdir(tmp_path)) == [
        "config.yaml",
        "meta.json",
        "model.safetensors",
        "small.pt",
        "small.yml",
    ]  # no temporary names left behind
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["files"]["model.safetensors"] == sha256_file(tmp_path / "model.safetensors")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_matches_the_reference(dtype):
    """The min/max check against `torch.isfinite(t).all()`, with one bad value at the start, in the
    middle and in the tail of vectorized loops, for sizes around the vector widths."""
    generator = torch.Generator().manual_seed(0)
    for size in (1, 7, 16, 33, 1000, 4099):
        clean = torch.randn(size, generator=generator).to(dtype)
        assert all_finite(clean)
        for position in sorted({0, size // 2, size - 1}):
            for bad in (float("nan"), float("inf"), float("-inf")):
                tensor = clean.clone()
                tensor[position] = bad
                assert all_finite(tensor) == bool(torch.isfinite(tensor).all()) is False, (size, position)
    strided = torch.randn(6, 5, generator=generator).to(dtype).t()  # not contiguous
    strided[3, 1] = float("nan")
    assert not all_finite(strided)
    assert all_finite(torch.empty(0, 3, dtype=dtype))
    assert all_finite(torch.empty(2, 3, dtype=dtype, device="meta"))


def test_the_first_non_finite_key_is_named():
    tensors = {name: torch.ones(4, 2) for name in ("a", "b", "c")}
    tensors["b"][3, 1] = float("-inf")
    tensors["c"][:] = float("nan")
    shapes = {name: (4, 2) for name in tensors}
    with pytest.raises(CheckpointError, match=r"x\.pt: key 'b' has 1 non-finite value\(s\)"):
        check_tensors(tensors, shapes, "x.pt")
    check_tensors(tensors, shapes, "x.pt", finite=False)  # keys and shapes only


def test_vortex_import_copies_out_of_the_mapped_file():
    """fp32 tensors of the file (the whole fixture, the poles and residues of released files) are copied:
    a view would keep the memory-mapped .pt resident as long as the model lives."""
    tensors = read_vortex_checkpoint(WEIGHTS)
    mapped = {value.untyped_storage().data_ptr() for value in tensors.values()}
    ours = state_dict_from_vortex(tensors, load_model_config(CONFIG), str(WEIGHTS))
    shared = [key for key, value in ours.items() if value.untyped_storage().data_ptr() in mapped]
    assert shared == []
    assert ours["norm.scale"].dtype == torch.float32


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_model(tmp_path)


# ---------------------------------------------------------------- Vortex checkpoint errors


def _vortex_with(tmp_path, change) -> Path:
    tensors = read_vortex_checkpoint(WEIGHTS)
    change(tensors)
    path = tmp_path / "bad.pt"
    torch.save(tensors, path)
    return path


@pytest.mark.parametrize(
    "change, words",
    [
        (
            lambda t: t.pop("blocks.3.inner_mha_cls.Wqkv.weight"),
            "missing key(s) blocks.3.inner_mha_cls.Wqkv.weight",
        ),
        (
            lambda t: t.update({"blocks.9.mlp.l1.weight": torch.zeros(2)}),
            "unexpected key(s) blocks.9.mlp.l1.weight",
        ),
        (
            lambda t: t.update({"blocks.1.filter.h": torch.zeros(8, 1, 128)}),
            "'blocks.1.filter.h' has shape (8, 1, 128)",
        ),
        (
            lambda t: t["blocks.0.mlp.l3.weight"].__setitem__((0, 0), float("inf")),
            "'blocks.0.mlp.l3.weight' has 1 non",
        ),
        (
            lambda t: t["blocks.3.inner_mha_cls.rotary_emb.inv_freq"].mul_(3.0),
            "check rotary_emb_base",
        ),
    ],
)
def test_bad_vortex_checkpoint_names_the_key(tmp_path, change, words):
    with pytest.raises(CheckpointError) as info:
        load_vortex(CONFIG, _vortex_with(tmp_path, change))
    assert words in str(info.value)


class Payload:
    """Any class: unpickling it would run code, so weights_only loading must refuse it."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"embedding_layer.weight": Payload()}, path)
    with pytest.raises(
        CheckpointError, match=r"not a tensor-only file; refusing to unpickle \(it references \S*Payload\)"
    ):
        load_vortex(CONFIG, path)
    with open(path, "wb") as handle:
        pickle.dump({"embedding_layer.weight": Payload()}, handle)
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        load_vortex(CONFIG, path)


def _with_growing_pole(tensors):
    tensors["blocks.2.filter.log_poles"][5, 3, 0] = 0.01


def test_growing_poles_are_refused_or_clamped(tmp_path):
    path = _vortex_with(tmp_path, _with_growing_pole)
    with pytest.raises(
        CheckpointError, match=r"'blocks\.2\.filter\.log_poles' has 1 pole\(s\) with lambda >= 0"
    ):
        load_vortex(CONFIG, path)
    with pytest.warns(UserWarning, match="clamped 1 pole"):
        model = load_vortex(CONFIG, path, clamp_poles=-1e-4)
    assert_close(model.blocks[2].filter.poles()[5, 3], torch.tensor(-1e-4))
    assert (model.blocks[2].filter.poles() < 0).all()
    with pytest.warns(UserWarning, match="kept"):
        free = load_vortex(CONFIG, path, hcl_form="vortex")
    assert free.blocks[2].filter.poles()[5, 3].item() == pytest.approx(0.01)
    with pytest.raises(CheckpointError, match="negative"):
        load_vortex(CONFIG, path, clamp_poles=0.0)


# ---------------------------------------------------------------- evo2 convert


def test_convert_both_ways(tmp_path):
    out = tmp_path / "ours"
    result = runner.invoke(
        app, ["convert", "from-vortex", str(WEIGHTS), "-c", str(CONFIG), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert load_model(out).config.hcl_form == "modal"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["converted_from"]["format"] == "vortex"

    back = tmp_path / "back.pt"
    result = runner.invoke(app, ["convert", "to-vortex", str(out), "--out", str(back)])
    assert result.exit_code == 0, result.output
    original, exported = read_vortex_checkpoint(WEIGHTS), read_vortex_checkpoint(back)
    assert set(original) == set(exported)
    for key, value in original.items():
        assert torch.equal(exported[key], value), key
    reloaded = load_vortex(back.with_suffix(".yml"), back)  # the written release-style YAML loads as is
    logits = torch.load(VORTEX_TINY / "logits_fp32.pt", weights_only=True)
    ids = torch.load(VORTEX_TINY / "input_ids.pt", weights_only=True)
    with torch.no_grad():
        assert_close(reloaded(ids), logits, atol=1e-4, rtol=0)

    result = runner.invoke(app, ["convert", "to-vortex", str(out), "--out", str(back)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = runner.invoke(
        app, ["convert", "to-vortex", str(out), "--out", str(back), "--overwrite", "--dtype", "bf16"]
    )
    assert result.exit_code == 0, result.output
    assert read_vortex_checkpoint(back)["embedding_layer.weight"].dtype == torch.bfloat16


def test_convert_from_vortex_finds_the_config_beside_the_weights(tmp_path):
    weights = tmp_path / "release.pt"
    shutil.copy(WEIGHTS, weights)
    result = runner.invoke(app, ["convert", "from-vortex", str(weights), "-o", str(tmp_path / "a")])
    assert result.exit_code == 2 and not (tmp_path / "a").exists()
    assert all(f in " ".join(result.output.split()) for f in ("--config (-c) FILE", "release.yml"))
    shutil.copy(CONFIG, tmp_path / "release.yaml")
    result = runner.invoke(app, ["convert", "from-vortex", str(weights), "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["converted_from"]["config"] == str(tmp_path / "release.yaml")
    assert_close(load_model(tmp_path / "a").state_dict(), load_vortex(CONFIG, WEIGHTS).state_dict())
    result = runner.invoke(
        app, ["convert", "from-vortex", str(tmp_path / "gone.pt"), "-o", str(tmp_path / "b")]
    )
    assert result.exit_code == 2 and "config YAML" not in result.output  # the missing weights, not a config


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("float16", torch.float16)])
def test_convert_takes_the_precision_names_infer_takes(tmp_path, model, name, dtype):
    """`evo2 infer --dtype` took fp16 and float16, `evo2 convert --dtype` refused them."""
    save_model(model, tmp_path / "ck")
    out = tmp_path / "out.pt"
    convert = ["convert", "to-vortex", str(tmp_path / "ck"), "-o", str(out), "--overwrite", "--dtype"]
    result = runner.invoke(app, [*convert, name])
    assert result.exit_code == 0, result.output
    written = read_vortex_checkpoint(out)
    assert written["embedding_layer.weight"].dtype == dtype
    assert all(v.dtype == torch.float32 for k, v in written.items() if k.endswith("log_poles"))
    result = runner.invoke(app, [*convert, "auto"])  # no device to choose by
    assert result.exit_code == 2 and "--dtype: expected fp32," in " ".join(result.output.split())


@pytest.mark.parametrize(
    "write, words",
    [
        (lambda t, p: torch.save({**t, "extra.weight": torch.zeros(1)}, p), "unexpected key(s) extra.weight"),
        (lambda t, p: torch.save({**t, "norm.scale": torch.full((64,), torch.nan)}, p), "has 64 non-finite"),
        (lambda t, p: torch.save({**t, "norm.scale": Payload()}, p), "not a tensor-only file; refusing"),
        (
            lambda t, p: p.write_bytes(b"not a checkpoint"),
            "cannot read as a PyTorch checkpoint: not a torch.save zip archive",
        ),
    ],
    ids=["unexpected", "non-finite", "pickled", "garbage"],
)
def test_convert_bad_vortex_file_exits_2_naming_the_problem(tmp_path, write, words):
    bad = tmp_path / "bad.pt"
    write(read_vortex_checkpoint(WEIGHTS), bad)
    out = tmp_path / "o"
    result = runner.invoke(app, ["convert", "from-vortex", str(bad), "-c", str(CONFIG), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()


def test_convert_bad_input_exits_2(tmp_path):
    bad = _vortex_with(tmp_path, _with_growing_pole)
    result = runner.invoke(
        app, ["convert", "from-vortex", str(bad), "-c", str(CONFIG), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "blocks.2.filter.log_poles" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
    result = runner.invoke(
        app,
        [
            "convert",
            "from-vortex",
            str(bad),
            "-c",
            str(CONFIG),
            "--out",
            str(tmp_path / "o"),
            "--clamp-poles",
            "-1e-4",
        ],
    )
    assert result.exit_code == 0 and "clamped 1 pole" in result.output
    result = runner.invoke(
        app,
        [
            "convert",
            "from-vortex",
            str(WEIGHTS),
            "-c",
            str(CONFIG),
            "-o",
            str(tmp_path / "p"),
            "--set",
            "inner_mlp_size=32",
        ],
    )
    assert result.exit_code == 2 and "shape" in result.output
    result = runner.invoke(
        app, ["convert", "to-vortex", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pt")]
    )
    assert result.exit_code == 2 and "not found" in result.output
    # an output where no file can be written fails before any work, not as a traceback at the end
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    result = runner.invoke(app, ["convert", "to-vortex", str(tmp_path / "o"), "--out", str(blocked / "x.pt")])
    assert result.exit_code == 2 and "cannot write there" in result.output, result.output


@pytest.mark.parametrize(
    "point, problem",
    [
        (lambda latest: latest.symlink_to("."), "loops back"),
        (lambda latest: latest.write_text(".\n"), "loops back"),
        (lambda latest: latest.symlink_to("step_gone"), "names no directory"),
        (lambda latest: latest.write_text("step_gone\n"), "names no directory"),
    ],
)
def test_a_latest_pointer_that_loops_or_dangles_is_refused(tmp_path, model, point, problem):
    """Once a RecursionError traceback (a loop) or an error that did not name the pointer (dangling)."""
    point(tmp_path / "latest")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'latest'}: the pointer {problem}")


def test_a_looping_latest_pointer_exits_2(tmp_path):
    from typer.testing import CliRunner

    from evo2_cli.cli import app

    (tmp_path / "latest").symlink_to(".")
    result = CliRunner().invoke(app, ["convert", "to-vortex", str(tmp_path), "-o", str(tmp_path / "out.pt")])
    assert result.exit_code == 2 and "the pointer loops back" in " ".join(result.output.split())


def test_a_vortex_pt_finds_the_config_yaml_beside_it(tmp_path):
    """Every command that takes a .pt (infer, diagnose-grads, finetune) reads the .yml / .yaml of the same
    name beside it when no config is given; a given one wins; with neither the message names both ways."""
    weights = Path(shutil.copy(WEIGHTS, tmp_path / "w.pt"))
    with pytest.raises(CheckpointError, match=r"--vortex-config FILE or put it beside the weights as w\.yml"):
        load_source(weights)
    shutil.copy(CONFIG, tmp_path / "w.yaml")
    expected = load_source(WEIGHTS, CONFIG).state_dict()
    for key, value in load_source(weights).state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert load_checkpoint_config(weights) == load_model_config(CONFIG)
    (tmp_path / "w.yml").write_text("model: {preset: nonexistent}\n")  # .yml before .yaml; a given one wins
    with pytest.raises(InputError, match="nonexistent"):
        load_source(weights)
    assert load_source(weights, CONFIG).config == load_model_config(CONFIG)


def test_infer_takes_a_vortex_pt_with_its_yaml_beside_it(tmp_path):
    weights = Path(shutil.copy(WEIGHTS, tmp_path / "w.pt"))
    (tmp_path / "in.fa").write_text(">a\nACGTACGTTTGA\n>b\nGGCATTACA\n")
    runner = CliRunner()
    result = runner.invoke(app, ["infer", "score", str(weights), str(tmp_path / "in.fa")])
    assert result.exit_code == 2 and "--vortex-config" in result.output
    shutil.copy(CONFIG, tmp_path / "w.yml")
    scores = {}
    for name, extra in (("beside", []), ("given", ["--vortex-config", str(CONFIG)])):
        out = tmp_path / f"{name}.tsv"
        result = runner.invoke(
            app, ["infer", "score", str(weights), str(tmp_path / "in.fa"), "-o", str(out), *extra]
        )
        assert result.exit_code == 0, result.output
        scores[name] = out.read_bytes()
    assert scores["beside"] == scores["given"]
