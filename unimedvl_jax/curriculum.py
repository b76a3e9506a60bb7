"""The three-stage curriculum as data (docs/training.md §7.1): stage boundaries and per-stage task mixtures.

Stages are parallel tuples in the config so every field is overridable from the command line:
  curriculum.stage_names   ('foundation', 'instruction', 'unified')
  curriculum.stage_steps   (85_000, 120_000, 70_000)
  curriculum.mixture.understanding / .generation / .interleaved   one weight per stage
  curriculum.remainder_policy   what the published ratios' missing share means (stage 2 sums to 95%, stage 3
                                to 97%): 'renormalise' spreads it over the listed tasks in proportion.

The stage of a step is searchsorted(boundaries, step, 'right'); steps past the last boundary stay in the last
stage. The data pipeline and the train step share this one function.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

TASKS = ("understanding", "generation", "interleaved")
REMAINDER_POLICIES = ("renormalise",)


@dataclasses.dataclass(frozen=True)
class StageSchedule:
    """Stage names, lengths and per-stage task weights (normalised; published ratios kept in `published`)."""

    names: tuple[str, ...]
    steps: tuple[int, ...]
    published: tuple[dict, ...]   # per stage: task -> ratio as written in the config
    weights: tuple[dict, ...]     # per stage: task -> probability (sums to 1)

    @property
    def boundaries(self) -> np.ndarray:
        """Cumulative step at which each stage ends."""
        return np.cumsum(self.steps)

    def stage_at(self, step: int) -> int:
        """Index of the stage that contains `step` (0-based)."""
        return int(min(np.searchsorted(self.boundaries, step, side="right"), len(self.steps) - 1))

    def remainder(self, stage: int) -> float:
        """1 − the sum of the published ratios of `stage` (0.05 and 0.03 for the published stages 2 and 3)."""
        return 1.0 - sum(self.published[stage].values())

    @classmethod
    def from_config(cls, cur) -> "StageSchedule":
        """Build from the `curriculum` ConfigDict (see module docstring); clear errors on bad tables."""
        names, steps = tuple(cur.stage_names), tuple(int(s) for s in cur.stage_steps)
        n = len(names)
        if len(steps) != n or n == 0:
            raise ValueError(f"curriculum: {n} stage_names but {len(steps)} stage_steps")
        if min(steps) <= 0:
            raise ValueError(f"curriculum.stage_steps must be positive, got {steps}")
        if cur.remainder_policy not in REMAINDER_POLICIES:
            raise ValueError(f"curriculum.remainder_policy={cur.remainder_policy!r} not in {REMAINDER_POLICIES}")
        published, weights = [], []
        for s in range(n):
            row = {}
            for task in TASKS:
                values = tuple(cur.mixture[task])
                if len(values) != n:
                    raise ValueError(f"curriculum.mixture.{task} has {len(values)} entries for {n} stages")
                row[task] = float(values[s])
            total = sum(row.values())
            if min(row.values()) < 0 or total <= 0 or total > 1 + 1e-9:
                raise ValueError(f"curriculum stage {names[s]!r}: mixture {row} must be >= 0 and sum to (0, 1]")
            published.append(row)
            weights.append({t: w / total for t, w in row.items()})
        return cls(names, steps, tuple(published), tuple(weights))


def curriculum_config(steps=(85_000, 120_000, 70_000)):
    """The docs/training.md §7.1 curriculum with the published ratios (stage lengths overridable).

    Per-stage training fields (one entry per stage; docs/training.md §7.4 lists them UNVERIFIED for UniMedVL, so BAGEL's
    docs/training.md §7.2 defaults are used): peak lr, warmup steps, schedule ('constant' | 'cosine') with min_lr, CE /
    MSE loss weights, and the regex of trainable parameter paths (matched with re.search on 'a.b.0.c' JAX paths; the
    frozen VAE and the fixed position tables are never trained).
    """
    return ml_collections.ConfigDict(dict(
        stage_names=("foundation", "instruction", "unified"),
        stage_steps=tuple(steps),
        mixture=dict(understanding=(0.75, 0.40, 0.37), generation=(0.25, 0.45, 0.35),
                     interleaved=(0.0, 0.10, 0.25)),
        remainder_policy="renormalise",
        lr=(2e-5, 2e-5, 2e-5),
        warmup_steps=(2000, 0, 0),
        schedule=("constant", "constant", "constant"),
        min_lr=(1e-7, 1e-7, 1e-7),
        ce_weight=(1.0, 1.0, 1.0),
        mse_weight=(1.0, 1.0, 1.0),
        trainable=(r"^(?!vae_model\.)", r"^(?!vae_model\.)", r"^(?!vae_model\.)"),
    ))
