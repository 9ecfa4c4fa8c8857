"""Which root config dataclass each kind of config file validates against.

Each command has one root dataclass made of sections; `evo2 config show/validate` finds it here by kind
(given, or inferred from the file's top-level sections). Imported lazily so `evo2 -h` stays fast.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from evo2_cli.errors import InputError

SCHEMAS: dict[str, str] = {
    "preprocess": "evo2_cli.data.preprocess.config:PreprocessJob",
    "model": "evo2_cli.model.config:ModelJob",
    "train": "evo2_cli.train.config:TrainJob",
    "finetune": "evo2_cli.finetune.config:FinetuneJob",
    "diagnose": "evo2_cli.diagnose.config:DiagnoseJob",
    "infer": "evo2_cli.infer.config:InferJob",
}


def schema_for(kind: str) -> type:
    if kind not in SCHEMAS:
        raise InputError(f"unknown config kind '{kind}'; known kinds: {', '.join(sorted(SCHEMAS))}")
    module, name = SCHEMAS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def infer_kind(raw: dict[str, Any], path: Path) -> str:
    """The kind whose sections cover the file's top-level keys with the fewest sections to spare."""
    import dataclasses

    candidates = []
    for kind in SCHEMAS:
        sections = {f.name for f in dataclasses.fields(schema_for(kind))}
        if set(raw) <= sections:
            candidates.append((len(sections), kind))
    candidates.sort()
    if not candidates:
        raise InputError(
            f"{path}: top-level sections {sorted(raw)} match no config kind; "
            f"pass --kind (one of {', '.join(sorted(SCHEMAS))})"
        )
    if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
        raise InputError(
            f"{path}: sections {sorted(raw)} fit several kinds "
            f"({candidates[0][1]}, {candidates[1][1]}); pass --kind"
        )
    return candidates[0][1]
