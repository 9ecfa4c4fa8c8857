"""`evo2 infer ...` through the CLI: outputs, determinism, exit codes of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import VORTEX_TINY
from typer.testing import CliRunner

from evo2_cli.cli import app

runner = CliRunner()


@pytest.fixture
def fasta(tmp_path):
    rng = np.random.default_rng(0)
    seqs = {
        f"rec{i}": bytes(rng.choice(list(b"ACGTacgt"), n).astype(np.uint8)).decode()
        for i, n in enumerate((40, 7, 90))
    }
    path = tmp_path / "in.fa"
    path.write_text("".join(f">{k} description\n{v[:30]}\n{v[30:]}\n" for k, v in seqs.items()))
    return path


def invoke(*args: object):
    return runner.invoke(app, ["infer", *map(str, args)])


def said(result) -> str:
    """Everything the command printed, with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _fasta_records(text: str) -> list[tuple[str, str]]:
    blocks = [b for b in text.split(">") if b.strip()]
    return [(b.split("\n", 1)[0], b.split("\n", 1)[1].replace("\n", "")) for b in blocks]


def test_generate_to_stdout_and_file(base, tmp_path):
    args = [
        "generate",
        base,
        "-p",
        "ACGTAC",
        "-p",
        "ggc",
        "-n",
        9,
        "--num-samples",
        2,
        "--seed",
        3,
        "--device",
        "cpu",
    ]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    records = _fasta_records(first.stdout)
    assert [h.split()[0] for h, _ in records] == [
        "prompt1_sample1",
        "prompt1_sample2",
        "prompt2_sample1",
        "prompt2_sample2",
    ]
    assert all(len(s) == 9 and set(s) <= set("ACGT") for _, s in records)
    assert "top_k=4 temperature=1 top_p=1 seed=3" in records[0][0]
    out, logprobs = tmp_path / "gen.fa", tmp_path / "lp.tsv"
    second = invoke(*args, "--batch-size", 1, "-o", out, "--logprobs", logprobs, "--include-prompt")
    assert second.exit_code == 0, second.output
    again = _fasta_records(out.read_text())
    assert [s for _, s in again] == [
        p + s for p, (_, s) in zip(["ACGTAC"] * 2 + ["GGC"] * 2, records, strict=True)
    ]
    lines = logprobs.read_text().splitlines()
    assert lines[0] == "id\tposition\ttoken\tlogprob" and len(lines) == 1 + 4 * 9
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_generate_prompts_from_fasta_and_greedy(base, fasta):
    result = invoke(
        "generate",
        base,
        "--prompt-fasta",
        fasta,
        "-n",
        5,
        "--top-k",
        1,
        "--temperature",
        0,
        "--threads",
        1,
    )
    assert result.exit_code == 0, result.output
    assert [h.split()[0] for h, _ in _fasta_records(result.stdout)] == [
        "rec0_sample1",
        "rec1_sample1",
        "rec2_sample1",
    ]
    assert "greedy" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", ""], "empty sequence"),
        (["-p", "ACGZ"], "position 4 holds 'Z'"),
        (["-p", "ACGZ"], "or pass --invalid n to map other characters to N"),
        (["-p", "AC", "--top-p", "0"], "--top-p: config key 'generate.top_p': must be in (0, 1]"),
        (["-p", "AC", "--top-p", "1.2"], "--top-p: config key 'generate.top_p': must be in (0, 1]"),
        (["-p", "AC", "--temperature", "0"], "--temperature: config key 'generate.temperature': must be > 0"),
        (["-p", "AC", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["-p", "AC", "--threads", "-1"], "--threads: config key 'runtime.threads': must be >= 0"),
        (["-p", "AC", "--chunk", "1"], "--chunk"),  # the chunked prefill needs chunks of 2 or more
        ([], "no prompt"),
        (
            ["-p", "AC", "--device", "cuda:7"]
            if not torch.cuda.is_available()
            else ["-p", "AC", "--dtype", "x"],
            "--d",
        ),
    ],
)
def test_generate_bad_input_exits_2(base, args, message):
    result = invoke("generate", base, *args)
    assert result.exit_code == 2, result.output
    assert message in said(result) and "Traceback" not in said(result)


def test_generate_invalid_policy_maps_to_n(base):
    result = invoke("generate", base, "-p", "ACG-T", "--invalid", "n", "-n", 2, "--include-prompt")
    assert result.exit_code == 0, result.output
    assert _fasta_records(result.stdout)[0][1].startswith("ACGNT")


def test_score_tsv_csv_per_token(base, fasta, tmp_path):
    out = tmp_path / "scores.tsv"
    result = invoke("score", base, fasta, "-o", out, "--per-token", tmp_path / "pt.tsv", "--window", 32)
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in out.read_text().splitlines()]
    assert lines[0] == ["id", "length", "n_scored", "sum_ll", "mean_ll", "bits_per_base"]
    assert [(r[0], r[1], r[2]) for r in lines[1:]] == [
        ("rec0", "40", "39"),
        ("rec1", "7", "6"),
        ("rec2", "90", "89"),
    ]
    for row in lines[1:]:
        assert float(row[4]) == pytest.approx(float(row[3]) / int(row[2]))
        assert float(row[5]) == pytest.approx(-float(row[4]) / np.log(2))
    per_token = [line.split("\t") for line in (tmp_path / "pt.tsv").read_text().splitlines()]
    assert per_token[0] == ["id", "position", "base", "logprob"] and len(per_token) == 1 + 39 + 6 + 89
    assert per_token[1][:3] == ["rec0", "1", fasta.read_text().splitlines()[1][1].upper()]
    rec0 = sum(float(r[3]) for r in per_token[1:] if r[0] == "rec0")
    assert rec0 == pytest.approx(float(lines[1][3]), abs=1e-3)
    csv = invoke("score", base, fasta, "--rc", "--format", "csv")
    assert csv.exit_code == 0 and csv.stdout.splitlines()[0].endswith("sum_ll_forward,sum_ll_rc")


def test_score_bad_input(base, tmp_path, fasta):
    bad = tmp_path / "bad.fa"
    bad.write_text(">x\nACGT\n>y\nAC*GT\n")
    result = invoke("score", base, bad)
    assert result.exit_code == 2 and "bad.fa:4" in said(result)
    # a misspelled device is named before anything is read (the FASTA here does not even exist)
    result = invoke("score", base, tmp_path / "missing.fa", "--device", "gpu")
    assert result.exit_code == 2 and "--device: config key 'runtime.device'" in said(result)
    result = invoke("score", base, fasta, "--window", 8, "--overlap", 8)
    assert result.exit_code == 2 and "--overlap" in said(result)
    result = invoke("score", base, fasta, "--batch-tokens", 0)
    assert (
        result.exit_code == 2
        and "--batch-tokens: config key 'context.batch_tokens': must be >= 1" in said(result)
    )
    (tmp_path / "empty.fa").write_text("")
    for missing_or_empty in (tmp_path / "missing.fa", tmp_path / "empty.fa"):
        result = invoke("score", base, missing_or_empty)
        assert result.exit_code == 2 and str(missing_or_empty) in said(result)
        assert "parameters" not in said(result)  # it failed before loading the model
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        result = invoke("score", base, fasta, "-o", tmp_path / "s.parquet")
        assert result.exit_code == 2 and "pyarrow" in said(result)
        assert not (tmp_path / "s.parquet").exists()


def test_score_output_is_atomic(base, tmp_path):
    bad = tmp_path / "late.fa"
    bad.write_text(">a\nACGTACGT\n>b\nACGT\n>c\nAC.GT\n")
    out = tmp_path / "scores.tsv"
    result = invoke("score", base, bad, "-o", out, "--per-token", tmp_path / "pt.tsv")
    assert result.exit_code == 2 and "late.fa:6" in said(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.fa"]  # nothing half-written


@pytest.mark.parametrize(
    "command",
    [
        ["score", "{fasta}", "-o", "{bad}"],
        ["score", "{fasta}", "--per-token", "{bad}"],
        ["embed", "{fasta}", "-o", "{bad}.npy"],
        ["generate", "-p", "ACG", "--logprobs", "{bad}"],
    ],
)
def test_unwritable_output_exits_2_before_any_work(base, fasta, tmp_path, command):
    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "a_file" / "out.tsv"  # a file where a directory should be
    result = invoke(command[0], base, *[a.format(fasta=fasta, bad=bad) for a in command[1:]])
    assert result.exit_code == 2, result.output
    assert "cannot write there" in said(result)
    assert "parameters" not in said(result)  # it failed before loading the model


def test_score_parquet(base, fasta, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    result = invoke("score", base, fasta, "-o", tmp_path / "s.parquet")
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column("id").to_pylist() == ["rec0", "rec1", "rec2"]


def test_embed_npy_and_safetensors(base, fasta, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    result = invoke("embed", base, fasta, "-o", tmp_path / "e.npy", "--layer", "-1")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "e.npy").shape == (3, 8)
    index = (tmp_path / "e.npy.ids.tsv").read_text().splitlines()
    assert index == ["index\tid\tlength\toffset", "0\trec0\t40\t0", "1\trec1\t7\t1", "2\trec2\t90\t2"]
    result = invoke("embed", base, fasta, "-o", tmp_path / "e.safetensors", "--pooling", "none")
    assert result.exit_code == 0, result.output
    tensors = load_file(tmp_path / "e.safetensors")
    assert tensors["embeddings"].shape == (137, 8) and tensors["offsets"].tolist() == [0, 40, 47, 137]
    with safe_open(tmp_path / "e.safetensors", "pt") as handle:
        assert handle.metadata()["pooling"] == "none"
    written = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("e."))
    assert written == ["e.npy", "e.npy.ids.tsv", "e.safetensors", "e.safetensors.ids.tsv"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    result = invoke("embed", base, fasta, "-o", tmp_path / "e.pt")
    assert result.exit_code == 2
    result = invoke("embed", base, fasta, "-o", tmp_path / "x.npy", "--layer", "blocks.9")
    assert result.exit_code == 2 and "out of range" in said(result)
    assert "parameters" not in said(result)  # checked on the config, before the weights load
    result = invoke("embed", base, fasta, "-o", tmp_path / "x.npy", "--layer", "blocks.3.filter")
    assert result.exit_code == 2 and "not a module of this model" in said(result)
    assert "blocks.N.{pre_norm,post_norm,projections,filter," in said(result)  # the valid names, listed
    result = invoke("embed", base, fasta, "-o", tmp_path / "m.npy", "--layer", "blocks.2.mlp.l3")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "m.npy").shape == (3, 8)
    # A bad --pooling is refused before the model loads (this model path does not even exist).
    result = invoke("embed", tmp_path / "no_model", fasta, "-o", tmp_path / "x.npy", "--pooling", "max")
    assert (
        result.exit_code == 2
        and "--pooling: config key 'embed.pooling': expected one of 'mean' | 'none'" in said(result)
    )


def test_variants(base, fasta, tmp_path):
    chrom = fasta.read_text().splitlines()[1].upper()
    listing = tmp_path / "v.tsv"
    listing.write_text(f"chrom\tpos\tref\talt\nrec0\t5\t{chrom[4]}\tA\nrec0\t10\t{chrom[9]}\tTT\n")
    out = tmp_path / "v.out.tsv"
    result = invoke("variants", base, listing, "-r", fasta, "-o", out, "--window", 20)
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0][:6] == ["chrom", "pos", "ref", "alt", "status", "window_start"]
    assert [r[4] for r in rows[1:]] == ["ok", "ok"]
    wrong = "C" if chrom[4] != "C" else "G"
    listing.write_text(f"rec0\t5\t{wrong}\tA\n")
    result = invoke("variants", base, listing, "-r", fasta)
    assert result.exit_code == 2 and f"ref allele {wrong} does not match" in said(result)
    assert "parameters" not in said(result)  # found before loading the model
    result = invoke("variants", base, listing, "-r", fasta, "--window", 1)
    assert result.exit_code == 2 and "--window: config key 'variants.window': must be >= 2" in said(result)
    assert "parameters" not in said(result)
    result = invoke("variants", base, tmp_path / "unread.tsv", "-r", tmp_path / "unread.fa", "--window", 1)
    assert result.exit_code == 2 and "--window: config key 'variants.window': must be >= 2" in said(
        result
    )  # before reading any file
    listing.write_text("chrZ\t5\tA\tC\n")
    result = invoke("variants", base, listing, "-r", fasta)
    assert result.exit_code == 2 and "chrZ" in said(result)
    listing.write_text("rec0\t5\tA\tC!\n")
    result = invoke("variants", base, listing, "-r", fasta)
    assert result.exit_code == 2, result.output
    # variants has no --invalid switch: the message must not offer one
    assert "alt allele: position 2 holds '!'" in said(result) and "--invalid" not in said(result)


def test_vortex_checkpoint_and_mismatching_config(tmp_path, fasta):
    weights, config = VORTEX_TINY / "state_dict_checkpoint_layout.pt", VORTEX_TINY / "tiny_config.yml"
    result = invoke("score", weights, fasta, "--vortex-config", config)
    assert result.exit_code == 0, result.output
    result = invoke("score", weights, fasta)
    assert result.exit_code == 2 and "--vortex-config" in said(result)
    wrong = tmp_path / "wrong.yml"
    wrong.write_text(
        config.read_text()
        .replace("hidden_size: 64", "hidden_size: 32")
        .replace("num_filters: 64", "num_filters: 32")
    )
    result = invoke("score", weights, fasta, "--vortex-config", wrong)
    assert result.exit_code == 2 and "shape" in said(result) and "Traceback" not in said(result)


def test_checkpoint_not_matching_its_config_exits_2(base, tmp_path):
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(base, edited)
    config = edited / "config.yaml"
    config.write_text(config.read_text().replace("inner_mlp_size: 16", "inner_mlp_size: 24"))
    result = invoke("generate", edited, "-p", "ACGT", "-n", 2)
    assert result.exit_code == 2, result.output
    squeezed = "".join(result.output.split())  # a long path may wrap anywhere
    assert "config.yaml:corrupt:itssha256doesnotmatchmeta.json" in squeezed
    result = invoke("generate", edited, "-p", "ACGT", "-n", 2, "--no-verify")  # edited on purpose
    assert result.exit_code == 2, result.output
    assert "has shape (16, 8), expected (24, 8)" in said(result) and "Traceback" not in said(result)


def test_run_directory_resolves_latest(base, tmp_path, fasta):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base, run / "checkpoints" / "step_00000005")
    (run / "checkpoints" / "latest").symlink_to("step_00000005")
    (run / "config.yaml").write_text(json.dumps({}))
    direct = invoke("score", base, fasta)
    via_run = invoke("score", run, fasta)
    assert via_run.exit_code == 0, via_run.output
    assert via_run.stdout == direct.stdout


def test_per_token_embeddings_stream_to_a_file_that_memory_maps(base, tmp_path):
    """A record longer than the chunk, per token: the file is written as the chunks come, and memory-maps
    to exactly the in-memory result (.npy with numpy, .safetensors with safe_open)."""
    from safetensors import safe_open

    from evo2_cli.infer.embedding import embed_sequences
    from evo2_cli.infer.loading import load_inference_model
    from evo2_cli.infer.sequences import read_sequences

    rng = np.random.default_rng(4)
    fasta = tmp_path / "long.fa"
    fasta.write_text(
        "".join(f">r{i}\n{''.join(rng.choice(list('ACGT'), n))}\n" for i, n in enumerate((300, 20, 77)))
    )
    args = ["--pooling", "none", "--chunk", 32, "--layer", "blocks.2.mlp.l3", "--device", "cpu"]
    for name in ("e.npy", "e.safetensors"):
        result = invoke("embed", base, fasta, "-o", tmp_path / name, *args)
        assert result.exit_code == 0, result.output
    expected = embed_sequences(
        load_inference_model(base), list(read_sequences(fasta)), layer="blocks.2.mlp.l3", pooling="none"
    )  # exact in one forward per record (the default chunk is longer than every record)
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.shape == (397, 8)
    np.testing.assert_allclose(mapped, expected.vectors, atol=1e-5)
    with safe_open(tmp_path / "e.safetensors", "np") as handle:
        np.testing.assert_array_equal(handle.get_tensor("embeddings"), np.asarray(mapped))
        assert handle.get_tensor("offsets").tolist() == [0, 300, 320, 397]
        assert handle.metadata() == {"layer": "blocks.2.mlp.l3", "pooling": "none", "model": str(base)}


def test_score_modes_and_their_flags(base, tmp_path):
    rng = np.random.default_rng(5)
    fasta = tmp_path / "long.fa"
    fasta.write_text(f">r\n{''.join(rng.choice(list('ACGT'), 200))}\n")
    sums = {}
    for mode, extra in (("exact", ["--chunk", 16]), ("exact", []), ("windows", ["--window", 32])):
        result = invoke(
            "score", base, fasta, "-o", tmp_path / "s.tsv", "--mode", mode, *extra, "--rc", "--overwrite"
        )
        assert result.exit_code == 0, result.output
        sums[(mode, bool(extra))] = float((tmp_path / "s.tsv").read_text().splitlines()[1].split("\t")[3])
        assert ("estimated memory" in said(result)) == (extra == ["--chunk", 16])  # the pre-flight, printed
    assert sums[("exact", True)] == pytest.approx(sums[("exact", False)], abs=1e-3)  # chunked = one forward
    assert sums[("windows", True)] != pytest.approx(sums[("exact", False)], abs=1e-3)  # windows cut context
    for bad, message in (
        (["--mode", "sliding"], "--mode: config key 'context.mode': expected one of 'exact' | 'windows'"),
        (["--chunk", 1], "--chunk"),
    ):
        result = invoke("score", tmp_path / "no_model", fasta, *bad)
        assert result.exit_code == 2 and message in said(result)


def test_memory_preflight_exits_2_before_the_record_runs(base, tmp_path, monkeypatch):
    from evo2_cli.infer import memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)
    rng = np.random.default_rng(6)
    fasta = tmp_path / "long.fa"
    fasta.write_text(f">r\n{''.join(rng.choice(list('ACGT'), 100))}\n")
    out = tmp_path / "s.tsv"
    result = invoke("score", base, fasta, "-o", out, "--chunk", 16)
    assert result.exit_code == 2
    for fragment in (
        "estimated memory",
        "100 tokens does not fit",
        "--chunk",
        "--dtype bf16",
        "--mode windows",
    ):
        assert fragment in said(result)
    assert not out.exists()
    result = invoke("embed", base, fasta, "-o", tmp_path / "e.npy", "--chunk", 16, "--pooling", "none")
    assert result.exit_code == 2 and "does not fit" in said(result) and not (tmp_path / "e.npy").exists()
    result = invoke("score", base, fasta, "-o", out, "--mode", "windows", "--window", 16)
    assert result.exit_code == 0, result.output  # windows: no KV cache, nothing to refuse


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (["generate", "-p", "ACG", "-n", 4, "-o", "{out}"], "gen.fa"),
        (["generate", "-p", "ACG", "-n", 4, "--logprobs", "{out}"], "lp.tsv"),
        (["score", "{fasta}", "-o", "{out}"], "scores.tsv"),
        (["score", "{fasta}", "--rc", "-o", "{out}"], "scores.csv"),
        (["score", "{fasta}", "--per-token", "{out}"], "pt.tsv"),
        (["embed", "{fasta}", "-o", "{out}"], "e.npy"),
        (["embed", "{fasta}", "--pooling", "none", "-o", "{out}"], "e.safetensors"),
        (["variants", "{variants}", "-r", "{fasta}", "--window", 20, "-o", "{out}"], "v.tsv"),
    ],
)
def test_existing_output_is_replaced_only_with_overwrite_and_only_if_ours(
    base, fasta, tmp_path, command, name
):
    out = tmp_path / name
    chrom = fasta.read_text().splitlines()[1].upper()
    variants = tmp_path / "variants.tsv"
    variants.write_text(f"chrom\tpos\tref\talt\nrec0\t5\t{chrom[4]}\tA\n")
    args = [str(a).format(fasta=fasta, out=out, variants=variants) for a in command[1:]]

    def run(*extra):
        return invoke(command[0], base, *args, "--device", "cpu", *extra)

    assert run().exit_code == 0
    written = out.read_bytes()
    refused = run()
    assert refused.exit_code == 2, refused.output
    assert "output already exists; pass --overwrite to replace it or choose another path" in said(refused)
    assert "parameters" not in said(refused)  # refused before the model loads
    assert out.read_bytes() == written
    replaced = run("--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert out.read_bytes()[:8] == written[:8]
    for foreign in [out] + ([out.with_name(name + ".ids.tsv")] if command[0] == "embed" else []):
        ours = foreign.read_bytes()
        foreign.write_text("my notes\n")
        refused = run("--overwrite")
        assert refused.exit_code == 2, refused.output
        assert f"{foreign.name}: exists and is not" in said(refused) and "written by evo2" in said(refused)
        assert "--overwrite" not in said(refused)  # no hint to force it
        assert foreign.read_text() == "my notes\n"
        foreign.write_bytes(ours)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_overwrite_never_replaces_a_directory_or_an_output_of_another_kind(base, fasta, tmp_path):
    assert invoke("score", base, fasta, "-o", tmp_path / "s.tsv").exit_code == 0
    as_csv = invoke("score", base, fasta, "--format", "csv", "-o", tmp_path / "s.tsv", "--overwrite")
    assert as_csv.exit_code == 2 and "s.tsv: exists and is not a score table (CSV)" in said(as_csv)
    fasta_over_scores = invoke("generate", base, "-p", "ACG", "-o", tmp_path / "s.tsv", "--overwrite")
    assert fasta_over_scores.exit_code == 2 and "is not a FASTA file" in said(fasta_over_scores)
    (tmp_path / "empty_dir").mkdir()
    for directory in (tmp_path / "empty_dir", tmp_path):
        result = invoke("score", base, fasta, "-o", directory, "--overwrite")
        assert (
            result.exit_code == 2 and "is a directory" in said(result) and "--overwrite" not in said(result)
        )
    (tmp_path / "touched.tsv").touch()  # an empty file holds nothing to lose
    result = invoke("score", base, fasta, "-o", tmp_path / "touched.tsv", "--overwrite")
    assert result.exit_code == 0 and (tmp_path / "touched.tsv").read_text().startswith("id\tlength\t")


def test_growing_poles_refuse_the_chunked_prefill_with_the_fix(tmp_path):
    from evo2_cli.model import StripedHyena, preset_config, save_model

    torch.manual_seed(0)
    model = StripedHyena(preset_config("test", hcl_form="vortex"))
    layer = next(i for i, block in enumerate(model.blocks) if block.kind == "hcl")
    with torch.no_grad():
        model.blocks[layer].filter.log_poles[0, :2] = 1e-3  # two growing modes
    save_model(model, tmp_path / "ckpt")
    rng = np.random.default_rng(1)
    fasta = tmp_path / "long.fa"
    fasta.write_text(f">r\n{''.join(rng.choice(list('ACGT'), 64))}\n")
    for command in (
        ["score", fasta, "--chunk", 16],
        ["embed", fasta, "-o", tmp_path / "e.npy", "--chunk", 16],
        ["generate", "-p", "ACGT" * 16, "-n", 2, "--chunk", 16],
    ):
        result = invoke(command[0], tmp_path / "ckpt", *command[1:], "--device", "cpu")
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        text = said(result)
        assert f"hcl poles with lambda >= 0 in layer {layer} (2)" in text
        assert "--chunk 16), which needs decaying poles" in text and "model.hcl_form: modal" in text
        assert ("--mode windows" in text) == (command[0] != "generate")
    assert not (tmp_path / "e.npy").exists()
    windows = invoke(
        "score", tmp_path / "ckpt", fasta, "--mode", "windows", "--window", 16, "--device", "cpu"
    )
    assert windows.exit_code == 0, windows.output


def test_a_config_file_gives_what_the_flags_give(base, fasta, tmp_path):
    by_flags = tmp_path / "flags.tsv"
    args = ["--mode", "windows", "--window", 32, "--overlap", 8, "--rc", "--device", "cpu"]
    assert invoke("score", base, fasta, "-o", by_flags, *args).exit_code == 0
    config = tmp_path / "infer.yaml"
    config.write_text(
        f"checkpoint: {{path: {base}}}\nruntime: {{device: cpu}}\n"
        "context: {mode: windows, window: 32, overlap: 8}\n"
        f"score: {{fasta: {fasta}, output: {tmp_path / 'file.tsv'}, rc: true}}\n"
    )
    result = invoke("score", "-c", config)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "file.tsv").read_bytes() == by_flags.read_bytes()


def test_flags_override_the_file_and_set_overrides_both(base, tmp_path):
    config = tmp_path / "infer.yaml"
    config.write_text(
        f"checkpoint: {{path: {base}}}\ngenerate: {{prompts: [ACGT], max_new_tokens: 2, seed: 1}}\n"
    )
    seeds = {
        (): "seed=1",
        ("--seed", 2): "seed=2",
        ("--seed", 2, "--set", "generate.seed=3"): "seed=3",
    }
    for extra, header in seeds.items():
        result = invoke("generate", "-c", config, *extra)
        assert result.exit_code == 0, result.output
        assert header in result.stdout.splitlines()[0]
    other = invoke("generate", "-c", config, tmp_path / "elsewhere")  # MODEL given: it wins over the file
    assert other.exit_code == 2 and "elsewhere: model not found" in said(other)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("generate: {seeed: 1}\n", ["infer.yaml:1", "config key 'generate.seeed': unknown key", "'seed'"]),
        ("context:\n  chunk: 1\n", ["infer.yaml:2", "config key 'context.chunk': must be >= 2"]),
        ("runtime: {threads: many}\n", ["infer.yaml:1", "config key 'runtime.threads': expected an integer"]),
        ("score: {format: xls}\n", ["config key 'score.format': expected one of 'tsv' | 'csv' | 'parquet'"]),
    ],
)
def test_a_bad_config_file_exits_2_naming_file_line_and_key(base, fasta, tmp_path, text, fragments):
    config = tmp_path / "infer.yaml"
    config.write_text(text)
    result = invoke("score", base, fasta, "-c", config)
    assert result.exit_code == 2, result.output
    assert all(fragment in said(result) for fragment in fragments), said(result)
    assert "parameters" not in said(result)  # refused before the model loads


@pytest.mark.parametrize(
    ("args", "key", "given_by"),
    [
        (["score"], "checkpoint.path", "give MODEL"),
        (["score", "{base}"], "score.fasta", "give FASTA"),
        (["embed", "{base}", "{fasta}"], "embed.output", "give --output"),
        (["variants", "{base}", "{fasta}"], "variants.reference", "give --reference"),
    ],
)
def test_what_a_subcommand_needs_comes_from_the_command_line_or_the_file(base, fasta, args, key, given_by):
    result = invoke(*(a.format(base=base, fasta=fasta) for a in args))
    assert result.exit_code == 2, result.output
    assert f"config key '{key}': is required" in said(result) and given_by in said(result)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["score", "x.fa"], ["'x.fa' is a FASTA, not a model", "MODEL x.fa, or --set score.fasta=x.fa"]),
        (["variants", "x.fa"], ["'x.fa' is a FASTA, not a model", "as --reference x.fa"]),
        (
            ["embed", "seqs.txt"],
            ["'embed.fasta': is required", "MODEL seqs.txt, or --set embed.fasta=seqs.txt"],
        ),
    ],
)
def test_a_lone_positional_read_as_model_says_so_and_how_to_give_it(
    fasta, tmp_path, monkeypatch, args, fragments
):
    monkeypatch.chdir(tmp_path)  # relative names: nothing depends on the temporary path
    (tmp_path / "x.fa").write_bytes(fasta.read_bytes())
    (tmp_path / "infer.yaml").write_text("checkpoint: {path: no/such/model}\n")
    result = invoke(args[0], "-c", "infer.yaml", *args[1:])
    assert result.exit_code == 2, result.output
    assert all(fragment in said(result) for fragment in fragments), said(result)
    assert "a lone positional is the model" in said(result)
