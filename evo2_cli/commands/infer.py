"""`evo2 infer generate | score | embed | variants`: thin Typer layer over evo2_cli.infer.

Every option is the flag of one key of the infer config, declared once on its field (evo2_cli/infer/config.py:
`flag`); each subcommand names the sections and keys it takes. As in `evo2 train`, flags override `-c FILE`
and `--set` overrides both; every value meets the config's checks, and an error names the flag typed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from evo2_cli.commands.common import (
    ConfigOption,
    NoVerifyOption,
    OverwriteOption,
    SetOption,
    console,
    resolve_config,
)
from evo2_cli.errors import ConfigError, InputError
from evo2_cli.infer.config import InferJob

app = typer.Typer(
    help="Generate, score, embed and score variants with a trained model (ours or an Evo 2 / Vortex .pt).",
    no_args_is_help=True,
)
DEFAULTS = InferJob()


def _fields(*keys: str) -> dict[str, dataclasses.Field]:
    """The config fields that have a flag, by key, in order: 'section.name', or every one of 'section'."""
    return {
        f"{section}.{f.name}": f
        for section, _, name in (key.partition(".") for key in keys)
        for f in dataclasses.fields(getattr(DEFAULTS, section))
        if f.metadata and name in ("", f.name)
    }


def _lookup(job: InferJob, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(job, section), name)


def _parameter(key: str, f: dataclasses.Field) -> inspect.Parameter:
    """The Typer parameter of a config field: its type (a Literal is a string to Typer, which leaves the
    check to the config) and default; an upper-case name is a positional argument."""
    names, default = f.metadata["names"], _lookup(DEFAULTS, key)
    hint = typing.get_type_hints(type(getattr(DEFAULTS, key.split(".")[0])))[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    kind = str if typing.get_origin(hint) is typing.Literal else hint
    if names[0].isupper():
        info: Any = typer.Argument(metavar=names[0], help=f.metadata["help"], show_default=False)
    else:
        shown = f.metadata["shown"] or default not in (None, [], False)
        info = typer.Option(*names, help=f.metadata["help"], show_default=shown)
    return _keyword(
        key.replace(".", "__"), Annotated[kind | None if default is None else kind, info], default
    )


def _keyword(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _taken_as_model(command: str, model: Path, key: str, f: dataclasses.Field) -> str:
    """The fix when MODEL holds what was meant for `key`: positionals are read in order."""
    name = f.metadata["names"][0]
    given = f"after the model: evo2 infer {command} MODEL {model}" if name.isupper() else f"as {name} {model}"
    return (
        f"'{model}' was taken as MODEL (a lone positional is the model, even when -c names one); "
        f"give it {given}, or --set {key}={model}"
    )


def _subcommand(name: str, *keys: str, fasta: str) -> Callable:
    """Register `run(job, overwrite)` as `evo2 infer NAME` with `-c`, `--set`, `--no-verify`, `--overwrite`
    and the flags of the config `keys` (see `_fields`), each overriding its key when given. `fasta`: the
    key a FASTA file given as MODEL was most likely meant for."""
    fields = _fields("checkpoint.path", *keys, "checkpoint", "runtime")

    def register(run: Callable[[InferJob, bool], None]) -> Callable:
        def command(ctx: typer.Context, config, set_, no_verify, overwrite, **given) -> None:
            flags = {"checkpoint.verify": ("--no-verify", False if no_verify else None)}
            for key, f in fields.items():
                param = key.replace(".", "__")
                if getattr(ctx.get_parameter_source(param), "name", None) == "COMMANDLINE":
                    flags[key] = (f.metadata["names"][0], given[param])
            job = resolve_config(InferJob, config, set_, flags)
            model = job.checkpoint.path if "checkpoint.path" in flags else None  # MODEL was given
            if model is not None and model.is_file():
                from evo2_cli.data.preprocess.plan import FASTA_NAMES  # here: it imports numpy

                if model.name.lower().endswith(FASTA_NAMES):
                    hint = _taken_as_model(name, model, fasta, fields[fasta])
                    raise ConfigError("checkpoint.path", f"'{model}' is a FASTA, not a model", "MODEL", hint)
            for key, f in fields.items():
                if f.metadata["required"] and _lookup(job, key) is None:
                    hint = f"give {f.metadata['names'][0]}, or set {key} in the config file or with --set"
                    file_model = model and resolve_config(InferJob, config, set_).checkpoint.path
                    if file_model and f.metadata["names"][0].isupper():  # MODEL replaced the file's
                        hint = _taken_as_model(name, model, key, f)
                    raise ConfigError(key, "is required", None, hint)
            run(job, overwrite)

        command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                _keyword("ctx", typer.Context),
                _keyword("config", ConfigOption, None),
                _keyword("set_", SetOption, None),
                *(_parameter(key, f) for key, f in fields.items()),
                _keyword("no_verify", NoVerifyOption, False),
                _keyword("overwrite", OverwriteOption, False),
            ]
        )
        command.__doc__ = run.__doc__
        app.command(name)(command)
        return run

    return register


def _model(job: InferJob):
    from evo2_cli.infer.loading import load_inference_model
    from evo2_cli.runtime import set_threads

    source, runtime, path = job.checkpoint, job.runtime, job.checkpoint.path
    set_threads(runtime.threads)
    model = load_inference_model(
        path,
        source.vortex_config,
        device=runtime.device,
        dtype=runtime.dtype,
        clamp_poles=source.clamp_poles,
        verify=source.verify,
    )
    parameter = next(model.parameters())
    console.print(
        f"model {path}: {model.num_parameters():,} parameters, {len(model.blocks)} blocks, "
        f"{parameter.device} {str(parameter.dtype).removeprefix('torch.')}",
        highlight=False,
    )
    return model


@contextlib.contextmanager
def _progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (transient); yields `advance(n)`."""
    with _progress_bars((description, total)) as (advance,):
        yield advance


@contextlib.contextmanager
def _progress_bars(*bars: tuple[str, int | None]) -> Iterator[list[Callable[[int], None]]]:
    """Several bars in one live display (rich allows one at a time); yields one `advance(n)` per bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        tasks = [progress.add_task(description, total=total) for description, total in bars]
        yield [lambda n, task=task: progress.advance(task, n) for task in tasks]


def _preflight(model, chunk: int, model_path: Path, windows: bool = False) -> Callable[..., None]:
    """`check(length, batch=1)` before a record (or a batch of prompts) longer than one chunk, the one place
    infer meets the chunked prefill: refuses (exit 2, with the fix) a model whose hcl poles grow (the
    chunked prefill needs decaying ones), prints the memory estimate (for each new largest batch x length)
    and refuses what cannot fit the device's free memory. `windows`: the command has --mode windows."""
    from evo2_cli.infer.memory import check_inference_memory, estimate_inference_memory

    device = next(model.parameters()).device
    growing = model.growing_poles()
    largest = 0

    def check(length: int, batch: int = 1) -> None:
        nonlocal largest
        if growing:
            layers = ", ".join(f"layer {i} ({n})" for i, n in growing.items())
            fixes = [f"--chunk {length} or more (one forward, no chunked prefill)"]
            fixes += ["--mode windows (approximate)"] if windows else []
            fixes += ["a checkpoint with model.hcl_form: modal (or --clamp-poles on a Vortex .pt)"]
            raise InputError(
                f"{model_path}: hcl poles with lambda >= 0 in {layers}: a sequence of {length} tokens needs "
                f"the chunked prefill (--chunk {chunk}), which needs decaying poles; use "
                + ", or ".join(fixes)
            )
        if length * batch > largest:
            largest = length * batch
            estimate = estimate_inference_memory(model, length, chunk, batch)
            console.print(estimate.describe(), highlight=False)
            check_inference_memory(estimate, device)

    return check


# ---------------------------------------------------------------- generate


@_subcommand("generate", "generate", "context.chunk", fasta="generate.prompt_fasta")
def generate(job: InferJob, overwrite: bool) -> None:
    """Sample continuations of DNA prompts with the cached decoder; FASTA out, settings in the headers.

    Sampling as the official engine: top-k, then temperature, then top-p within the top-k (--top-k 1 is
    greedy). Log-probs are under the model's unmodified distribution (natural log)."""
    from evo2_cli.infer.generation import DNA_TOKENS, LOGPROB_COLUMNS
    from evo2_cli.infer.generation import generate as run_generate
    from evo2_cli.infer.outputs import (
        FASTA,
        atomic_text_output,
        check_output,
        fasta_lines,
        table_kind,
        write_table,
    )
    from evo2_cli.infer.sequences import encode_dna, read_sequences, tokens_to_text

    options, chunk = job.generate, job.context.chunk
    names, prompts = [], []
    fix = "use IUPAC nucleotide letters, or pass --invalid n to map other characters to N"
    for i, text in enumerate(options.prompts):
        prompts.append(encode_dna(text, f"--prompt {i + 1}", options.invalid, fix))
        names.append(f"prompt{i + 1}")
    if options.prompt_fasta is not None:
        for record in read_sequences(options.prompt_fasta):
            names.append(record.id)
            prompts.append(record.tokens)
    if not prompts:
        raise InputError("no prompt: give --prompt ACGT... (repeatable) or --prompt-fasta FILE")
    output, logprobs = options.output, options.logprobs
    check_output(output, FASTA, overwrite)
    if logprobs is not None:
        check_output(logprobs, table_kind("a log-prob table", LOGPROB_COLUMNS, "tsv"), overwrite)
    model = _model(job)
    bars = (
        ("prefill (tokens)", sum(len(p) for p in prompts) * options.num_samples),
        ("generating", len(prompts) * options.num_samples * options.max_new_tokens),
    )
    with _progress_bars(*bars) as (prefilled, generated):
        results = run_generate(
            model,
            prompts,
            options.max_new_tokens,
            options.sampling,
            num_samples=options.num_samples,
            seed=options.seed,
            batch_size=options.batch_size,
            alphabet=DNA_TOKENS if options.alphabet == "acgt" else None,
            chunk=chunk,
            on_tokens=generated,
            on_prefill=prefilled,
            before_long=_preflight(model, chunk, job.checkpoint.path),
        )
    with atomic_text_output(output) as handle:
        for g in results:
            name = names[g.prompt_index]
            text = tokens_to_text(g.tokens)
            if options.include_prompt:
                text = tokens_to_text(prompts[g.prompt_index]) + text
            header = (
                f"{name}_sample{g.sample_index + 1} prompt={name} sample={g.sample_index + 1} "
                f"prompt_length={len(prompts[g.prompt_index])} new_tokens={len(g.tokens)} "
                f"{options.sampling.describe()} seed={options.seed} alphabet={options.alphabet} "
                f"mean_logprob={float(g.logprobs.mean()):.6f}"
            )
            handle.write(fasta_lines(header, text))
    if logprobs is not None:
        rows = (
            dict(
                zip(
                    LOGPROB_COLUMNS,
                    (
                        f"{names[g.prompt_index]}_sample{g.sample_index + 1}",
                        n,
                        tokens_to_text(g.tokens[n : n + 1]),
                        float(g.logprobs[n]),
                    ),
                    strict=True,
                )
            )
            for g in results
            for n in range(len(g.tokens))
        )
        write_table(logprobs, rows, "tsv")
    if str(output) != "-":
        console.print(f"[green]wrote[/] {len(results)} sequence(s) to {output}")


# ---------------------------------------------------------------- score


@_subcommand("score", "score", "context", fasta="score.fasta")
def score(job: InferJob, overwrite: bool) -> None:
    """Log-likelihood of every record: id, length, n_scored, sum_ll, mean_ll, bits_per_base.

    Natural-log sums over positions 1..L-1 (the first base has no context). Records longer than --chunk
    are scored exactly, chunk by chunk, every position with its whole left context (--mode exact), or in
    windows (--mode windows): every position once, from the first window that holds it, with at least
    --overlap tokens of left context."""
    from evo2_cli.infer.outputs import atomic_text_output, check_output, table_format, table_kind, write_table
    from evo2_cli.infer.scoring import PER_TOKEN_COLUMNS, SCORE_COLUMNS, score_sequences
    from evo2_cli.infer.sequences import read_sequences

    options, output, per_token = job.score, job.score.output, job.score.per_token
    chosen = table_format(output, options.format)
    check_output(output, table_kind("a score table", SCORE_COLUMNS, chosen), overwrite)
    if per_token is not None:
        check_output(per_token, table_kind("a per-token table", PER_TOKEN_COLUMNS, "tsv"), overwrite)
    records = read_sequences(options.fasta)
    first = next(records, None)  # a missing or empty FASTA fails before the model loads
    model = _model(job)
    side = atomic_text_output(per_token) if per_token is not None else contextlib.nullcontext()
    with _progress("scoring (bases)", None) as advance, side as token_handle:
        if token_handle is not None:
            token_handle.write("\t".join(PER_TOKEN_COLUMNS) + "\n")
        scores = score_sequences(
            model,
            itertools.chain([first] if first is not None else [], records),
            job.context,
            reverse_complement=options.rc,
            on_tokens=advance,
            before_long=_preflight(model, job.context.chunk, job.checkpoint.path, windows=True),
            keep_logprobs=token_handle is not None,
        )

        def rows():
            for s in scores:
                if token_handle is not None:
                    token_handle.writelines(s.per_token_lines())
                yield s.row()

        count = write_table(output, rows(), chosen)
    if str(output) != "-":
        console.print(f"[green]wrote[/] {count} score(s) to {output}")


# ---------------------------------------------------------------- embed


@_subcommand("embed", "embed", "context", fasta="embed.fasta")
def embed(job: InferJob, overwrite: bool) -> None:
    """Hidden states of one layer for every record, mean-pooled or per token.

    Per token, the vectors of all records are concatenated: each record's rows start at its offset (in the
    index file and the safetensors `offsets` tensor) and end where the next record's start. They are
    written to the file as they are computed (a 1 Mbase record never sits in memory)."""
    from evo2_cli.infer.embedding import (
        embed_sequences,
        embedding_pieces,
        output_width,
        record_offsets,
        resolve_layer_in_config,
    )
    from evo2_cli.infer.outputs import (
        check_embeddings_output,
        embeddings_file,
        write_embeddings,
        write_embeddings_index,
    )
    from evo2_cli.infer.sequences import read_sequences
    from evo2_cli.model.checkpoint import load_checkpoint_config

    options, output, context = job.embed, job.embed.output, job.context
    model_path, layer, pooling = job.checkpoint.path, job.embed.layer, job.embed.pooling
    check_embeddings_output(output, overwrite)
    config = load_checkpoint_config(model_path, vortex_config=job.checkpoint.vortex_config)
    chosen = resolve_layer_in_config(config, layer)  # a bad --layer fails before the weights load
    sequences = list(read_sequences(options.fasta))
    model = _model(job)
    ids, lengths = [s.id for s in sequences], [len(s.tokens) for s in sequences]
    preflight = _preflight(model, context.chunk, model_path, windows=True)
    if context.mode == "exact" and max(lengths) > context.chunk:
        preflight(max(lengths))  # refuse what cannot fit before any work
    metadata = {"layer": chosen.name, "pooling": pooling, "model": str(model_path)}
    with _progress("embedding (bases)", sum(lengths)) as advance:
        if pooling == "mean":
            result = embed_sequences(
                model, sequences, layer=chosen, context=context, on_tokens=advance, before_long=preflight
            )
            shape = result.vectors.shape
            index = write_embeddings(output, result.vectors, ids, lengths, None, metadata)
        else:
            offsets = record_offsets(lengths)
            shape = (int(offsets[-1]), output_width(model, chosen))
            with embeddings_file(output, *shape, offsets, metadata) as write:
                pieces = embedding_pieces(
                    model, sequences, chosen, context, on_tokens=advance, before_long=preflight
                )
                for _, rows in pieces:
                    write(rows)
            index = write_embeddings_index(output, ids, lengths, offsets)
    console.print(
        f"[green]wrote[/] {output} {tuple(shape)} (layer {chosen.name}, pooling {pooling}) and {index}",
        highlight=False,
    )


# ---------------------------------------------------------------- variants


@_subcommand("variants", "variants", "context.chunk", "context.batch_tokens", fasta="variants.reference")
def variants(job: InferJob, overwrite: bool) -> None:
    """Delta log-likelihood (alt - ref) of a window centred on each variant; TSV out.

    Columns: chrom pos ref alt status window_start ref_sum_ll alt_sum_ll delta_sum_ll delta_mean_ll."""
    from evo2_cli.infer.outputs import check_output, table_kind, write_table
    from evo2_cli.infer.variants import (
        VARIANT_COLUMNS,
        load_reference,
        plan_variants,
        read_variants,
        score_planned,
    )

    options, chunk = job.variants, job.context.chunk
    check_output(options.output, table_kind("a variant table", VARIANT_COLUMNS, "tsv"), overwrite)
    listed = read_variants(options.file)
    chroms = load_reference(options.reference, {v.chrom for v in listed})
    planned = plan_variants(listed, chroms, options.window, str(options.file), options.on_mismatch)
    model = _model(job)
    preflight = _preflight(model, chunk, job.checkpoint.path)
    longest = max((len(a) for plan in planned if plan is not None for a in plan[1:]), default=0)
    if longest > chunk:
        preflight(longest)  # refuse what cannot fit before any work
    with _progress("variants (bases)", None) as advance:
        results = score_planned(
            model,
            listed,
            planned,
            chunk=chunk,
            batch_tokens=job.context.batch_tokens,
            on_tokens=advance,
            before_long=preflight,
        )
    count = write_table(options.output, (r.row() for r in results), "tsv")
    if str(options.output) != "-":
        console.print(f"[green]wrote[/] {count} variant score(s) to {options.output}")
