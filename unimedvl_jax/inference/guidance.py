"""Two-way classifier-free guidance with velocity renormalisation (docs/inference.md §5.3 'Velocity',
docs/quirks.md §9.5).

v_c is the conditional velocity, v_text the text-unconditional one, v_img the image-unconditional one. All
arithmetic is rounded to the velocities' dtype after every op: in bf16 inference the official combination and
renorm are bf16 tensor ops (docs/quirks.md §10.1).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from unimedvl_jax.inference.precision import rounding_to

RENORM_TYPES = ("global", "channel", "text_channel")
_EPS = 1e-8


def check_guidance(cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_min, cfg_renorm_type) -> None:
    """Raise ValueError naming the offending guidance argument."""
    if cfg_renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type={cfg_renorm_type!r} not in {RENORM_TYPES}")
    for name, value in (("cfg_text_scale", cfg_text_scale), ("cfg_img_scale", cfg_img_scale),
                        ("cfg_renorm_min", cfg_renorm_min)):
        if not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    try:
        lo, hi = (float(v) for v in cfg_interval)
    except (TypeError, ValueError):
        raise ValueError(f"cfg_interval: expected a (low, high) pair, got {cfg_interval!r}") from None
    if not lo <= hi:
        raise ValueError(f"cfg_interval={cfg_interval!r}: low must be <= high")


def guidance_scales(t, cfg_interval, cfg_text_scale, cfg_img_scale) -> tuple[float, float]:
    """(s_T, s_I) at shifted time t: the given scales if low < t ≤ high, else (1, 1) (docs/inference.md §5.3,
    docs/quirks.md §9.5).

    The comparison is in float32, as the official code compares a float32 tensor with the Python bounds:
    exactly at t = 0.4 with interval (0.4, 1) guidance is off (docs/quirks.md §10.6).
    """
    t, lo, hi = np.float32(t), np.float32(cfg_interval[0]), np.float32(cfg_interval[1])
    if lo < t <= hi:
        return float(cfg_text_scale), float(cfg_img_scale)
    return 1.0, 1.0


def guidance_branches(text_scale: float, img_scale: float) -> int:
    """How many velocity branches a step needs: 1 (cond), 2 (+ text-uncond) or 3 (+ image-uncond).

    Image guidance is applied only when text guidance is (s_T > 1), docs/quirks.md §9.5.
    """
    if text_scale <= 1.0:
        return 1
    return 3 if img_scale > 1.0 else 2


def _norm(v, per_token: bool, rnd):
    """‖v‖ over everything (global) or per token over the last axis; float32 sum, one rounding (torch.norm)."""
    if per_token:
        return rnd(jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True)))
    return rnd(jnp.sqrt(jnp.sum(v * v)))


def _renorm(v_ref, v_guided, per_token: bool, renorm_min, rnd):
    """v_guided · clamp(‖v_ref‖ / (‖v_guided‖ + 1e-8), renorm_min, 1)."""
    scale = rnd(_norm(v_ref, per_token, rnd) / rnd(_norm(v_guided, per_token, rnd) + _EPS))
    return rnd(v_guided * jnp.minimum(jnp.maximum(scale, rnd(renorm_min)), 1.0))


def guide_velocity(v_c, v_text=None, v_img=None, *, text_scale, img_scale, renorm_type, renorm_min):
    """Guided velocity of docs/inference.md §5.3: text guidance, then image guidance, renormed against ‖v_c‖.

    v_text None means s_T ≤ 1 (no guidance at all, even if s_I > 1); v_img None means s_I ≤ 1. Scales and
    renorm_min may be traced scalars; renorm_type is static. The result has v_c's dtype, every op rounded to
    it as the official bf16 tensor ops are (docs/quirks.md §10.1).
    """
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"renorm_type={renorm_type!r} not in {RENORM_TYPES}")
    if v_text is None:
        return v_c
    dtype, rnd = v_c.dtype, rounding_to(v_c.dtype)
    v_c, v_text = v_c.astype(jnp.float32), v_text.astype(jnp.float32)
    text_scale, img_scale, renorm_min = (jnp.asarray(s, jnp.float32) for s in (text_scale, img_scale, renorm_min))

    def mix(uncond, cond, scale):  # uncond + scale·(cond − uncond)
        return rnd(uncond + rnd(scale * rnd(cond - uncond)))

    v_1 = mix(v_text, v_c, text_scale)
    if renorm_type == "text_channel":
        # Renorm only the text-guided velocity, per token; image guidance is applied after (docs/inference.md §5.3).
        v_1 = _renorm(v_c, v_1, True, renorm_min, rnd)
        v = v_1 if v_img is None else mix(v_img.astype(jnp.float32), v_1, img_scale)
    else:
        v_2 = v_1 if v_img is None else mix(v_img.astype(jnp.float32), v_1, img_scale)
        v = _renorm(v_c, v_2, renorm_type == "channel", renorm_min, rnd)
    return v.astype(dtype)
