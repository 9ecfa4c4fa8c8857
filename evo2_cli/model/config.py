"""The StripedHyena 2 model config: one typed, validated dataclass, named presets, the Evo 2 release schema.

`ModelConfig` is the `model:` section of every config file (train, finetune, infer, convert) and of a
checkpoint directory's `config.yaml`. Field names follow the Evo 2 release YAML files (`hidden_size`,
`num_attention_heads`, `hcs_filter_groups`, ...), so a release file (vortex `configs/evo2-*.yml`) loads
through the same validator: `expand_config` maps its four `*_layer_idxs` lists onto `layout`, accepts the
release keys that do not change the math (`model_name`, `use_flash_attn`, `max_seqlen`, ...) and checks the
ones that do (`interleave: True`, `hyena_flip_x1x2: False`, ...). A key that is neither is an error.

The layer layout is one field, `layout`: either a pattern string, one letter per layer,

    S  hcs   hyena with a short explicit filter (hyena_se, `hcs_filter_length` taps, grouped)
    D  hcm   hyena with a medium explicit filter (hyena_mr, `hcm_filter_length` taps, grouped)
    H  hcl   hyena with a long implicit modal filter (hyena_li, `state_size` poles per channel)
    *  attn  multi-head attention with rotary embeddings

(the letters of BioNeMo's `hybrid_override_pattern`; evo2-1b is `SDH*SDHSDH*SDHSDH*SDHSDH*`), or a mapping of
layer kind to index list (`{hcs: [0, 4], hcm: [1, 5], hcl: [2, 6], attn: [3]}`) that must cover 0..n-1 once.
After validation `layout` always holds the pattern string.

`preset: NAME` fills every key the file does not set from `PRESETS[NAME]`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evo2_cli.config import FieldError, check

LAYER_LETTERS: dict[str, str] = {"S": "hcs", "D": "hcm", "H": "hcl", "*": "attn"}
LAYER_KINDS: tuple[str, ...] = ("hcs", "hcm", "hcl", "attn")
_KIND_TO_LETTER = {kind: letter for letter, kind in LAYER_LETTERS.items()}

# ---------------------------------------------------------------- presets

_EVO2_COMMON: dict[str, Any] = {
    "vocab_size": 512,
    "short_filter_length": 3,
    "hcs_filter_length": 7,
    "hcm_filter_length": 128,
    "state_size": 16,
    "eps": 1e-6,
    "tie_embeddings": True,
    "evo2_style_activations": True,
    "mlp_activation": "gelu",
}

PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: a few thousand parameters (the 512 x 8 tied embedding is most of them).
    "test": {
        **_EVO2_COMMON,
        "hidden_size": 8,
        "layout": "SDH*",
        "num_attention_heads": 2,
        "inner_mlp_size": 16,
        "hcs_filter_groups": 4,
        "hcm_filter_groups": 4,
        "state_size": 4,
        "rotary_emb_base": 10000.0,
    },
    # Trains on a laptop CPU in minutes: 1.7 M parameters, every layer kind twice.
    "small": {
        **_EVO2_COMMON,
        "hidden_size": 128,
        "layout": "SDH*SDH*",
        "num_attention_heads": 4,
        "inner_mlp_size": 352,
        "hcs_filter_groups": 16,
        "hcm_filter_groups": 16,
        "rotary_emb_base": 10000.0,
    },
    # Evo 2 release shapes (vortex configs/evo2-*-8k.yml).
    "evo2-1b": {
        **_EVO2_COMMON,
        "hidden_size": 1920,
        "layout": "SDH*SDHSDH*SDHSDH*SDHSDH*",
        "num_attention_heads": 15,
        "inner_mlp_size": 5120,
        "hcs_filter_groups": 128,
        "hcm_filter_groups": 128,
        "rotary_emb_base": 10000.0,
    },
    "evo2-7b": {
        **_EVO2_COMMON,
        "hidden_size": 4096,
        "layout": "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*",
        "num_attention_heads": 32,
        "inner_mlp_size": 11008,
        "hcs_filter_groups": 256,
        "hcm_filter_groups": 256,
        "rotary_emb_base": 10000.0,
    },
    "evo2-40b": {
        **_EVO2_COMMON,
        "hidden_size": 8192,
        "layout": "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*SDH*SDHSDH*SDHSDH*",
        "num_attention_heads": 64,
        "inner_mlp_size": 21888,
        "hcs_filter_groups": 512,
        "hcm_filter_groups": 512,
        "rotary_emb_base": 1000000.0,
    },
}

# ---------------------------------------------------------------- the Evo 2 release schema

# Release keys that only steer the engine (kernels, parallelism, dtypes, logging): accepted, ignored.
RELEASE_IGNORED_KEYS = frozenset(
    {
        "model_name",
        "hcl_filter_groups",  # unused by Vortex: hcl always has one filter per channel
        "hyena_filter_groups",
        "mlp_init_method",
        "mlp_output_init_method",
        "make_vocab_size_divisible_by",
        "inner_size_multiple_of",
        "log_intermediate_values",
        "column_split",
        "model_parallel_size",
        "pipe_parallel_size",
        "use_fp8_input_projections",
        "max_seqlen",
        "max_batch_size",
        "use_flash_attn",
        "use_flash_rmsnorm",
        "use_flash_depthwise",
        "use_flashfft",
        "use_laughing_hyena",
        "inference_mode",
        "tokenizer_type",
        "prefill_style",
        "print_activations",
        "compile",
        "low_mem_mode",
        "long_fir_threshold",
        "use_hcs_kernel",
        "use_hcm_kernel",
        "use_hcl_kernel",
        "hyena_block_dtype",
        "attn_block_dtype",
        "mlp_dtype",
        "params_dtype",
        "seqlen",
        "ground_truth_activations_path",
        "padding_idx",
        "smeared_gqa",
        "rotary_emb_scaling_factor",  # read together with use_interpolated_rotary_pos_emb
        "use_interpolated_rotary_pos_emb",
    }
)

# Release keys that change the math: accepted only with the value the released models use.
RELEASE_FIXED_KEYS: dict[str, Any] = {
    "proj_groups": 1,
    "column_split_hyena": False,
    "interleave": True,
    "mha_out_proj_bias": True,
    "hyena_out_proj_bias": True,
    "hyena_flip_x1x2": False,
    "qkv_proj_bias": False,
    "short_filter_bias": False,
    "final_norm": True,
}

_RELEASE_INDEX_KEYS = {f"{kind}_layer_idxs": kind for kind in LAYER_KINDS}


def _expand_release_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Map the Evo 2 release YAML keys onto ModelConfig fields (in place on a copy)."""
    raw = dict(raw)
    if any(key in raw for key in _RELEASE_INDEX_KEYS):
        check("layout" not in raw, "layout", "give either layout or the *_layer_idxs lists, not both")
        raw["layout"] = {kind: raw.pop(key) for key, kind in _RELEASE_INDEX_KEYS.items() if key in raw}
    for key, required in RELEASE_FIXED_KEYS.items():
        if key in raw:
            check(
                raw[key] == required,
                key,
                f"only {required!r} is supported (the released Evo 2 models use it), got {raw[key]!r}",
            )
            del raw[key]
    if "num_filters" in raw:
        value = raw.pop("num_filters")
        check(
            value == raw.get("hidden_size", value),
            "num_filters",
            f"must equal hidden_size ({raw.get('hidden_size')}): hcl has one filter per channel",
        )
    if raw.get("use_interpolated_rotary_pos_emb"):
        check(
            "rotary_scaling_factor" not in raw,
            "rotary_scaling_factor",
            "give rotary_scaling_factor or use_interpolated_rotary_pos_emb, not both",
        )
        raw["rotary_scaling_factor"] = raw.get("rotary_emb_scaling_factor", 1.0)
    if "inner_mlp_size" not in raw and "hidden_size" in raw and "inner_size_multiple_of" in raw:
        # Vortex's default rule, used only when the file omits inner_mlp_size.
        multiple = int(raw["inner_size_multiple_of"]) * int(raw.get("model_parallel_size", 1))
        inner = int(2 * raw["hidden_size"] * 4 / 3)
        raw["inner_mlp_size"] = multiple * ((inner + multiple - 1) // multiple)
    for key in RELEASE_IGNORED_KEYS:
        raw.pop(key, None)
    return raw


# ---------------------------------------------------------------- layout


def parse_layout(layout: str | dict[str, list[int]], field_name: str = "layout") -> str:
    """A layout (pattern string or kind -> indices mapping) as the canonical pattern string."""
    if isinstance(layout, str):
        pattern = layout.replace(" ", "")
        check(len(pattern) > 0, field_name, "is empty; give a pattern such as 'SDH*' or index lists")
        bad = sorted({c for c in pattern if c not in LAYER_LETTERS})
        check(
            not bad,
            field_name,
            f"unknown layer letter(s) {''.join(bad)!r}; use S (hcs), D (hcm), H (hcl), * (attention)",
        )
        return pattern
    check(isinstance(layout, dict), field_name, "must be a pattern string or a mapping of kind -> indices")
    owner: dict[int, str] = {}
    for kind, indices in layout.items():
        close = difflib.get_close_matches(str(kind), LAYER_KINDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        check(kind in LAYER_KINDS, f"{field_name}.{kind}", f"unknown layer kind; use {LAYER_KINDS}{hint}")
        for index in indices:
            check(
                isinstance(index, int) and index >= 0,
                f"{field_name}.{kind}",
                f"layer indices must be integers >= 0, got {index!r}",
            )
            check(
                index not in owner,
                f"{field_name}.{kind}",
                f"layer {index} is also listed under {owner.get(index)}; every layer has one kind",
            )
            owner[index] = kind
    check(bool(owner), field_name, "lists no layers")
    missing = sorted(set(range(max(owner) + 1)) - set(owner))
    check(
        not missing,
        field_name,
        f"layers {missing} are in no list; indices must cover 0..{max(owner)} exactly once",
    )
    return "".join(_KIND_TO_LETTER[owner[i]] for i in range(len(owner)))


# ---------------------------------------------------------------- the config


@dataclass
class ModelConfig:
    """A StripedHyena 2 model. Defaults are the `small` preset. Field names follow the Evo 2 release YAML."""

    preset: str | None = None
    hidden_size: int = 128
    layout: str | dict[str, list[int]] = "SDH*SDH*"
    num_layers: int | None = None  # derived from layout; when given it must agree
    num_attention_heads: int = 4
    inner_mlp_size: int = 352
    vocab_size: int = 512
    short_filter_length: int = 3
    hcs_filter_length: int = 7
    hcs_filter_groups: int = 16
    hcm_filter_length: int = 128
    hcm_filter_groups: int = 16
    state_size: int = 16
    rotary_emb_base: float = 10000.0
    rotary_scaling_factor: float = 1.0  # positions are divided by it (linearly interpolated rotary)
    eps: float = 1e-6
    tie_embeddings: bool = True
    evo2_style_activations: bool = True  # exact GELU in layer 0 only, identity after (the released models)
    mlp_activation: Literal["gelu", "silu"] = "gelu"
    hcl_form: Literal["modal", "vortex"] = "modal"  # modal: lambda = -exp(p) * exp(gamma); vortex: free

    @classmethod
    def expand_config(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = _expand_release_keys(raw)
        name = raw.get("preset")
        if name is not None:
            check(isinstance(name, str), "preset", f"expected a preset name, got {name!r}")
            if name not in PRESETS:
                close = difflib.get_close_matches(name, PRESETS, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise FieldError("preset", f"unknown preset '{name}'; known: {', '.join(PRESETS)}{hint}")
            raw = {**PRESETS[name], **raw}
        return raw

    def __post_init__(self) -> None:
        self.layout = parse_layout(self.layout)
        n = len(self.layout)
        check(
            self.num_layers is None or self.num_layers == n,
            "num_layers",
            f"is {self.num_layers} but layout has {n} layers",
        )
        self.num_layers = n
        for name in (
            "hidden_size",
            "num_attention_heads",
            "inner_mlp_size",
            "vocab_size",
            "short_filter_length",
            "hcs_filter_length",
            "hcs_filter_groups",
            "hcm_filter_length",
            "hcm_filter_groups",
            "state_size",
        ):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        d = self.hidden_size
        check(
            d % self.num_attention_heads == 0,
            "num_attention_heads",
            f"{self.num_attention_heads} does not divide hidden_size {d}",
        )
        check(
            (d // self.num_attention_heads) % 2 == 0,
            "num_attention_heads",
            f"head dim {d // self.num_attention_heads} must be even for rotary embeddings",
        )
        for name in ("hcs_filter_groups", "hcm_filter_groups"):
            check(
                d % getattr(self, name) == 0, name, f"{getattr(self, name)} does not divide hidden_size {d}"
            )
        check(self.vocab_size >= 256, "vocab_size", "must be >= 256: tokens are bytes")
        check(self.rotary_emb_base > 1, "rotary_emb_base", f"must be > 1, got {self.rotary_emb_base}")
        check(self.rotary_scaling_factor > 0, "rotary_scaling_factor", "must be > 0")
        check(0 < self.eps < 1, "eps", f"must be in (0, 1), got {self.eps}")
        check(
            self.tie_embeddings,
            "tie_embeddings",
            "only tied embeddings are supported (every released Evo 2 model ties them)",
        )

    # ------------------------------------------------------------ derived

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def kind(self, layer: int) -> str:
        """'hcs', 'hcm', 'hcl' or 'attn' for layer index `layer`."""
        return LAYER_LETTERS[self.layout[layer]]

    def layer_indices(self, kind: str) -> list[int]:
        return [i for i in range(len(self.layout)) if self.kind(i) == kind]

    def to_release_dict(self) -> dict[str, Any]:
        """This config in the Evo 2 release YAML schema, as `export_vortex` writes it next to the weights:
        every key of the release files, so Vortex loads it; flash attention and fp8 projections off."""
        out: dict[str, Any] = {
            "model_name": f"evo2-cli-{self.preset or 'custom'}",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_filters": self.hidden_size,
            **{f"{kind}_layer_idxs": self.layer_indices(kind) for kind in ("attn", "hcl", "hcm", "hcs")},
            "hcm_filter_length": self.hcm_filter_length,
            "hcl_filter_groups": self.hidden_size,
            "hcm_filter_groups": self.hcm_filter_groups,
            "hcs_filter_groups": self.hcs_filter_groups,
            "hcs_filter_length": self.hcs_filter_length,
            "num_layers": self.num_layers,
            "short_filter_length": self.short_filter_length,
            "num_attention_heads": self.num_attention_heads,
            "short_filter_bias": False,
            "mlp_init_method": "torch.nn.init.zeros_",
            "mlp_output_init_method": "torch.nn.init.zeros_",
            "eps": self.eps,
            "state_size": self.state_size,
            "rotary_emb_base": self.rotary_emb_base,
            "make_vocab_size_divisible_by": 8,
            "inner_size_multiple_of": 16,
            "inner_mlp_size": self.inner_mlp_size,
            "log_intermediate_values": False,
            "proj_groups": 1,
            "hyena_filter_groups": 1,
            "column_split_hyena": False,
            "column_split": True,
            "interleave": True,
            "evo2_style_activations": self.evo2_style_activations,
            "model_parallel_size": 1,
            "pipe_parallel_size": 1,
            "tie_embeddings": True,
            "mha_out_proj_bias": True,
            "hyena_out_proj_bias": True,
            "hyena_flip_x1x2": False,
            "qkv_proj_bias": False,
            "use_fp8_input_projections": False,
            "max_seqlen": 8192,
            "max_batch_size": 1,
            "final_norm": True,
            "use_flash_attn": False,
            "use_flash_rmsnorm": False,
            "use_flash_depthwise": False,
            "use_flashfft": False,
            "use_laughing_hyena": False,
            "inference_mode": True,
            "tokenizer_type": "CharLevelTokenizer",
            "prefill_style": "fft",
            "mlp_activation": self.mlp_activation,
            "print_activations": False,
        }
        if self.rotary_scaling_factor != 1.0:
            out["use_interpolated_rotary_pos_emb"] = True
            out["rotary_emb_scaling_factor"] = self.rotary_scaling_factor
        return out


@dataclass
class ModelJob:
    """Root of a config file holding only a model (kind `model`; `configs/model/*.yaml`).

    A flat Evo 2 release YAML (no `model:` section) is accepted too: its keys are read as the model section.
    """

    model: ModelConfig = field(default_factory=ModelConfig)

    @classmethod
    def expand_config(cls, raw: dict[str, Any]) -> dict[str, Any]:
        if "model" not in raw and ("hidden_size" in raw or "preset" in raw):
            return {"model": raw}
        return raw


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The config of preset `name`, with keyword overrides, through the validator."""
    from evo2_cli.config import build_config

    return build_config(ModelConfig, {"preset": name, **overrides})


def load_model_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """A model config file: ours (its `model:` section; other sections are ignored) or a flat Evo 2 release
    YAML. `overrides` are `key=value` (flat) or `model.key=value` assignments. Errors name file:line."""
    from evo2_cli.config import build_config, read_yaml

    path = Path(path)
    raw, lines = read_yaml(path)
    if isinstance(raw.get("model"), dict):
        sets = [s if s.startswith("model.") else f"model.{s}" for s in overrides]
        return build_config(ModelJob, {"model": raw["model"]}, sets, str(path), lines).model
    sets = [s.removeprefix("model.") for s in overrides]
    return build_config(ModelConfig, raw, sets, str(path), lines)
