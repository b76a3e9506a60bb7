"""The next-token rule shared by every text decoder: greedy, temperature, and top-p (nucleus) sampling.

docs/inference.md §5.2 has only greedy and softmax(logits / temperature) sampling; top-p is an addition. With top_p = 1
(the default) the rule is exactly the one of docs/inference.md §5.2. Temperature and top_p are traced values, so
changing them never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise ValueError unless temperature ≥ 0 (0 = greedy) and 0 < top_p ≤ 1."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def top_p_mask(logits, top_p):
    """Boolean mask over the last axis of the smallest top set whose probability mass reaches top_p.

    Tokens are ranked by logit (ties: lower id first); a token is kept iff the mass of the tokens ranked before
    it is < top_p, so the top token is always kept and top_p ≥ 1 keeps everything.
    """
    order = jnp.argsort(-logits, axis=-1, stable=True)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1).astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < top_p) | (top_p >= 1)
    rank = jnp.argsort(order, axis=-1)  # inverse permutation: token id -> rank
    return jnp.take_along_axis(keep_sorted, rank, axis=-1)


def sample_token(logits, key, temperature, top_p):
    """Next token of one row of logits (V,): argmax if temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top-p nucleus (temperature first, as in HF)."""
    logits = logits.astype(jnp.float32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    filtered = jnp.where(top_p_mask(scaled, top_p), scaled, -jnp.inf)
    sampled = jax.random.categorical(key, filtered)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)
