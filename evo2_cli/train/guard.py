"""The training guard: judge each step by its loss and gradient norm before the optimizer may apply it.

- a non-finite loss or gradient norm is always bad (the step is skipped);
- a gradient norm above `spike_factor` x the running median of recent good norms is a spike (skipped when
  `skip_spikes`, else applied and only logged);
- `max_bad_steps` consecutive bad steps ask for a rollback to the last good checkpoint at a lower lr: the
  guard then continues from the checkpoint's state, one rollback more, its lr scale backed off and its
  count of bad steps at 0;
- more than `max_rollbacks` rollbacks is divergence: the loop gives up with a clear error.

The state is plain data so a checkpoint carries it and a resumed run judges exactly as the original would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from statistics import median

from evo2_cli.train.config import GuardSection


@dataclass
class GuardState:
    good_norms: list[float] = field(default_factory=list)  # most recent last, at most median_window
    consecutive_bad: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0


@dataclass(frozen=True)
class Verdict:
    apply_step: bool
    problem: str | None = None  # "non-finite" or "spike"; None for a good step
    roll_back: bool = False
    threshold: float | None = None  # spike threshold in force, for the log


class GradientGuard:
    def __init__(self, config: GuardSection, state: GuardState | None = None):
        self.config = config
        self.state = state or GuardState()

    def assess(self, loss: float, grad_norm: float) -> Verdict:
        cfg, state = self.config, self.state
        threshold = None
        if len(state.good_norms) >= cfg.warmup_steps:
            threshold = cfg.spike_factor * median(state.good_norms)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            problem = "non-finite"
        elif threshold is not None and grad_norm > threshold:
            problem = "spike"
        else:
            state.good_norms = [*state.good_norms, grad_norm][-cfg.median_window :]
            state.consecutive_bad = 0
            return Verdict(apply_step=True, threshold=threshold)
        state.consecutive_bad += 1
        roll_back = state.consecutive_bad >= cfg.max_bad_steps
        apply_step = problem == "spike" and not cfg.skip_spikes
        return Verdict(apply_step=apply_step, problem=problem, roll_back=roll_back, threshold=threshold)

    def rolled_back(self, restored: GuardState) -> bool:
        """Continue from `restored` (the state saved with the checkpoint rolled back to), one rollback more,
        at a backed-off lr scale, with a full `max_bad_steps` before the next rollback (a checkpoint saved
        just after a skipped step holds a count above 0); False when the rollback budget is spent."""
        rollbacks, lr_scale = self.state.rollbacks + 1, self.state.lr_scale * self.config.lr_backoff
        self.state = replace(restored, consecutive_bad=0, rollbacks=rollbacks, lr_scale=lr_scale)
        return rollbacks <= self.config.max_rollbacks
