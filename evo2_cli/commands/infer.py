"""`evo2 infer generate | score | embed | variants`: thin Typer layer over evo2_cli.infer."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from evo2_cli.commands.common import NoVerifyOption, OverwriteOption, console
from evo2_cli.errors import InputError

app = typer.Typer(
    help="Generate, score, embed and score variants with a trained model (ours or an Evo 2 / Vortex .pt).",
    no_args_is_help=True,
)

ModelArgument = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint directory, training run directory (its latest checkpoint) or Vortex .pt.",
        show_default=False,
    ),
]
VortexConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--vortex-config", help="Model config YAML of a Vortex .pt (release schema or ours).", dir_okay=False
    ),
]
ClampPolesOption = Annotated[
    float | None,
    typer.Option(
        "--clamp-poles", help="Vortex .pt: clamp hcl poles with lambda >= 0 to this negative value."
    ),
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
DtypeOption = Annotated[
    str, typer.Option("--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")
]
ThreadsOption = Annotated[
    int,
    typer.Option(
        "--threads",
        help="CPU threads for torch (0 = torch's default, one per core). Small models decode faster with 1, "
        "and so does any model on a machine whose cores are busy with other jobs.",
    ),
]
OutputOption = Annotated[Path, typer.Option("--output", "-o", help="Output file ('-' = stdout).")]
ModeOption = Annotated[
    str,
    typer.Option(
        "--mode",
        help="Records longer than --chunk: exact (chunked prefill, every position sees its whole left "
        "context) or windows (overlapping --window windows, approximate, no KV cache).",
    ),
]
ChunkOption = Annotated[
    int,
    typer.Option(
        "--chunk",
        help="Exact mode: tokens per chunk of the chunked prefill (activation memory grows with it); "
        "records up to this length are one forward.",
    ),
]
WindowOption = Annotated[int, typer.Option("--window", help="--mode windows: the window in tokens.")]
OverlapOption = Annotated[
    int | None,
    typer.Option(
        "--overlap",
        help="--mode windows: left context every windowed position keeps at least.",
        show_default="window/4",
    ),
]
BatchTokensOption = Annotated[
    int,
    typer.Option("--batch-tokens", min=1, help="Tokens per forward batch (rows x window); length-bucketed."),
]
FastaArgument = Annotated[Path, typer.Argument(help="FASTA file (plain, .gz, bgzip).", dir_okay=False)]


def _model(
    path: Path,
    vortex_config: Path | None,
    device: str,
    dtype: str,
    clamp_poles: float | None = None,
    threads: int = 0,
    verify: bool = True,
):
    from evo2_cli.infer.loading import load_inference_model
    from evo2_cli.runtime import set_threads

    set_threads(threads)
    model = load_inference_model(
        path, vortex_config, device=device, dtype=dtype, clamp_poles=clamp_poles, verify=verify
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


def _context(mode: str, chunk: int, window: int, overlap: int | None, batch_tokens: int):
    """The checked Context (--overlap defaults to window / 4), before anything loads."""
    from evo2_cli.infer.context import Context

    overlap = overlap if overlap is not None else max(1, window // 4)
    return Context(mode, chunk, window, overlap, batch_tokens)  # type: ignore[arg-type]


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


@app.command("generate")
def generate(
    model_path: ModelArgument,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="A prompt sequence (repeatable).")
    ] = None,
    prompt_fasta: Annotated[
        Path | None, typer.Option("--prompt-fasta", help="Prompts from a FASTA file.", dir_okay=False)
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 100,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature (> 0).")] = 1.0,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Keep the k most likely tokens; 1 = greedy, 0 = all.")
    ] = 4,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus mass within the top-k, in (0, 1].")] = 1.0,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Continuations per prompt.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same output (any batch size).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows decoded together.")] = 8,
    chunk: Annotated[
        int,
        typer.Option("--chunk", help="Prompts are prefilled this many tokens at a time (any length, exact)."),
    ] = 8192,
    alphabet: Annotated[
        str,
        typer.Option("--alphabet", help="Sample from acgt only, or from all tokens (the official engine)."),
    ] = "acgt",
    invalid: Annotated[
        str,
        typer.Option(
            "--invalid",
            help="Non-IUPAC letters in a --prompt: error, or n (map to N). --prompt-fasta records are "
            "checked as FASTA, like every other input.",
        ),
    ] = "error",
    include_prompt: Annotated[
        bool, typer.Option("--include-prompt", help="Write prompt + continuation (default: continuation).")
    ] = False,
    output: OutputOption = Path("-"),
    logprobs: Annotated[
        Path | None,
        typer.Option(
            "--logprobs", help="Also write per-token log-probs (TSV: id, position, token, logprob)."
        ),
    ] = None,
    vortex_config: VortexConfigOption = None,
    clamp_poles: ClampPolesOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: ThreadsOption = 0,
    no_verify: NoVerifyOption = False,
    overwrite: OverwriteOption = False,
) -> None:
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
    from evo2_cli.infer.sampling import SamplingSettings
    from evo2_cli.infer.sequences import encode_dna, read_sequences, tokens_to_text

    settings = SamplingSettings(top_k=top_k, temperature=temperature, top_p=top_p)
    if invalid not in ("error", "n"):
        raise InputError(f"--invalid: expected error or n, got {invalid!r}")
    if alphabet not in ("acgt", "all"):
        raise InputError(f"--alphabet: expected acgt or all, got {alphabet!r}")
    for name, value, low in (
        ("--max-new-tokens", max_new_tokens, 1),
        ("--num-samples", num_samples, 1),
        ("--batch-size", batch_size, 1),
        ("--chunk", chunk, 1),
    ):
        if value < low:
            raise InputError(f"{name} must be >= {low}, got {value}")
    names, prompts = [], []
    fix = "use IUPAC nucleotide letters, or pass --invalid n to map other characters to N"
    for i, text in enumerate(prompt or []):
        prompts.append(encode_dna(text, f"--prompt {i + 1}", invalid, fix))  # type: ignore[arg-type]
        names.append(f"prompt{i + 1}")
    if prompt_fasta is not None:
        for record in read_sequences(prompt_fasta):
            names.append(record.id)
            prompts.append(record.tokens)
    if not prompts:
        raise InputError("no prompt: give --prompt ACGT... (repeatable) or --prompt-fasta FILE")
    check_output(output, FASTA, overwrite)
    if logprobs is not None:
        check_output(logprobs, table_kind("a log-prob table", LOGPROB_COLUMNS, "tsv"), overwrite)
    model = _model(model_path, vortex_config, device, dtype, clamp_poles, threads, not no_verify)
    bars = (
        ("prefill (tokens)", sum(len(p) for p in prompts) * num_samples),
        ("generating", len(prompts) * num_samples * max_new_tokens),
    )
    with _progress_bars(*bars) as (prefilled, generated):
        results = run_generate(
            model,
            prompts,
            max_new_tokens,
            settings,
            num_samples=num_samples,
            seed=seed,
            batch_size=batch_size,
            alphabet=DNA_TOKENS if alphabet == "acgt" else None,
            chunk=chunk,
            on_tokens=generated,
            on_prefill=prefilled,
            before_long=_preflight(model, chunk, model_path),
        )
    with atomic_text_output(output) as handle:
        for g in results:
            name = names[g.prompt_index]
            text = tokens_to_text(g.tokens)
            if include_prompt:
                text = tokens_to_text(prompts[g.prompt_index]) + text
            header = (
                f"{name}_sample{g.sample_index + 1} prompt={name} sample={g.sample_index + 1} "
                f"prompt_length={len(prompts[g.prompt_index])} new_tokens={len(g.tokens)} "
                f"{settings.describe()} seed={seed} alphabet={alphabet} "
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


@app.command("score")
def score(
    model_path: ModelArgument,
    fasta: FastaArgument,
    output: OutputOption = Path("-"),
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="tsv, csv or parquet.", show_default="from the suffix, else tsv"),
    ] = None,
    reverse_complement: Annotated[
        bool, typer.Option("--rc", help="Average with the reverse complement's score.")
    ] = False,
    per_token: Annotated[
        Path | None,
        typer.Option(
            "--per-token", help="Also write per-position log-probs (TSV: id, position, base, logprob)."
        ),
    ] = None,
    mode: ModeOption = "exact",
    chunk: ChunkOption = 8192,
    window: WindowOption = 8192,
    overlap: OverlapOption = None,
    batch_tokens: BatchTokensOption = 16384,
    vortex_config: VortexConfigOption = None,
    clamp_poles: ClampPolesOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: ThreadsOption = 0,
    no_verify: NoVerifyOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Log-likelihood of every record: id, length, n_scored, sum_ll, mean_ll, bits_per_base.

    Natural-log sums over positions 1..L-1 (the first base has no context). Records longer than --chunk
    are scored exactly, chunk by chunk, every position with its whole left context (--mode exact), or in
    windows (--mode windows): every position once, from the first window that holds it, with at least
    --overlap tokens of left context."""
    from evo2_cli.infer.outputs import atomic_text_output, check_output, table_format, table_kind, write_table
    from evo2_cli.infer.scoring import PER_TOKEN_COLUMNS, SCORE_COLUMNS, score_sequences
    from evo2_cli.infer.sequences import read_sequences

    context = _context(mode, chunk, window, overlap, batch_tokens)
    chosen = table_format(output, fmt)
    check_output(output, table_kind("a score table", SCORE_COLUMNS, chosen), overwrite)
    if per_token is not None:
        check_output(per_token, table_kind("a per-token table", PER_TOKEN_COLUMNS, "tsv"), overwrite)
    records = read_sequences(fasta)
    first = next(records, None)  # a missing or empty FASTA fails before the model loads
    model = _model(model_path, vortex_config, device, dtype, clamp_poles, threads, not no_verify)
    side = atomic_text_output(per_token) if per_token is not None else contextlib.nullcontext()
    with _progress("scoring (bases)", None) as advance, side as token_handle:
        if token_handle is not None:
            token_handle.write("\t".join(PER_TOKEN_COLUMNS) + "\n")
        scores = score_sequences(
            model,
            itertools.chain([first] if first is not None else [], records),
            context,
            reverse_complement=reverse_complement,
            on_tokens=advance,
            before_long=_preflight(model, chunk, model_path, windows=True),
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


@app.command("embed")
def embed(
    model_path: ModelArgument,
    fasta: FastaArgument,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="OUT.safetensors or OUT.npy, plus an index OUT.safetensors.ids.tsv or OUT.npy.ids.tsv.",
            dir_okay=False,
        ),
    ],
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer",
            help="Block index (negative from the end), blocks.N, final_norm, or a submodule as the "
            "official engine names it (blocks.28.mlp.l3, blocks.N.mlp, blocks.N.filter, ...): its "
            "forward hook's output.",
            show_default="the middle block",
        ),
    ] = None,
    pooling: Annotated[
        str,
        typer.Option(
            "--pooling", help="mean (one vector per record) or none (per token, streamed to the file)."
        ),
    ] = "mean",
    mode: ModeOption = "exact",
    chunk: ChunkOption = 8192,
    window: WindowOption = 8192,
    overlap: OverlapOption = None,
    batch_tokens: BatchTokensOption = 16384,
    vortex_config: VortexConfigOption = None,
    clamp_poles: ClampPolesOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: ThreadsOption = 0,
    no_verify: NoVerifyOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Hidden states of one layer for every record, mean-pooled or per token.

    Per token, the vectors of all records are concatenated: each record's rows start at its offset (in the
    index file and the safetensors `offsets` tensor) and end where the next record's start. They are
    written to the file as they are computed (a 1 Mbase record never sits in memory)."""
    from evo2_cli.infer.embedding import (
        check_pooling,
        embed_sequences,
        embedding_pieces,
        output_width,
        record_offsets,
        resolve_layer,
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

    context = _context(mode, chunk, window, overlap, batch_tokens)
    chosen_pooling = check_pooling(pooling)  # bad input fails before the model loads
    check_embeddings_output(output, overwrite)
    config = load_checkpoint_config(model_path, vortex_config=vortex_config)
    if config is not None:
        resolve_layer_in_config(config, layer)  # a bad --layer fails before the weights load
    sequences = list(read_sequences(fasta))
    model = _model(model_path, vortex_config, device, dtype, clamp_poles, threads, not no_verify)
    chosen = resolve_layer(model, layer)
    ids, lengths = [s.id for s in sequences], [len(s.tokens) for s in sequences]
    preflight = _preflight(model, chunk, model_path, windows=True)
    if context.mode == "exact" and max(lengths) > chunk:
        preflight(max(lengths))  # refuse what cannot fit before any work
    metadata = {"layer": chosen.name, "pooling": chosen_pooling, "model": str(model_path)}
    with _progress("embedding (bases)", sum(lengths)) as advance:
        if chosen_pooling == "mean":
            result = embed_sequences(
                model, sequences, layer=chosen.name, context=context, on_tokens=advance, before_long=preflight
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
        f"[green]wrote[/] {output} {tuple(shape)} (layer {chosen.name}, pooling {chosen_pooling}) "
        f"and {index}",
        highlight=False,
    )


# ---------------------------------------------------------------- variants


@app.command("variants")
def variants(
    model_path: ModelArgument,
    variant_file: Annotated[
        Path,
        typer.Argument(help="TSV (chrom pos ref alt, 1-based) or VCF.", dir_okay=False, show_default=False),
    ],
    reference: Annotated[
        Path,
        typer.Option(
            "--reference", "-r", help="Reference FASTA (records named as the chroms).", dir_okay=False
        ),
    ],
    output: OutputOption = Path("-"),
    window: Annotated[
        int, typer.Option("--window", help="Reference window around each variant (bases).")
    ] = 8192,
    on_mismatch: Annotated[
        str,
        typer.Option("--on-mismatch", help="A ref allele that differs from the reference: error or skip."),
    ] = "error",
    chunk: Annotated[
        int,
        typer.Option(
            "--chunk",
            help="Windows longer than this go through the chunked prefill (exact, bounded memory).",
        ),
    ] = 8192,
    batch_tokens: BatchTokensOption = 16384,
    vortex_config: VortexConfigOption = None,
    clamp_poles: ClampPolesOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: ThreadsOption = 0,
    no_verify: NoVerifyOption = False,
    overwrite: OverwriteOption = False,
) -> None:
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

    if on_mismatch not in ("error", "skip"):
        raise InputError(f"--on-mismatch: expected error or skip, got {on_mismatch!r}")
    _context("exact", chunk, 8192, None, batch_tokens)  # checks --chunk and --batch-tokens before any work
    check_output(output, table_kind("a variant table", VARIANT_COLUMNS, "tsv"), overwrite)
    listed = read_variants(variant_file)
    chroms = load_reference(reference, {v.chrom for v in listed})
    planned = plan_variants(listed, chroms, window, str(variant_file), on_mismatch)  # type: ignore[arg-type]
    model = _model(model_path, vortex_config, device, dtype, clamp_poles, threads, not no_verify)
    preflight = _preflight(model, chunk, model_path)
    longest = max((len(a) for plan in planned if plan is not None for a in plan[1:]), default=0)
    if longest > chunk:
        preflight(longest)  # refuse what cannot fit before any work
    with _progress("variants (bases)", None) as advance:
        results = score_planned(
            model,
            listed,
            planned,
            chunk=chunk,
            batch_tokens=batch_tokens,
            on_tokens=advance,
            before_long=preflight,
        )
    count = write_table(output, (r.row() for r in results), "tsv")
    if str(output) != "-":
        console.print(f"[green]wrote[/] {count} variant score(s) to {output}")
