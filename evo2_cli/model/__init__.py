"""The StripedHyena 2 (Evo 2) model package shared by train, finetune, infer, convert and diagnose-grads.
It owns the model, its configs, the checkpoint files (their names, layout inside a run directory, sha256
verification) and the one resolver of "which checkpoint does this path mean" (`load_source` loads any).

Public API (names are stable):

Config (evo2_cli.model.config)
    ModelConfig                     the `model:` config section (typed dataclass, strict validation)
    ModelJob                        root dataclass of a model-only config file (kind `model`)
    PRESETS: dict[str, dict]        'test', 'small', 'evo2-1b', 'evo2-7b', 'evo2-40b'
    LAYER_LETTERS                   layout letters: S hcs, D hcm, H hcl, * attention
    load_model_config(path, overrides=()) -> ModelConfig
                                    a model YAML: ours (`model:` section, other sections ignored) or a flat
                                    Evo 2 release YAML; errors name file:line and key (ConfigError, exit 2)
    preset_config(name, **overrides) -> ModelConfig

Model (evo2_cli.model.model)
    StripedHyena(config)            nn.Module
        .forward(input_ids [B, L], return_hidden_layers=None) -> logits [B, L, V]
                                    (or (logits, {layer: hidden [B, L, D]}) when return_hidden_layers given)
        .new_cache(batch_size, max_length=0) -> InferenceCache   (max_length: sizes the KV buffers once)
        .prefill(input_ids [B, P], cache, chunk_size=None, return_hidden_layers=None) -> logits [B, P, V]
                                    (or (logits, {layer: hidden [B, P, D]})); continues a non-empty cache
        .prefill_chunks(input_ids [B, P], cache, chunk_size, return_hidden_layers=None)
                                    -> iterator of (logits [B, C, V], {layer: hidden [B, C, D]}) per chunk:
                                    exact long context, memory O(B D C) + the KV cache
        .step(token_ids [B], cache) -> logits [B, V]
        .generate_greedy(prompt_ids [B, P], num_tokens) -> (ids [B, N], logits [B, N, V])
        .hcl_filters(length) -> {layer: h [D, length]}
        .num_parameters() -> int
        .activation_checkpointing: bool (recompute blocks in backward)
    optimizer_param_groups(model, weight_decay) -> [{'params', 'names', 'weight_decay'}, ...]
    is_no_weight_decay(name) / is_filter_parameter(name) -> bool
    estimate_flops(config, seq_len) -> float      forward FLOPs of one sequence (x3 for training)
    flops_breakdown(config, seq_len) -> {'matmul', 'conv', 'attention'}

Vortex / Evo 2 checkpoints (evo2_cli.model.vortex)
    load_vortex(config_path, checkpoint_path, hcl_form=None, clamp_poles=None, dtype=None) -> StripedHyena
                                    hcl_form None: the config's (modal unless it says vortex)
    vortex_state_dict(model) -> dict[str, Tensor]          our model in the Vortex .pt layout
    export_vortex(model, checkpoint_path, config_path)     writes the .pt and a release-style YAML atomically

Our checkpoint directory (evo2_cli.model.checkpoint)
    save_model(model, directory, config=None, meta=None)
                                    model.safetensors + config.yaml (`model:` section) + meta.json
    resolve_checkpoint(path, vortex=True) -> Path   the checkpoint dir (or Vortex .pt) any source means
    load_model(path, map_location='cpu', dtype=None, verify=True) -> StripedHyena
    load_source(path, vortex_config=None, hcl_form=None, clamp_poles=None, verify=True) -> StripedHyena
    load_checkpoint_config(path, verify=True, vortex_config=None) -> ModelConfig (a .pt: vortex_config_of)
                                    verify: the files' sha256 against meta.json (False: --no-verify)
"""

from __future__ import annotations

from evo2_cli.model.config import (
    LAYER_LETTERS,
    PRESETS,
    ModelConfig,
    ModelJob,
    load_model_config,
    preset_config,
)
from evo2_cli.model.model import (
    InferenceCache,
    StripedHyena,
    estimate_flops,
    flops_breakdown,
    is_filter_parameter,
    is_no_weight_decay,
    optimizer_param_groups,
)

__all__ = [
    "LAYER_LETTERS",
    "PRESETS",
    "InferenceCache",
    "ModelConfig",
    "ModelJob",
    "StripedHyena",
    "estimate_flops",
    "flops_breakdown",
    "is_filter_parameter",
    "is_no_weight_decay",
    "load_model_config",
    "optimizer_param_groups",
    "preset_config",
]


def __getattr__(name: str):
    # vortex.py and checkpoint.py import lazily (safetensors, file IO) and are re-exported here.
    if name in ("load_vortex", "export_vortex", "vortex_state_dict"):
        from evo2_cli.model import vortex

        return getattr(vortex, name)
    if name in ("save_model", "load_model", "load_checkpoint_config"):
        from evo2_cli.model import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'evo2_cli.model' has no attribute {name!r}")
