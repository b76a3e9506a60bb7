"""Image grids shared by data, model and inference: raster token grids, flattened 2-D position ids (docs/model.md §3.6)
and the patchify order of ViT patches (docs/model.md §3.5) and latent tokens (docs/model.md §3.10). Pure array code
(numpy or jax)."""

from __future__ import annotations

import numpy as np


def grid_rows_cols(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each cell of an h×w grid in raster order, as two flat int arrays of length h·w."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return r.reshape(-1), c.reshape(-1)


def flattened_position_ids(h: int, w: int, side: int, interpolate: bool = False) -> np.ndarray:
    """Flattened 2-D ids of an h×w grid in a side×side table: 'extrapolate' r*side+c, or bucketized
    (docs/model.md §3.6)."""
    if not interpolate:
        if h > side or w > side:
            raise ValueError(f"grid {h}x{w} exceeds the {side}x{side} position table")
        r, c = grid_rows_cols(h, w)
        return r * side + c
    boundaries = np.arange(1 / side, 1.0, 1 / side)
    r = np.searchsorted(boundaries, np.arange(0, 1 - 1e-6, 1 / h), side="right")
    c = np.searchsorted(boundaries, np.arange(0, 1 - 1e-6, 1 / w), side="right")
    return (r[:, None] * side + c[None, :]).reshape(-1)


def patchify(x, patch: int):
    """(p·h, p·w, C) -> (h·w, p·p·C) in raster order, features (row-in-patch, col-in-patch, channel).

    The ordering shared by the ViT patches (docs/model.md §3.5) and the latent tokens (docs/model.md §3.10); works on
    numpy and jax arrays.
    """
    hp, wp, c = x.shape
    h, w = hp // patch, wp // patch
    x = x.reshape(h, patch, w, patch, c).transpose(0, 2, 1, 3, 4)
    return x.reshape(h * w, patch * patch * c)


def patchify_latent(latent, patch: int):
    """Patchify one latent cropped to whole patches (the inverse of unpatchify_latent)."""
    hp, wp, _ = latent.shape
    return patchify(latent[: hp - hp % patch, : wp - wp % patch], patch)


def unpatchify_latent(tokens, h: int, w: int, patch: int, channels: int):
    """Inverse of patchify for one h×w token grid in raster order: (h·w, p·p·C) -> (p·h, p·w, C)."""
    x = tokens.reshape(h, w, patch, patch, channels)
    return x.transpose(0, 2, 1, 3, 4).reshape(h * patch, w * patch, channels)
