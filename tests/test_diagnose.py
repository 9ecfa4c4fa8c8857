"""`evo2 diagnose-grads`: the detector on synthetic series, the real vortex-vs-modal explosion on the sample
E. coli slice, the outputs, post-hoc review of an `evo2 train` run, and bad input."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import sys
import xml.dom.minidom
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_dataset
from rich.console import Console
from typer.testing import CliRunner

from evo2_cli.cli import app
from evo2_cli.config import build_config
from evo2_cli.data.indexed import IndexedDatasetWriter
from evo2_cli.diagnose import report
from evo2_cli.diagnose.config import DiagnoseJob, VariantSpec, expand_variants, parse_spec
from evo2_cli.diagnose.detect import Flag, SeriesDetector, locate_explosion
from evo2_cli.diagnose.record import StepRecord
from evo2_cli.diagnose.run import place_slow_modes, run_diagnosis, starting_model, variant_model
from evo2_cli.errors import ConfigError
from evo2_cli.train.config import GuardSection, TrainJob
from evo2_cli.train.data import split_windows, token_losses
from evo2_cli.train.loop import train
from evo2_cli.train.origin import HclStats, ParamInfo, SiteInfo

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "ecoli_k12_mg1655_slice.fa.gz"


@pytest.fixture(scope="module")
def ecoli(tmp_path_factory) -> Path:
    """The shipped E. coli slice as a dataset prefix (ecoli_train / ecoli_val), read directly."""
    with gzip.open(SAMPLE, "rt") as handle:
        text = handle.read().splitlines()
    bases = np.frombuffer("".join(line for line in text if not line.startswith(">")).encode(), np.uint8)
    root = tmp_path_factory.mktemp("ecoli")
    for split, part in (("train", bases[:150_000]), ("val", bases[150_000:])):
        with IndexedDatasetWriter(root / f"ecoli_{split}") as writer:
            writer.add_document(np.concatenate([part, [0]]).astype(np.uint8))
    return root / "ecoli"


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["diagnose-grads", *args])
    return result.exit_code, " ".join(result.output.split())  # messages wrap at the terminal width


def reproduction_args(dataset: Path, output: Path, steps: int = 12) -> list[str]:
    """The explosion at test size: the `test` preset (d = 8, S = 4), L = 2048, lr 1e-2 from step 0."""
    return [
        "--set=model.preset=test",
        f"--set=data.datasets=[{{path: {dataset}}}]",
        "--set=data.seq_len=2048",
        "--set=optim.lr=1e-2",
        "--set=optim.warmup_steps=0",
        "--set=optim.global_batch=1",
        f"--steps={steps}",
        "--device=cpu",
        f"--output={output}",
    ]


# ---------------------------------------------------------------- the detector on synthetic series

SETTINGS = GuardSection(spike_factor=10.0, median_window=50, warmup_steps=3)


def first_flag(values: list[float], settings: GuardSection) -> Flag | None:
    """The first bad value of a series (judging stops there)."""
    detector = SeriesDetector(settings)
    return next((flag for step, value in enumerate(values) if (flag := detector.judge(step, value))), None)


def test_detector_flags_the_first_spike_and_non_finite_values():
    assert first_flag([1.0, 1.2, 0.9, 9.5, 1.0], SETTINGS) is None  # 9.5 < 10 x median(1, 1.2, 0.9)
    flag = first_flag([1.0, 1.2, 0.9, 1.1, 12.5, 1e6], SETTINGS)
    assert (flag.step, flag.problem) == (4, "spike")
    assert flag.threshold == pytest.approx(10 * 1.05)  # median of 1.0, 1.2, 0.9, 1.1
    assert first_flag([100.0, 1.0, 1.0], SETTINGS) is None  # no judgement before warmup values are known
    flag = first_flag([1.0, math.nan], SETTINGS)
    assert (flag.step, flag.problem) == (1, "non-finite")  # non-finite is bad even during warmup


PARAMS = [
    ParamInfo("embedding_layer.weight", None, "embedding", "embedding"),
    ParamInfo("blocks.0.filter.h", 0, "hcs", "taps"),
    ParamInfo("blocks.1.filter.log_poles", 1, "hcl", "poles"),
    ParamInfo("blocks.1.filter.residues", 1, "hcl", "residues"),
    ParamInfo("blocks.2.mlp.l3.weight", 2, "mlp", "projection"),
]
SITES = [
    SiteInfo("embedding_layer", None, "embedding", "embedding"),
    SiteInfo("blocks.0.filter", 0, "hcs", "mixer"),
    SiteInfo("blocks.1.filter", 1, "hcl", "mixer"),
    SiteInfo("blocks.2.mlp", 2, "mlp", "mlp"),
]
BACKWARD = [4, 3, 2, 1, 0]  # autograd finishes the parameters nearest the loss first; the tied embedding last


def synthetic_steps(grads: list[list[float]], bad_site: tuple[int, int] | None = None) -> list[StepRecord]:
    """Step records with the given per-parameter gradient norms; `bad_site` = (step, site) makes that
    site's output non-finite at that step, with the hcl poles of layer 1 past the fp32 limit."""
    steps = []
    for step, grad in enumerate(grads):
        overflow = bad_site is not None and step == bad_site[0]
        activations = [(1.0, 0.5, 0)] * len(SITES)
        if overflow:
            activations[bad_site[1]] = (math.inf, math.inf, 7)
        lam = 0.1 if overflow else -0.01
        steps.append(
            StepRecord(
                step=step,
                lr=1e-3,
                loss=math.nan if overflow else 5.0,
                grad_norm=math.hypot(*grad),
                grad=grad,
                grad_nonfinite=[0] * len(PARAMS),
                param_norm=[1.0] * len(PARAMS),
                update_ratio=[1e-3] * len(PARAMS),
                param_nonfinite=[0] * len(PARAMS),
                activations=activations,
                forward_order=[0, 1, 2, 3],
                backward_order=BACKWARD,
                hcl={1: HclStats(lam, 0.25 if overflow else 0.0, math.inf if overflow else 1.0)},
            )
        )
    return steps


def test_locate_names_the_first_bad_parameter_in_backward_order():
    calm = [1.0, 1.0, 1.0, 1.0, 1.0]
    # Step 4: the hcl residues (layer 1) blow up, and the hcs taps and embedding that autograd computes
    # from them afterwards; the MLP nearer the loss is still calm.
    burst = [500.0, 300.0, 1.0, 800.0, 1.0]
    explosion = locate_explosion(synthetic_steps([calm] * 4 + [burst]), PARAMS, SITES, 2048, SETTINGS)
    assert (explosion.step, explosion.origin, explosion.problem) == (4, "backward", "spike")
    assert (explosion.layer, explosion.block) == (1, "hcl")
    assert explosion.parameter == "blocks.1.filter.residues"
    assert "3 parameter(s) bad" in explosion.detail
    assert locate_explosion(synthetic_steps([calm] * 6), PARAMS, SITES, 2048, SETTINGS) is None


def test_locate_names_a_forward_overflow_by_the_first_site_and_its_poles():
    calm = [1.0] * 5
    steps = synthetic_steps([calm] * 3 + [[math.nan] * 5], bad_site=(3, 2))
    explosion = locate_explosion(steps, PARAMS, SITES, 2048, SETTINGS)
    assert (explosion.step, explosion.origin, explosion.problem) == (3, "forward", "non-finite")
    assert (explosion.layer, explosion.block, explosion.site) == (1, "hcl", "blocks.1.filter")
    assert explosion.parameter == "blocks.1.filter.log_poles"
    assert "> 88.7" in explosion.detail and "25% of its modes" in explosion.detail


def test_variant_specs_cross_the_axis_lists_and_reject_unknown_terms():
    specs = [VariantSpec("vortex"), VariantSpec("modal", precision="bf16")]
    variants = expand_variants(specs, [1e-2, 3e-3], [], [], 3e-4, 1.0)
    assert [v.name for v in variants] == [
        "vortex+fp32+lr=0.01",
        "vortex+fp32+lr=0.003",
        "modal+bf16+lr=0.01",
        "modal+bf16+lr=0.003",
    ]
    assert variants[2].settings() == {"hcl_form": "modal", "precision": "bf16", "lr": 1e-2, "grad_clip": 1.0}
    assert parse_spec("vortex+noclip+lr=3e-3") == {"hcl_form": "vortex", "grad_clip": 0.0, "lr": 3e-3}
    with pytest.raises(ValueError, match="did you mean 'vortex'"):
        parse_spec("vortx")


def diagnose_job(diagnose: dict) -> DiagnoseJob:
    return build_config(
        DiagnoseJob,
        {"model": {"preset": "test"}, "data": {"datasets": [{"path": "x"}]}, "diagnose": diagnose},
    )


def test_variants_are_a_typed_list_in_the_config():
    variants = [
        {"hcl_form": "vortex", "precision": "bf16"},
        {"hcl_form": "modal", "lr": 1e-3, "grad_clip": 0},
    ]
    job = diagnose_job({"variants": variants})
    assert job.diagnose.variants == [
        VariantSpec("vortex", "bf16"),
        VariantSpec("modal", lr=1e-3, grad_clip=0.0),
    ]
    assert [(v.name, v.precision, v.lr, v.grad_clip) for v in job.variant_list()] == [
        ("vortex+bf16+lr=0.0003+clip=1", "bf16", 3e-4, 1.0),
        ("modal+fp32+lr=0.001+noclip", "fp32", 1e-3, 0.0),
    ]
    # a variant left without a form takes the model's own (modal for the preset)
    assert [v.name for v in diagnose_job({"variants": [{}, {"hcl_form": "vortex"}]}).variant_list()] == [
        "modal",
        "vortex",
    ]
    # strictly checked, each error naming its key
    bad = [
        ({"variants": [{"form": "vortex"}]}, "diagnose.variants.0.form", "did you mean 'hcl_form'"),
        ({"variants": [{}, {"hcl_form": "vortx"}]}, "diagnose.variants.1.hcl_form", "'vortex' | 'modal'"),
        ({"variants": [{"precision": "fp16"}]}, "diagnose.variants.0.precision", "'fp32' | 'bf16'"),
        ({"variants": [{"lr": 0}]}, "diagnose.variants.0.lr", "must be finite and > 0"),
        ({"variants": [{"grad_clip": -1}]}, "diagnose.variants.0.grad_clip", ">= 0"),
        ({"variants": [{}, "vortex+bf16"]}, "diagnose.variants", "'vortex+bf16' is for the --variants flag"),
        ({"variants": "modal"}, "diagnose.variants", "'modal' is for the --variants flag"),
        ({"variants": []}, "diagnose.variants", "at least one variant"),
        ({"variants": [{"lr": 1e-3}], "lr": [1e-2]}, "diagnose.variants.0.lr", "listed in diagnose.lr"),
        ({"variants": [{"hcl_form": "modal"}, {}]}, "diagnose.variants", "listed more than once"),
    ]
    for diagnose, key, fragment in bad:
        with pytest.raises(ConfigError) as info:
            diagnose_job(diagnose)
        assert info.value.key == key and fragment in str(info.value), (diagnose, str(info.value))


def test_every_variant_starts_from_the_same_function():
    job = build_config(
        DiagnoseJob,
        {
            "model": {"preset": "test"},
            "data": {"datasets": [{"path": "unused"}]},
            "diagnose": {"slow_modes": 1, "slow_mode_lambda": -1e-4},
        },
    )
    base, _ = starting_model(job)
    assert base.blocks[2].filter.poles().max().item() == pytest.approx(-1e-4)  # one slow mode per channel
    ids = torch.randint(0, 256, (1, 64))
    vortex, modal = variant_model(base, "vortex"), variant_model(base, "modal")
    assert vortex.config.hcl_form == "vortex" and modal.config.hcl_form == "modal"
    torch.testing.assert_close(vortex(ids), modal(ids), rtol=1e-5, atol=1e-5)
    assert place_slow_modes(modal, 0, -1e-4) == 0


def test_a_diagnosis_step_is_the_training_loops_step_with_accumulation(tmp_path):
    """Same weights, windows and objective as `evo2 train`: the weighted mean over the whole global batch
    (4 windows as 4 micro-batches here, 2 x 2 there), not a mean of per-micro-batch means."""
    # lowercase: micro-batches weigh differently
    random_dataset(tmp_path / "mixed", 1, {"train": 4000}, alphabet=b"ACGTacgtACGT")
    shared = {
        "model": {"preset": "test"},
        "data": {"datasets": [{"path": str(tmp_path / "mixed")}], "seq_len": 64, "val_windows": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "global_batch": 4},
    }
    train_job = build_config(
        TrainJob,
        {
            **shared,
            "train": {
                "run_dir": str(tmp_path / "run"),
                "max_steps": 2,
                "micro_batch": 2,
                "eval_interval": 0,
                "seed": 3,
                "device": "cpu",
            },
        },
    )
    diagnose_job = build_config(
        DiagnoseJob,
        {
            **shared,
            "diagnose": {
                "steps": 2,
                "micro_batch": 1,
                "seed": 3,
                "variants": [{"hcl_form": "modal"}],
                "device": "cpu",
            },
        },
    )

    trained = train(train_job, console=Console(file=io.StringIO()))
    diagnosis = run_diagnosis(diagnose_job)
    diagnosed = [s.loss for s in diagnosis.variants[0].steps]
    np.testing.assert_allclose(diagnosed, trained.losses, rtol=0, atol=1e-6)  # step 1: the same update

    # step 0 by hand: sum of weighted NLL over the 4 windows / sum of their weights
    base, _ = starting_model(diagnose_job)
    batch = split_windows(diagnose_job.data, "train", 3).batch(range(4))
    with torch.no_grad():
        nll = token_losses(base(batch.input_ids), batch.labels)
    weights = batch.loss_weights
    assert diagnosed[0] == pytest.approx(((nll * weights).sum() / weights.sum()).item(), abs=1e-6)
    per_window = ((nll * weights).sum(1) / weights.sum(1)).mean().item()
    assert abs(diagnosed[0] - per_window) > 1e-4  # the two ways differ on this data: the test can fail


# ---------------------------------------------------------------- the real explosion, through the CLI


def test_vortex_explodes_in_the_hcl_layer_and_modal_stays_healthy(ecoli, tmp_path):
    out = tmp_path / "diag"
    code, text = cli(*reproduction_args(ecoli, out), "--variants=vortex,modal")
    assert code == 3, text
    assert "gradient explosion found" in text
    data = json.loads((out / "report.json").read_text())
    assert data["healthy"] is False and data["exploded"] == ["vortex"]
    vortex, modal = data["variants"]
    e = vortex["explosion"]
    assert (e["block"], e["layer"]) == ("hcl", 2)  # layout SDH*: layer 2 is the hcl layer
    assert e["parameter"].startswith("blocks.2.filter.")
    assert vortex["hcl"]["2"]["max_lambda"] > 0  # its poles crossed zero, after Adam's first step
    assert vortex["hcl"]["2"]["first_step_lambda_nonneg"] == 1
    # then the gradient blew up: step 3 on this CPU, 7 with MKL_CBWR=COMPATIBLE (see the activations below)
    assert vortex["hcl"]["2"]["first_step_lambda_nonneg"] < e["step"] < 12
    assert modal["hcl"]["2"]["first_step_lambda_nonneg"] is None
    assert modal["healthy"] and modal["steps_run"] == 12
    assert modal["hcl"]["2"]["max_lambda"] < 0 and modal["max_grad_norm"] < 10
    assert modal["final_loss"] < modal["first_loss"]  # and it learns
    # The hcl layer's output grows with its filter; the modal one stays at the scale of the others. A ratio,
    # not a size: from step 3 on (|h| ~1e8) the vortex run is chaotic, and the rounding of the CPU's kernels
    # (AVX2 or AVX-512, MKL's code path) takes its peak anywhere from 1e9 to 1e16 (ATEN_CPU_CAPABILITY=default
    # and MKL_CBWR=COMPATIBLE show it on one machine). Steps 0-2 agree under all of them: step 2 is 3.5e8.
    vortex_hcl = vortex["max_abs_activation_by_module"]["blocks.2.filter"]
    modal_hcl = modal["max_abs_activation_by_module"]["blocks.2.filter"]
    assert modal_hcl < 100
    assert vortex_hcl > 1e6 * modal_hcl

    # every output is there and consistent
    for name in (*report.REPORT_FILES, "grad_norms.svg", "hcl_lambda.svg"):
        assert (out / name).stat().st_size > 0, name
    rows = read_rows(out / "steps.csv")
    assert [r["variant"] for r in rows].count("modal") == 12
    assert {"grad_norm_hcl", "hcl_max_lambda", "max_update_ratio"} <= set(rows[0])
    params = read_rows(out / "parameters.csv")
    assert {r["kind"] for r in params if r["block"] == "hcl"} >= {"poles", "p", "gamma", "residues", "D"}
    first = {r["parameter"]: r for r in params if r["variant"] == "modal" and r["step"] == "0"}
    assert first["blocks.0.out_filter_dense.bias"]["update_ratio"] == "nan"  # zero at init: no ratio
    assert 0 < float(first["blocks.0.mlp.l1.weight"]["update_ratio"]) < 0.5
    hcl = read_rows(out / "hcl.csv")
    assert all(r["layer"] == "2" for r in hcl)
    charts = re.findall(r"<svg.*?</svg>", (out / "report.html").read_text(), re.S)
    assert len(charts) == 4  # per variant: gradient norm per block type, max lambda
    for chart in charts:
        xml.dom.minidom.parseString(chart)  # well-formed
    # the chart files hold the very same charts, one panel per variant
    grad_file, hcl_file = ((out / name).read_text() for name in ("grad_norms.svg", "hcl_lambda.svg"))
    for text in (grad_file, hcl_file):
        xml.dom.minidom.parseString(text)
    assert [grad_file.count(c) for c in charts] == [1, 0, 1, 0]
    assert [hcl_file.count(c) for c in charts] == [0, 1, 0, 1]

    # exit 0 when healthy; an existing output is refused before any training
    code, text = cli(*reproduction_args(ecoli, out, steps=3), "--variants=modal", "--overwrite")
    assert code == 0, text
    assert json.loads((out / "report.json").read_text())["healthy"] is True
    code, text = cli(*reproduction_args(ecoli, out, steps=3), "--variants=modal")
    assert code == 2 and "already exists" in text


@pytest.mark.gpu
def test_the_explosion_on_cuda_under_bf16_autocast(ecoli, tmp_path):
    out = tmp_path / "diag"
    args = [a for a in reproduction_args(ecoli, out) if a != "--device=cpu"]
    code, text = cli(*args, "--device=cuda", "--variants=vortex+bf16,modal+bf16")
    assert code == 3, text
    vortex, modal = json.loads((out / "report.json").read_text())["variants"]
    assert vortex["explosion"]["block"] == "hcl" and modal["healthy"]


def test_the_chart_files_need_no_matplotlib(ecoli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    out = tmp_path / "diag"
    code, text = cli(*reproduction_args(ecoli, out, steps=2), "--variants=modal")
    assert code == 0, text
    assert "matplotlib" not in text and not list(out.glob("*.png"))
    assert sorted(p.name for p in out.glob("*.svg")) == ["grad_norms.svg", "hcl_lambda.svg"]
    assert ": gradient norm per block type" in (out / "grad_norms.svg").read_text()


def test_axis_flags_cross_the_variants(ecoli, tmp_path):
    out = tmp_path / "diag"
    args = reproduction_args(ecoli, out, steps=1)
    code, text = cli(*args, "--variants=modal,vortex+noclip", "--lr=1e-2,2e-3", "--precision=bf16")
    assert code == 0, text
    variants = json.loads((out / "report.json").read_text())["variants"]
    assert [(v["name"], v["settings"]["lr"], v["settings"]["precision"]) for v in variants] == [
        ("modal+lr=0.01+clip=1", 1e-2, "bf16"),
        ("modal+lr=0.002+clip=1", 2e-3, "bf16"),
        ("vortex+lr=0.01+noclip", 1e-2, "bf16"),
        ("vortex+lr=0.002+noclip", 2e-3, "bf16"),
    ]


def test_a_vortex_checkpoint_is_a_starting_point(ecoli, tmp_path):
    from evo2_cli.model import export_vortex, preset_config
    from evo2_cli.model.model import StripedHyena

    torch.manual_seed(0)
    export_vortex(
        StripedHyena(preset_config("test", hcl_form="vortex")), tmp_path / "w.pt", tmp_path / "release.yml"
    )
    out = tmp_path / "diag"
    args = [f"--set=data.datasets=[{{path: {ecoli}}}]", "--set=data.seq_len=64", "--steps=1", "--device=cpu"]
    code, text = cli(*args, f"--checkpoint={tmp_path / 'w.pt'}", f"--output={out}")
    assert code == 2 and "--vortex-config" in text  # a .pt needs its model YAML
    code, text = cli(
        *args,
        f"--checkpoint={tmp_path / 'w.pt'}",
        f"--vortex-config={tmp_path / 'release.yml'}",
        f"--output={out}",
    )
    assert code == 0, text
    data = json.loads((out / "report.json").read_text())
    assert data["source"].endswith("w.pt") and [v["name"] for v in data["variants"]] == ["vortex", "modal"]
    # the YAML of the same name beside the .pt is found without --vortex-config
    (tmp_path / "release.yml").rename(tmp_path / "w.yml")
    code, text = cli(*args, f"--checkpoint={tmp_path / 'w.pt'}", f"--output={tmp_path / 'beside'}")
    assert code == 0, text
    assert json.loads((tmp_path / "beside" / "report.json").read_text())["source"].endswith("w.pt")


# ---------------------------------------------------------------- post-hoc review of a training run


def test_post_hoc_review_of_a_train_run(ecoli, tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--set=model.preset=test",
            f"--set=data.datasets=[{{path: {ecoli}}}]",
            "--set=data.seq_len=32",
            "--set=data.val_windows=2",
            "--set=optim.global_batch=2",
            "--set=train.micro_batch=2",
            "--set=train.max_steps=8",
            "--set=train.log_interval=1",
            "--set=train.eval_interval=4",
            "--set=train.save_interval=4",
            f"--set=train.run_dir={run_dir}",
            "--device=cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    code, text = cli(f"--run={run_dir}", f"--output={tmp_path / 'ok'}")
    assert code == 0, text
    data = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert data["healthy"] and data["logged_steps"] == 8 and data["spikes"] == []
    assert [c["step"] for c in data["checkpoints"]] == [4, 8]
    assert data["checkpoints"][0]["hcl"]["2"]["max_lambda"] < 0
    chart = (tmp_path / "ok" / "grad_norm.svg").read_text()
    xml.dom.minidom.parseString(chart)
    assert "gradient norm per logged step" in chart and "grad_norm.svg" in text

    # the run's latest checkpoint as the starting point of a diagnosis
    code, text = cli(
        f"--checkpoint={run_dir}",
        f"--set=data.datasets=[{{path: {ecoli}}}]",
        "--set=data.seq_len=32",
        "--steps=2",
        "--device=cpu",
        f"--output={tmp_path / 'from-ckpt'}",
    )
    assert code == 0, text
    data = json.loads((tmp_path / "from-ckpt" / "report.json").read_text())
    assert data["source"].endswith("step_00000008") and data["model"]["hcl_form"] == "modal"
    assert [v["name"] for v in data["variants"]] == ["vortex", "modal"]

    # the same run with one logged step's gradient norm 100x: reported as a spike, exit 3
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train = [r for r in records if r["kind"] == "train"]
    train[5]["grad_norm"] *= 100
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, text = cli(f"--run={run_dir}", f"--output={tmp_path / 'bad'}")
    assert code == 3 and "spikes" in text
    data = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert [(s["step"], s["problem"]) for s in data["spikes"]] == [(6, "spike")]
    spike = data["spikes"][0]
    assert spike["ratio"] == pytest.approx(spike["grad_norm"] / spike["median"]) and spike["ratio"] > 10
    flagged = [r for r in read_rows(tmp_path / "bad" / "steps.csv") if r["problem"]]
    assert [r["step"] for r in flagged] == ["6"]

    (run_dir / "metrics.jsonl").write_text("{not json\n")
    code, text = cli(f"--run={run_dir}", f"--output={tmp_path / 'broken'}")
    assert code == 2 and "metrics.jsonl" in text and "not a metrics record" in text
    assert not (tmp_path / "broken").exists()


# ---------------------------------------------------------------- bad input


def test_bad_input_exits_2_with_a_message(ecoli, tmp_path):
    base = reproduction_args(ecoli, tmp_path / "out", steps=2)
    code, text = cli(*base, "--steps=0")
    assert code == 2 and "diagnose.steps" in text and ">= 1" in text
    code, text = cli(*base, "--variants=vortex,moda")
    assert code == 2 and "unknown variant term 'moda'" in text and "did you mean 'modal'" in text
    assert "--variants" in text and "diagnose.variants" in text
    code, text = cli(*base, "--variants=vortex,modal+lr=0")  # the shorthand meets the same checks
    assert code == 2 and "--variants: config key 'diagnose.variants.1.lr': must be finite and > 0" in text
    code, text = cli(*base, "--variants=modal+lr=1e-3", "--lr=1e-2,1e-3")
    assert code == 2 and "diagnose.variants.0.lr" in text and "listed in diagnose.lr" in text
    code, text = cli(*base, f"--set=data.datasets=[{{path: {tmp_path / 'nope'}}}]")
    assert code == 2 and "nope" in text
    code, text = cli(*base[1:], f"--checkpoint={tmp_path / 'missing'}")
    assert code == 2 and "missing" in text
    code, text = cli(*base, f"--checkpoint={tmp_path / 'missing'}")
    assert code == 2 and "not both" in text
    code, text = cli(*base[1:])
    assert code == 2 and "no model to diagnose" in text
    (tmp_path / "a-file").write_text("")
    code, text = cli(*base, f"--output={tmp_path / 'a-file'}", "--overwrite")
    assert code == 2 and "not a directory" in text and "step" not in text  # refused before training
    code, text = cli(*base, f"--output={tmp_path / 'a-file' / 'out'}")
    assert code == 2 and "not a writable directory" in text and "step" not in text  # before training
    code, text = cli(f"--run={tmp_path / 'norun'}", f"--output={tmp_path / 'o'}")
    assert code == 2 and "no such run directory" in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_path_flags_that_read_as_yaml_numbers_or_booleans_stay_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text = cli("--run=2024", "--output=yes")
    assert code == 2 and "2024: no such run directory" in text and "expected a path" not in text


def test_post_hoc_bad_run_directories_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code, text = cli(f"--run={run_dir}", f"--output={tmp_path / 'a'}")
    assert code == 2 and "no metrics log" in text
    (run_dir / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe\n')
    code, text = cli(f"--run={run_dir}", f"--output={tmp_path / 'b'}")
    assert code == 2 and "not UTF-8 text" in text
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "grad_norm": 1.0}\n')
    code, text = cli(f"--run={run_dir}", f"--output={tmp_path / 'c'}")
    assert code == 2 and "config.yaml" in text and "missing" in text
    assert not any((tmp_path / name).exists() for name in "abc")
    (run_dir / "config.yaml").write_text("data:\n  seq_len: 64\n")
    code, text = cli(f"--run={run_dir}", f"--output={tmp_path / 'd'}")
    assert code == 0 and "1 logged steps" in text
    # no finite gradient norm at all (missing in the log): a non-finite spike, the plot has no log axis
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    code, text = cli(f"--run={run_dir}", f"--output={tmp_path / 'e'}")
    assert code == 3 and "1 spike(s)" in text
    data = json.loads((tmp_path / "e" / "report.json").read_text())
    assert [(s["step"], s["problem"], s["grad_norm"]) for s in data["spikes"]] == [(1, "non-finite", "nan")]
