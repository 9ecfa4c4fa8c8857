"""`evo2 finetune`: train from a starting point (our checkpoint or released Evo 2 / Vortex weights) with
the one training loop of evo2_cli/train/loop.py; full, partial freeze or LoRA; LM or a sequence head. Owns
the adapters, the starting point, the heads' objective and metrics, reading finetuned checkpoints back.

Public API:
    FinetuneJob, FinetuneSection, LoraSection, LabelsSection   (config.py; kind `finetune`)
    finetune(job, resume='auto', overwrite=False, console=None) -> TrainResult   (run.py)
    train_prepared(prepared, objective=None, ...)   the loop on a prepared model (finetune = prepare + this)
    prepare(job, outputs=0) -> Prepared      the adapted model, trainable names, memory estimate
    load_finetuned(path) -> StripedHyena      plain, LoRA or task-head checkpoints of ours
    merge(path, out, vortex=None, ...)        fold LoRA into the weights; plain checkpoint (+ Vortex .pt)
    inject_lora / merge_lora / LoRALinear     (lora.py)
    frozen_names / trainable_names / selector grammar   (freeze.py)
    memory estimate: evo2_cli.train.memory (shared with `evo2 train`)
    auroc / spearman / rankdata, SequenceTask (the heads' objective)   (heads.py)
"""

from evo2_cli.finetune.config import FinetuneJob, FinetuneSection, LabelsSection, LoraSection
from evo2_cli.finetune.run import finetune, load_finetuned, merge, prepare

__all__ = [
    "FinetuneJob",
    "FinetuneSection",
    "LabelsSection",
    "LoraSection",
    "finetune",
    "load_finetuned",
    "merge",
    "prepare",
]
