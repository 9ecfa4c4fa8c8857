"""The strict config loader: types, unknown keys, ranges, overrides, line numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from evo2_cli.config import FieldError, check, load_config, to_yaml
from evo2_cli.errors import ConfigError


@dataclass
class Optim:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "constant"] = "cosine"

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")


@dataclass
class Run:
    steps: int = 10
    name: str | None = None
    out: Path = Path("runs/x")
    tags: list[str] = field(default_factory=list)
    verbose: bool = False


@dataclass
class Job:
    optim: Optim = field(default_factory=Optim)
    run: Run = field(default_factory=Run)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_and_values(tmp_path):
    cfg = load_config(Job, write(tmp_path, "optim:\n  lr: 1e-3\nrun:\n  steps: 5\n  tags: [a, b]\n"))
    assert cfg.optim.lr == pytest.approx(1e-3)  # 1e-3 without a dot still reads as a float
    assert cfg.run.steps == 5 and cfg.run.tags == ["a", "b"]
    assert cfg.optim.betas == (0.9, 0.95)
    assert isinstance(cfg.run.out, Path)


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0\n  lrr: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(Job, path)
    text = str(info.value)
    assert f"{path}:3" in text and "optim.lrr" in text and "did you mean 'lr'" in text
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("yaml_text", "key", "line"),
    [
        ("run:\n  steps: ten\n", "run.steps", 2),
        ("run:\n  steps: true\n", "run.steps", 2),
        ("run:\n  verbose: 1\n", "run.verbose", 2),
        ("optim:\n  schedule: linear\n", "optim.schedule", 2),
        ("optim:\n  betas: [0.9]\n", "optim.betas", 2),
        ("\n\noptim:\n  lr: -1\n", "optim.lr", 4),
        ("optim: 3\n", "optim", 1),
    ],
)
def test_bad_values(tmp_path, yaml_text, key, line):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(Job, path)
    assert info.value.key == key
    assert info.value.where == f"{path}:{line}"


def test_duplicate_key_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(Job, write(tmp_path, "run:\n  steps: 1\n  steps: 2\n"))
    with pytest.raises(Exception, match="not valid YAML"):
        load_config(Job, write(tmp_path, "run: [\n"))
    with pytest.raises(Exception, match="must be a mapping"):
        load_config(Job, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(Exception, match="not found"):
        load_config(Job, tmp_path / "missing.yaml")


def test_overrides_go_through_the_validator(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0\n")
    cfg = load_config(Job, path, ["optim.lr=2e-4", "run.name=abc", "run.tags=[x]"])
    assert cfg.optim.lr == pytest.approx(2e-4) and cfg.run.name == "abc" and cfg.run.tags == ["x"]
    with pytest.raises(ConfigError) as info:
        load_config(Job, path, ["optim.lr=0"])
    assert info.value.where == "--set optim.lr"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(Job, path, ["optim.nope=1"])
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(Job, path, ["optim.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(Job, path, ["optim.lr.x=1"])


def test_an_override_labelled_with_its_flag_names_the_flag():
    with pytest.raises(ConfigError) as info:
        load_config(Job, None, [("optim.lr=0", "--lr")])
    assert str(info.value) == "--lr: config key 'optim.lr': must be > 0, got 0.0"
    # a later --set of the same key is what the value came from
    with pytest.raises(ConfigError) as info:
        load_config(Job, None, [("optim.lr=1", "--lr"), "optim.lr=0"])
    assert info.value.where == "--set optim.lr"
    with pytest.raises(ConfigError) as info:
        load_config(Job, None, [("optim.lr=0", None)])
    assert info.value.where == "--set optim.lr"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(Job, None, ["run.tags=[a]"])
    again = load_config(Job, write(tmp_path, to_yaml(cfg)))
    assert again == cfg


def test_field_error_message():
    with pytest.raises(FieldError, match="lr: must be > 0"):
        Optim(lr=0)


def test_set_reaches_into_a_list_the_file_has(tmp_path):
    path = write(tmp_path, "run:\n  tags: [a, b]\n")
    assert load_config(Job, path, ["run.tags.1=c"]).run.tags == ["a", "c"]
    hint = r"(?s)run.tags.2.*has 2 item\(s\).*--set 'run.tags=\[...\]'"
    with pytest.raises(ConfigError, match=hint) as info:
        load_config(Job, path, ["run.tags.2=c"])
    assert info.value.exit_code == 2
    with pytest.raises(ConfigError, match=r"run\.tags\.x"):
        load_config(Job, path, ["run.tags.x=c"])
    # no list in the file to index into: the whole list is what to set, not a mapping with a key "0"
    for assignment in ("run.tags.0=c", "run.tags.0.name=c"):
        with pytest.raises(ConfigError, match=r"(?s)run.tags is not a list.*--set 'run.tags=\[...\]'"):
            load_config(Job, None, [assignment])


def test_set_one_key_of_a_listed_dataset():
    from evo2_cli.train.config import TrainJob

    shipped = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny-cpu.yaml"
    job = load_config(TrainJob, shipped, ["data.datasets.0.path=/data/mine"])
    assert str(job.data.datasets[0].path) == "/data/mine"


@pytest.mark.parametrize(
    ("yaml_text", "key", "line", "problem"),
    [
        ("run:\n  steps: !!python/object/apply:os.system [echo hi]\n", "run.steps", 2, "unsafe YAML tag"),
        ("\nrun: !!python/object:os.system\n  nosuch: 1\n", "run", 2, "unsafe YAML tag"),
        ("run:\n  tags: !!python/tuple [a]\n", "run.tags", 2, "unsafe YAML tag"),
        ("!!python/object/apply:os.system\n- echo hi\n", "", 1, "unsafe YAML tag"),
        ("run:\n  name: !custom abc\n", "run.name", 2, "unsupported YAML tag '!custom'"),
    ],
)
def test_a_yaml_tag_that_builds_objects_is_refused_as_such(tmp_path, yaml_text, key, line, problem):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(Job, path)
    assert info.value.key == key and info.value.where == f"{path}:{line}"
    assert problem in str(info.value) and "unknown key" not in str(info.value)


def test_plain_yaml_tags_still_read():
    assert load_config(Job, None, ["run.name=!!str 12"]).run.name == "12"


def test_an_unknown_section_made_by_set_is_blamed_on_set(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0\n")
    for assignment, key in (("foo.bar=1", "foo"), ("optim.foo.x=1", "optim.foo")):
        with pytest.raises(ConfigError) as info:
            load_config(Job, path, [assignment])
        assert info.value.key == key and info.value.where == "--set " + assignment.split("=")[0]
    # A section the file has keeps the file's line, even when an override reaches inside it.
    path = write(tmp_path, "foo:\n  a: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(Job, path, ["foo.bar=1"])
    assert info.value.where == f"{path}:1"


def test_quoted_values_are_cut_to_a_few_hundred_characters(tmp_path):
    huge = "x" * (1 << 20)
    for overrides in ([f"run.steps={huge}"], [f"run.{huge}=1"], [f"{huge}"]):
        with pytest.raises(ConfigError) as info:
            load_config(Job, None, overrides)
        assert len(str(info.value)) < 1000 and "1,048,5" in str(info.value)


@pytest.mark.parametrize("text", ["", "# nothing here\n", "{}\n"])
def test_an_empty_config_file_is_refused_by_every_command(tmp_path, text):
    from typer.testing import CliRunner

    from evo2_cli.cli import app

    path = write(tmp_path, text)
    for args in (["config", "validate"], ["config", "validate", "--kind", "train"], ["train", "-c"]):
        result = CliRunner().invoke(app, [*args, str(path)])
        assert result.exit_code == 2 and f"{path}: empty config file" in result.stderr, result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("kind", "sections"),
    [
        ("train", {"train": {"max_steps": 3}}),
        ("finetune", {"finetune": {"init_from": "ckpt"}}),
        ("diagnose", {"model": {"preset": "test"}}),
    ],
)
def test_no_hidden_default_dataset(tmp_path, kind, sections):
    from evo2_cli.config import build_config
    from evo2_cli.schemas import schema_for

    with pytest.raises(ConfigError) as info:
        build_config(schema_for(kind), sections, name="job.yaml")
    assert info.value.key == "data.datasets" and info.value.where == "job.yaml"
    assert "--set 'data.datasets=[{path: DIR}]'" in str(info.value)
    with_data = {**sections, "data": {"datasets": [{"path": "ds"}]}}
    assert build_config(schema_for(kind), with_data).data.datasets[0].path == Path("ds")


def test_a_finetune_head_reads_no_dataset():
    from evo2_cli.config import build_config
    from evo2_cli.finetune.config import FinetuneJob

    labels = {"fasta": ["labeled.fa"], "header_regex": "label=(\\S+)"}
    job = build_config(FinetuneJob, {"finetune": {"task": "classify", "labels": labels}})
    assert job.data.datasets == []


@pytest.mark.parametrize(
    ("assignment", "key", "problem"),
    [
        ("run.steps=!!python/object/apply:os.system [echo hi]", "run.steps", "unsafe YAML tag"),
        ("run.name=!!python/name:os.system", "run.name", "unsafe YAML tag"),
        ("run.tags=[a, !!python/tuple [b]]", "run.tags.1", "unsafe YAML tag"),
        ("run.name=!custom abc", "run.name", "unsupported YAML tag '!custom'"),
    ],
)
def test_a_yaml_tag_given_through_set_is_refused_and_blamed_on_set(assignment, key, problem):
    with pytest.raises(ConfigError) as info:
        load_config(Job, None, [assignment])
    assert info.value.key == key and info.value.where == "--set " + assignment.split("=")[0]
    assert problem in str(info.value) and "constructor" not in str(info.value)
    with pytest.raises(ConfigError) as info:  # a flag's value is blamed on the flag
        load_config(Job, None, [(assignment, "--name")])
    assert info.value.where == "--name" and problem in str(info.value)


def test_config_show_and_validate_read_an_infer_config():
    from typer.testing import CliRunner

    from evo2_cli.cli import app

    demo = str(Path(__file__).parent.parent / "configs" / "infer" / "demo.yaml")
    shown = CliRunner().invoke(app, ["config", "show", demo, "--set", "context.window=64"])
    assert shown.exit_code == 0, shown.output
    assert "context: {mode: exact, chunk: 8192, window: 64, overlap: 16, batch_tokens: 16384}" in shown.stdout
    validated = CliRunner().invoke(app, ["config", "validate", demo])
    assert validated.exit_code == 0 and "(infer)" in validated.output
