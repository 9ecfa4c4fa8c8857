"""Which parameters a finetune trains: freeze selectors and the LoRA rule.

Selector grammar (`--freeze embedding,blocks.0-11,filters`; comma-separated, each must match something):

    embedding            the token embedding (tied: also the unembedding)
    norm                 the final norm
    filters              every hyena filter parameter (featurizer taps, hcs/hcm taps, D, hcl poles/residues)
    attention            every attention layer (Wqkv, out_proj)
    mlp                  every MLP (l1, l2, l3)
    blocks.R[.PATH]      blocks in R, or only their parameters under PATH (e.g. `blocks.0-3.mlp`,
                         `blocks.*.filter`, `blocks.24.out_filter_dense`); R is N, N-M (inclusive) or *

A selector that matches no parameter, an unknown selector, and a selection that leaves nothing to train are
InputErrors (exit 2).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from evo2_cli.errors import InputError
from evo2_cli.model import is_filter_parameter
from evo2_cli.model.checkpoint import is_adapter_parameter

Predicate = Callable[[str], bool]

_NAMED: dict[str, Predicate] = {
    "embedding": lambda name: name.startswith("embedding_layer."),
    "norm": lambda name: name.startswith("norm."),
    "filters": is_filter_parameter,
    "attention": lambda name: ".attn." in name,
    "mlp": lambda name: ".mlp." in name,
}
_BLOCKS = re.compile(r"^blocks\.(\*|\d+|\d+-\d+)(?:\.([A-Za-z_][\w.]*))?$")
GRAMMAR = "embedding | norm | filters | attention | mlp | blocks.N[-M][.PATH] | blocks.*[.PATH]"


def selector_predicate(selector: str) -> Predicate:
    """The parameter-name test of one selector; InputError when it does not parse."""
    selector = selector.strip()
    if selector in _NAMED:
        return _NAMED[selector]
    match = _BLOCKS.match(selector)
    if match is None:
        raise InputError(f"freeze selector {selector!r} does not parse; expected one of: {GRAMMAR}")
    span, path = match.groups()
    if span == "*":
        first, last = 0, None
    else:
        lo, _, hi = span.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise InputError(f"freeze selector {selector!r}: range {span} is empty; write blocks.LOW-HIGH")

    def predicate(name: str) -> bool:
        parts = name.split(".")
        if parts[0] != "blocks" or len(parts) < 3:
            return False
        index = int(parts[1])
        if index < first or (last is not None and index > last):
            return False
        rest = ".".join(parts[2:])
        return path is None or rest == path or rest.startswith(path + ".")

    return predicate


def parse_selectors(text: str | list[str]) -> list[str]:
    """`a,b` or [`a`, `b,c`] -> [`a`, `b`, `c`] (blank items dropped)."""
    items = text if isinstance(text, list) else [text]
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def frozen_names(model: nn.Module, selectors: list[str]) -> set[str]:
    """Names of the parameters the selectors freeze; every selector must match at least one."""
    names = [name for name, _ in model.named_parameters()]
    frozen: set[str] = set()
    for selector in selectors:
        predicate = selector_predicate(selector)
        matched = {name for name in names if predicate(name)}
        if not matched:
            raise InputError(
                f"freeze selector {selector!r} matches no parameter of this model "
                f"({len(model.blocks)} blocks, layout {model.config.layout}); grammar: {GRAMMAR}"
            )
        frozen |= matched
    return frozen


def trainable_names(
    model: nn.Module, method: str, freeze: list[str], extra: Predicate | None = None
) -> set[str]:
    """The parameters to train: all but the frozen ones (method full), or the LoRA adapters only (method
    lora); `extra` adds parameters in either case (a task head). InputError when nothing is left."""
    names = [name for name, _ in model.named_parameters()]
    if method == "lora":
        chosen = {name for name in names if is_adapter_parameter(name)}
    else:
        chosen = set(names) - frozen_names(model, freeze)
    if extra is not None:
        chosen |= {name for name in names if extra(name)}
    if not chosen:
        raise InputError(
            f"finetune.freeze {freeze} freezes every parameter; nothing would train. Freeze fewer parts "
            "or use method: lora"
        )
    return chosen
