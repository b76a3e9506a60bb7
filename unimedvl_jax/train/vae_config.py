"""The `vae_training` config section of unimedvl-train-vae (train/vae_training.py)."""

from __future__ import annotations

import ml_collections


def vae_training_config(**overrides) -> ml_collections.ConfigDict:
    """The `vae_training` section: steps, batch of square crops, optimiser and loss weights."""
    c = ml_collections.ConfigDict(dict(
        steps=1500, batch_size=16, crop_size=64, lr=1e-3, warmup_steps=100, min_lr=1e-5, kl_weight=1e-6,
        mse_weight=1.0, grad_clip=1.0, seed=0, log_every=100, max_images=0,  # 0 = every image of the split
        eval_images=64, stats_crops=256,
        # Crops per encoder call in training (0 = the whole batch): the backward of a per-image loop is about 4× slower
        # on CPU than one batched call (16 × 64² crops: 1.19 s vs 0.30 s per step), unlike inference's encode.
        images_per_call=0,
    ))
    c.update(overrides)
    return c
