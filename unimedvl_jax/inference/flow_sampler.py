"""Flow-matching Euler sampler of docs/inference.md §5.3 ('Schedule'): shifted time from 1 to exactly 0,
num_timesteps − 1 steps x ← x − v(x, t_i)·(t_i − t_{i+1}), the velocity pointing from data to noise
(docs/model.md §3.11). x stays float32."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from unimedvl_jax.inference.precision import rounding_to


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: start + step·i for the first half, end − step·(steps−1−i) for the rest."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    start, end = np.float32(start), np.float32(end)
    step = (end - start) / np.float32(steps - 1)
    i = np.arange(steps)
    head = start + step * i.astype(np.float32)
    tail = end - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, head, tail).astype(np.float32)


def flow_timesteps(num_timesteps: int, timestep_shift: float) -> np.ndarray:
    """Shifted times t_0 = 1 > … > t_{n−1} = 0 (float32): t = s·τ / (1 + (s−1)·τ), τ = linspace(1, 0, n)."""
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2 (it gives num_timesteps - 1 Euler steps), "
                         f"got {num_timesteps!r}")
    if not (np.isfinite(timestep_shift) and timestep_shift > 0):
        raise ValueError(f"timestep_shift must be a positive number, got {timestep_shift!r}")
    tau = linspace_f32(1.0, 0.0, int(num_timesteps))
    return (timestep_shift * tau / (1 + (timestep_shift - 1) * tau)).astype(np.float32)


def euler_increment(v, dt):
    """v·dt in float32, rounded to v's dtype (a bf16 product in bf16 inference, docs/quirks.md §10.1)."""
    return rounding_to(v.dtype)(v.astype(jnp.float32) * jnp.float32(dt))


def euler_update(x, v, dt):
    """x − v·dt with x float32. The product takes v's dtype (a bf16 product in bf16 inference, docs/quirks.md §10.1)."""
    return x - euler_increment(v, dt).astype(x.dtype)


def euler_sample(velocity: Callable, x, timesteps):
    """Integrate from timesteps[0] to timesteps[-1]: x ← x − velocity(x, t_i, i)·(t_i − t_{i+1})."""
    x = jnp.asarray(x, jnp.float32)
    timesteps = np.asarray(timesteps, np.float32)
    for i in range(len(timesteps) - 1):
        x = euler_update(x, velocity(x, timesteps[i], i), timesteps[i] - timesteps[i + 1])
    return x


def euler_loop(velocity: Callable, x, timesteps, start, stop, *, record: bool = False):
    """euler_sample's steps start … stop − 1 as one traceable lax.fori_loop (start / stop may be traced).

    velocity(x_t, t) returns (v, aux). Returns x after the steps, and with `record` also (x_t, v, aux) of every step
    stacked over all len(timesteps) − 1 steps (rows outside [start, stop) are zeros).
    """
    def step(i, carry):
        # Each step's increment is subtracted at the start of the next iteration (or after the loop), never in the
        # computation that multiplies it: XLA would contract x − v·dt into one fused multiply-add, one rounding
        # fewer than the official two tensor ops and than euler_update run eagerly.
        x, dx, rec = carry
        x = x - dx
        t = timesteps[i]
        v, aux = velocity(x, t)
        if record:
            rec = jax.tree.map(lambda buf, val: buf.at[i].set(val), rec, (x, v, aux))
        return x, euler_increment(v, t - timesteps[i + 1]).astype(x.dtype), rec

    rec = None
    if record:
        steps = timesteps.shape[0] - 1
        shapes = jax.eval_shape(velocity, x, timesteps[0])
        rec = jax.tree.map(lambda a: jnp.zeros((steps, *a.shape), a.dtype), (x, *shapes))
    x, dx, rec = jax.lax.fori_loop(start, stop, step, (x, jnp.zeros_like(x), rec))
    x = x - dx
    return (x, rec) if record else x
