"""Optimizer section of the experiment config: BAGEL's training-script defaults (docs/training.md §7.2)."""

from __future__ import annotations

import ml_collections


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """AdamW β=(0.9, 0.95), eps 1e-15, no weight decay, clip 1.0, EMA 0.9999 from step 0 (docs/training.md §7.2).

    grad_accum_steps: the global batch's packs are processed in this many sequential micro-batches (must divide
    train.batch_packs); gradients and loss terms are summed, each normalised by the global token counts.
    mu_dtype: dtype of Adam's first moment (optax.adamw mu_dtype), e.g. 'bfloat16'; '' = the parameters' dtype.
    The second moment stays in the parameters' dtype.
    compute_weights_dtype: e.g. 'bfloat16': the step casts the float parameters to this dtype once per
    (micro-)batch, keeping each one's sharding (so FSDP all-gathers move this dtype), and runs the forward and
    backward on the cast copy; the gradients come back in the stored dtype (the cast is differentiated) and the
    update applies to the stored parameters, which stay the master copy (model.param_dtype, fp32 by default).
    '' = off (the forward reads the stored parameters). Activations follow model.dtype either way.
    """
    c = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.0, grad_clip=1.0,
                                       ema_decay=0.9999, grad_accum_steps=1, mu_dtype="",
                                       compute_weights_dtype=""))
    c.update(overrides)
    return c
