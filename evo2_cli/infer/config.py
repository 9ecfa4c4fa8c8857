"""The `evo2 infer` config: typed sections under one root, `InferJob` (kind "infer").

    checkpoint: what to load: our checkpoint or run directory, or a Vortex .pt with its model YAML
    runtime:    device, dtype, CPU threads
    context:    how records longer than a chunk meet the model: exact (chunked prefill) or windows
    generate, score, embed, variants: each subcommand's inputs, settings and outputs

One file may hold the sections of several subcommands; each reads the shared sections and its own. Every
`evo2 infer` flag overrides one key here, so a flag and a config key meet the same checks. Imports no
torch: the command's help is built from these dataclasses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evo2_cli.config import check

Mode = Literal["exact", "windows"]
TableFormat = Literal["tsv", "csv", "parquet"]
Pooling = Literal["mean", "none"]
OnMismatch = Literal["error", "skip"]
DEFAULT_WINDOW = 8192  # Evo 2's pretraining context
DEFAULT_CHUNK = DEFAULT_WINDOW  # a record up to Evo 2's pretraining context stays one forward
DEFAULT_BATCH_TOKENS = 16384


def flag(default: Any, names: str, help: str, shown: str | None = None, required: bool = False) -> Any:
    """A field with its command-line form, from which commands/infer.py builds the options: the flag's names
    (one upper-case name: a positional argument) and help; `shown`: the default as --help shows it when the
    field's is None; `required`: by the subcommands that take it (from the command line or the file)."""
    default_or_factory = {"default_factory": list} if default == [] else {"default": default}
    metadata = {"names": tuple(names.split()), "help": help, "shown": shown, "required": required}
    return field(**default_or_factory, metadata=metadata)


def check_window(window: int, overlap: int) -> None:
    check(window >= 2, "window", f"must be >= 2 tokens, got {window}")
    check(1 <= overlap < window, "overlap", f"must be in [1, window) = [1, {window}), got {overlap}")


@dataclass(frozen=True)
class Context:
    """How records longer than one chunk meet the model (context.py's `per_token_pieces`)."""

    mode: Mode = flag(
        "exact",
        "--mode",
        "Records longer than --chunk: exact (chunked prefill, every position sees its whole left "
        "context) or windows (overlapping --window windows, approximate, no KV cache).",
    )
    chunk: int = flag(
        DEFAULT_CHUNK,
        "--chunk",
        "Tokens per chunk of the chunked prefill (exact at any length; activation memory grows with "
        "it): prompts, records and variant windows up to this length are one forward.",
    )
    window: int = flag(DEFAULT_WINDOW, "--window", "--mode windows: the window in tokens.")
    overlap: int | None = flag(
        None,
        "--overlap",
        "--mode windows: left context every windowed position keeps at least.",
        shown="window/4",
    )
    batch_tokens: int = flag(
        DEFAULT_BATCH_TOKENS,
        "--batch-tokens",
        "Tokens per forward batch (rows x window); length-bucketed.",
    )

    def __post_init__(self) -> None:
        check(self.mode in ("exact", "windows"), "mode", f"expected exact or windows, got {self.mode!r}")
        check(self.chunk >= 2, "chunk", f"must be >= 2 tokens, got {self.chunk}")
        check(self.batch_tokens >= 1, "batch_tokens", f"must be >= 1, got {self.batch_tokens}")
        if self.overlap is None:
            object.__setattr__(self, "overlap", max(1, self.window // 4))
        check_window(self.window, self.overlap)  # type: ignore[arg-type]

    @property
    def span(self) -> int:
        """The longest record run in one forward: a chunk (exact) or a window (windows)."""
        return self.chunk if self.mode == "exact" else self.window


@dataclass(frozen=True)
class SamplingSettings:
    """top_k 1 = greedy, 0 = no top-k; temperature > 0 when sampling; top_p in (0, 1] (1 = off)."""

    top_k: int = 4
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        check(self.top_k >= 0, "top_k", f"must be >= 0 (0 = all tokens, 1 = greedy), got {self.top_k}")
        check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1] (1 = off), got {self.top_p}")
        check(
            self.greedy or self.temperature > 0.0,
            "temperature",
            f"must be > 0 when sampling, got {self.temperature}; for greedy decoding pass --top-k 1",
        )

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        return f"top_k={self.top_k} temperature={self.temperature:g} top_p={self.top_p:g}"


OUTPUT = "Output file ('-' = stdout)."
FASTA = "FASTA file (plain, .gz, bgzip)."


@dataclass
class CheckpointSection:
    path: Path | None = flag(
        None,
        "MODEL",
        "Checkpoint directory, training run directory (its latest checkpoint) or Vortex .pt.",
        required=True,
    )
    vortex_config: Path | None = flag(
        None, "--vortex-config", "Model config YAML of a Vortex .pt (release schema or ours)."
    )
    clamp_poles: float | None = flag(
        None, "--clamp-poles", "Vortex .pt: clamp hcl poles with lambda >= 0 to this negative value."
    )
    verify: bool = True  # check our checkpoints' files against the sha256 in meta.json (--no-verify)


@dataclass
class RuntimeSection:
    device: str = flag("auto", "--device", "auto (CUDA when present), cpu, cuda or cuda:N.")
    dtype: Literal["auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"] = flag(
        "auto", "--dtype", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."
    )
    threads: int = flag(
        0,
        "--threads",
        "CPU threads for torch (0 = torch's default, one per core). Small models decode faster with 1, "
        "and so does any model on a machine whose cores are busy with other jobs.",
    )

    def __post_init__(self):
        check(self.threads >= 0, "threads", f"must be >= 0 (0 = torch's default), got {self.threads}")
        device_ok = re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)  # spelling; CUDA is checked at load
        check(device_ok is not None, "device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class GenerateSection:
    prompts: list[str] = flag([], "--prompt -p", "A prompt sequence (repeatable).")
    prompt_fasta: Path | None = flag(None, "--prompt-fasta", "Prompts from a FASTA file.")
    max_new_tokens: int = flag(100, "--max-new-tokens -n", "Tokens to generate.")
    temperature: float = flag(1.0, "--temperature", "Softmax temperature (> 0).")
    top_k: int = flag(4, "--top-k", "Keep the k most likely tokens; 1 = greedy, 0 = all.")
    top_p: float = flag(1.0, "--top-p", "Nucleus mass within the top-k, in (0, 1].")
    num_samples: int = flag(1, "--num-samples", "Continuations per prompt.")
    seed: int = flag(0, "--seed", "Same seed, same output (any batch size).")
    batch_size: int = flag(8, "--batch-size", "Rows decoded together.")
    alphabet: Literal["acgt", "all"] = flag(
        "acgt", "--alphabet", "Sample from acgt only, or from all tokens (the official engine)."
    )
    invalid: Literal["error", "n"] = flag(
        "error",
        "--invalid",
        "Non-IUPAC letters in a --prompt: error, or n (map to N). --prompt-fasta records are checked "
        "as FASTA, like every other input.",
    )
    include_prompt: bool = flag(
        False, "--include-prompt", "Write prompt + continuation (default: continuation)."
    )
    output: Path = flag(Path("-"), "--output -o", OUTPUT)
    logprobs: Path | None = flag(
        None, "--logprobs", "Also write per-token log-probs (TSV: id, position, token, logprob)."
    )

    def __post_init__(self):
        self.sampling = SamplingSettings(self.top_k, self.temperature, self.top_p)  # checks the three
        for name in ("max_new_tokens", "num_samples", "batch_size"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")


@dataclass
class ScoreSection:
    fasta: Path | None = flag(None, "FASTA", FASTA, required=True)
    output: Path = flag(Path("-"), "--output -o", OUTPUT)
    format: TableFormat | None = flag(
        None, "--format", "tsv, csv or parquet.", shown="from the suffix, else tsv"
    )
    rc: bool = flag(False, "--rc", "Average with the reverse complement's score.")
    per_token: Path | None = flag(
        None, "--per-token", "Also write per-position log-probs (TSV: id, position, base, logprob)."
    )


@dataclass
class EmbedSection:
    fasta: Path | None = flag(None, "FASTA", FASTA, required=True)
    output: Path | None = flag(
        None,
        "--output -o",
        "OUT.safetensors or OUT.npy, plus an index OUT.safetensors.ids.tsv or OUT.npy.ids.tsv.",
        required=True,
    )
    layer: str | None = flag(
        None,
        "--layer",
        "Block index (negative from the end), blocks.N, final_norm, or a submodule as the official "
        "engine names it (blocks.28.mlp.l3, blocks.N.mlp, blocks.N.filter, ...): its forward hook's output.",
        shown="the middle block",
    )
    pooling: Pooling = flag(
        "mean", "--pooling", "mean (one vector per record) or none (per token, streamed to the file)."
    )


@dataclass
class VariantsSection:
    file: Path | None = flag(None, "VARIANTS", "TSV (chrom pos ref alt, 1-based) or VCF.", required=True)
    reference: Path | None = flag(
        None, "--reference -r", "Reference FASTA (records named as the chroms).", required=True
    )
    output: Path = flag(Path("-"), "--output -o", OUTPUT)
    window: int = flag(DEFAULT_WINDOW, "--window", "Reference window around each variant (bases).")
    on_mismatch: OnMismatch = flag(
        "error", "--on-mismatch", "A ref allele that differs from the reference: error or skip."
    )

    def __post_init__(self):
        check(self.window >= 2, "window", f"must be >= 2, got {self.window}")


@dataclass
class InferJob:
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    context: Context = field(default_factory=Context)
    generate: GenerateSection = field(default_factory=GenerateSection)
    score: ScoreSection = field(default_factory=ScoreSection)
    embed: EmbedSection = field(default_factory=EmbedSection)
    variants: VariantsSection = field(default_factory=VariantsSection)
