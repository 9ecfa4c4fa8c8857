"""Embeddings: the output of one submodule of the model for every position of FASTA records.

`--layer` names the submodule as the official Evo 2 engine does (`Evo2.forward(..., layer_names=[...])`
puts a forward hook on `model.get_submodule(name)` and keeps `output[0]` when the module returns a tuple),
and our module tree mirrors Vortex's, so the same names give the same tensors:
    blocks.N                  the residual stream after block N (also `N`, and `-N` counting from the end)
    blocks.N.mlp, .mlp.l3     the MLP's output (before it is added to the residual stream); .mlp.l1, .mlp.l2
    blocks.N.filter           a hyena block's gated filter output, before out_filter_dense
    blocks.N.pre_norm, .post_norm, .projections, .out_filter_dense
    blocks.N.inner_mha_cls    an attention block's attention output (ours: blocks.N.attn); .Wqkv, .out_proj
    embedding_layer, norm     the token embeddings; the final RMSNorm (also `final_norm`), what the tied
                              unembedding reads
Every name is captured with a forward hook on that module, as the official engine does.
Default: `blocks.{num_layers // 2}`, a middle layer: Evo 2's own embedding examples read intermediate blocks,
which carry more general features than the last one (trained to predict the next byte).

`pooling='mean'` averages over every position of the record; `'none'` keeps one vector per position
(`embedding_pieces` yields them as they are computed, for streaming to a file). Records longer than one
chunk are run exactly through the chunked prefill, or windowed with `Context(mode='windows')` (context.py;
each position's vector then comes from the window that gives it the most left context).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from evo2_cli.errors import InputError
from evo2_cli.infer.config import Context, Pooling
from evo2_cli.infer.context import Readout, per_token_pieces
from evo2_cli.infer.sequences import Sequence
from evo2_cli.model.config import ModelConfig
from evo2_cli.model.model import RotaryEmbedding, StripedHyena

FINAL_NORM = "final_norm"  # our first name for `norm`, kept
VORTEX_NAMES = {"inner_mha_cls": "attn"}  # the official engine's module names that differ from ours


@dataclass(frozen=True)
class Layer:
    name: str  # as reported in the output's metadata: the user's spelling, indices as blocks.N
    module: str  # our submodule the hook goes on


def default_layer(model: StripedHyena) -> str:
    return f"blocks.{len(model.blocks) // 2}"


def hookable_modules(model: nn.Module) -> list[str]:
    """Our submodules whose output is one row per position (B, L, F): every module except the block list
    and rotary embeddings (called twice per attention, on q and k, with head-major outputs)."""
    return [
        name
        for name, module in model.named_modules()
        if name and not isinstance(module, (nn.ModuleList, RotaryEmbedding))
    ]


def _official_spelling(name: str) -> str:
    ours_to_official = {ours: official for official, ours in VORTEX_NAMES.items()}
    return ".".join(ours_to_official.get(part, part) for part in name.split("."))


def _valid_names(model: nn.Module) -> str:
    """What --layer accepts, in a few lines: block submodules listed once per block kind."""
    n = len(model.blocks)
    groups: dict[tuple[str, ...], list[int]] = {}  # hyena blocks share one set of submodules
    for i, block in enumerate(model.blocks):
        suffixes = tuple(_official_spelling(name) for name in hookable_modules(block))
        groups.setdefault(suffixes, []).append(i)
    per_group = "; ".join(
        f"blocks.N.{{{','.join(suffixes)}}} for N in {','.join(map(str, indices))}"
        for suffixes, indices in groups.items()
    )
    return (
        f"N (0..{n - 1}, or -{n}..-1) or blocks.N (the residual stream after block N); {per_group} "
        f"(inner_mha_cls is also spelled attn); embedding_layer; norm (or {FINAL_NORM})"
    )


def resolve_layer(model: nn.Module, layer: str | int | None) -> Layer:
    """The submodule `layer` names (see the module docstring); InputError lists the valid names.
    Needs only the module tree: commands check --layer on a model built on the meta device, before the
    weights load."""
    n = len(model.blocks)
    text = str(default_layer(model) if layer is None else layer).strip()
    if text == FINAL_NORM:
        return Layer(text, "norm")
    parts = text.split(".")
    if parts[0] == "blocks" and len(parts) > 1:
        number, rest = parts[1], parts[2:]
    else:
        number, rest = (parts[0], []) if len(parts) == 1 else ("", parts)
    try:
        index = int(number)
    except ValueError:
        if text in hookable_modules(model):  # embedding_layer, norm
            return Layer(text, text)
        raise InputError(
            f"--layer: {text!r} is not a layer of this model; valid: {_valid_names(model)}"
        ) from None
    if not -n <= index < n:
        raise InputError(
            f"--layer {text}: out of range for a model with {n} blocks (0..{n - 1}, or -{n}..-1)"
        )
    module = ".".join(["blocks", str(index % n), *(VORTEX_NAMES.get(part, part) for part in rest)])
    if module not in hookable_modules(model):
        raise InputError(
            f"--layer: {text!r} is not a module of this model (block {index % n} is an "
            f"{model.blocks[index % n].kind} block); valid: {_valid_names(model)}"
        )
    return Layer(".".join(["blocks", str(index % n), *rest]), module)


def resolve_layer_in_config(config: ModelConfig, layer: str | int | None) -> Layer:
    """`resolve_layer` on a model of `config` built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return resolve_layer(StripedHyena(config), layer)


def output_width(model: nn.Module, layer: Layer) -> int:
    """Features per position of `layer`'s output (Linear: out_features; everything else: hidden size)."""
    module = model.get_submodule(layer.module)
    if isinstance(module, nn.Linear):
        return module.out_features
    return model.config.hidden_size


@contextlib.contextmanager
def capture(model: nn.Module, layer: Layer) -> Iterator[list[Tensor]]:
    """A forward hook on `layer`'s module while the block runs: every call appends its output (`output[0]`
    for modules that return a tuple, as the official engine's hook does), detached."""
    outputs: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: Tensor | tuple) -> None:
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    handle = model.get_submodule(layer.module).register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def _blocks_needed(layer: Layer) -> tuple[list[int], bool]:  # (return_hidden_layers, logits) for the layer
    parts = layer.module.split(".")
    return ([int(parts[1])] if parts[0] == "blocks" else []), layer.module == "norm"


def hidden_states(model: StripedHyena, ids: Tensor, layer: Layer) -> Tensor:
    """(B, L, F) float32: `layer`'s output in one forward over ids (B, L)."""
    with capture(model, layer) as outputs, torch.no_grad():
        model(ids, *_blocks_needed(layer))
    (output,) = outputs
    return output.float()


def chunked_hidden_states(model: StripedHyena, ids: Tensor, layer: Layer, chunk: int) -> Iterator[Tensor]:
    """`hidden_states` through the chunked prefill: (B, c, F) float32 per chunk, in order. A block's own
    output comes from prefill_chunks' hidden states (a hyena block's prefill is not its forward, so a hook
    on the block would not fire); every other module is hooked as in one forward."""
    parts = layer.module.split(".")
    block = int(parts[1]) if len(parts) == 2 and parts[0] == "blocks" else None
    chunks = model.prefill_chunks(ids, model.new_cache(ids.shape[0]), chunk, *_blocks_needed(layer))
    with capture(model, layer) as outputs:
        for _, hidden in chunks:
            if block is not None:
                yield hidden[block].float()
            else:
                (output,) = outputs
                outputs.clear()
                yield output.float()


def layer_readout(model: StripedHyena, layer: Layer) -> Readout:
    return Readout(
        lambda ids: hidden_states(model, ids, layer),
        lambda ids, chunk: chunked_hidden_states(model, ids, layer, chunk),
    )


@dataclass(frozen=True)
class Embeddings:
    layer: str
    pooling: Pooling
    ids: list[str]
    lengths: list[int]
    vectors: np.ndarray  # mean: (N, D); none: (sum of lengths, D), record i at offsets[i]:offsets[i+1]

    @property
    def offsets(self) -> np.ndarray:
        return record_offsets(self.lengths)


def record_offsets(lengths: list[int]) -> np.ndarray:
    """(N + 1,) int64: record i's per-token rows are offsets[i]:offsets[i + 1]."""
    return np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)


def embedding_pieces(
    model: StripedHyena,
    sequences: Iterable[Sequence],
    layer: Layer,
    context: Context = Context(),
    *,
    on_tokens: Callable[[int], None] | None = None,
    before_long: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(record index, rows (n, F) float32) pieces of every record's per-position vectors, records in input
    order and each record's rows in position order (context.per_token_pieces)."""
    return per_token_pieces(
        model,
        (s.tokens for s in sequences),
        layer_readout(model, layer),
        context,
        on_tokens=on_tokens,
        before_long=before_long,
    )


def embed_sequences(
    model: StripedHyena,
    sequences: list[Sequence],
    *,
    layer: Layer | str | int | None = None,
    pooling: Pooling = "mean",
    context: Context = Context(),
    on_tokens: Callable[[int], None] | None = None,
    before_long: Callable[[int], None] | None = None,
) -> Embeddings:
    """Every record's vectors in memory (mean: one per record; none: one per position, concatenated).
    `layer`: a resolved Layer, or what `resolve_layer` takes."""
    chosen = layer if isinstance(layer, Layer) else resolve_layer(model, layer)
    width = output_width(model, chosen)
    sums = np.zeros((len(sequences), width), np.float64)
    rows: list[np.ndarray] = []
    pieces = embedding_pieces(model, sequences, chosen, context, on_tokens=on_tokens, before_long=before_long)
    for index, piece in pieces:
        if pooling == "mean":
            sums[index] += piece.sum(0, dtype=np.float64)
        else:
            rows.append(piece)
    lengths = [len(s.tokens) for s in sequences]
    if pooling == "mean":
        vectors = (sums / np.maximum(lengths, 1)[:, None]).astype(np.float32)
    else:
        vectors = np.concatenate(rows) if rows else np.zeros((0, width), np.float32)
    return Embeddings(chosen.name, pooling, [s.id for s in sequences], lengths, vectors)
