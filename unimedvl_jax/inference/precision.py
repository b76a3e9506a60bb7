"""Per-operation rounding for low-precision sampling arithmetic (docs/quirks.md §10.1, docs/quirks.md §10.2).

The official bf16 inference rounds the result of every tensor op to bf16. Under jit, XLA may fuse bf16 ops and
keep float32 intermediates (excess precision), so the arithmetic is done in float32 with an explicit rounding
to the target format after each op; for float32 the rounding is the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rounding_to(dtype):
    """x (float32) ↦ x rounded to `dtype`'s precision, still float32 (identity for float32 and wider)."""
    dtype = jnp.dtype(dtype)
    info = jnp.finfo(dtype)
    if info.bits >= 32:
        return lambda x: x
    return lambda x: jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
