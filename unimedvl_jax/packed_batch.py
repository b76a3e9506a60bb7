"""The one packed-batch contract shared by data, model, loss and inference (docs/architecture.md "Core ideas").

All arrays have static shapes so one compiled step serves every batch:
  T  tokens in the packed sequence      P  ViT patches        V  VAE latent tokens
  C_und / C_gen  MoT expert capacities  C_ce  CE positions    N  VAE images (padded to a common H×W)
Index arrays use the value T (one past the end) for padding slots; those are dropped on scatter.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import struct

# token_kind values
PAD, TEXT, VIT, VAE = 0, 1, 2, 3
# split_mode values: causal text, a full-attention image block (ViT or clean VAE), a noised VAE block that only its
# own split may see
CAUSAL, FULL, NOISE = 0, 1, 2
SPLIT_MODES = {"causal": CAUSAL, "full": FULL, "noise": NOISE}


@struct.dataclass
class PackedBatch:
    """Static-shape per-token description of one packed sequence (see module docstring for the dims)."""

    # (T,) per token
    text_ids: jax.Array        # token id at text positions (incl. image markers), 0 elsewhere
    token_kind: jax.Array      # PAD / TEXT / VIT / VAE
    sample_id: jax.Array       # document id; padding tokens get their own id
    split_id: jax.Array        # globally unique split id
    split_mode: jax.Array      # CAUSAL / FULL / NOISE
    position_ids: jax.Array    # 1-D rope position
    # MoT routing buffers
    und_index: jax.Array       # (C_und,) positions of text + ViT tokens
    gen_index: jax.Array       # (C_gen,) positions of VAE latent tokens
    # next-token CE
    ce_index: jax.Array        # (C_ce,) positions whose hidden state predicts a label
    ce_labels: jax.Array       # (C_ce,)
    ce_weight: jax.Array       # (C_ce,) float, 0 for padding slots
    # ViT input
    vit_patches: jax.Array     # (P, p*p*3) in (row, col, channel) order, values in [-1, 1]
    vit_position_ids: jax.Array  # (P,) flattened 2-D ids (r*side + c)
    vit_image_id: jax.Array    # (P,) image each patch belongs to (attention stays inside one image)
    vit_token_index: jax.Array  # (P,) position in the sequence, T for padding
    # VAE input
    vae_images: jax.Array      # (N, H, W, 3) in [-1, 1], zero padded bottom/right (docs/packed_sequence.md §4.4)
    vae_token_image: jax.Array  # (V,) which image each latent token comes from
    vae_token_row: jax.Array   # (V,) token-grid row
    vae_token_col: jax.Array   # (V,) token-grid column
    vae_position_ids: jax.Array  # (V,) flattened 2-D ids in the latent table
    vae_token_index: jax.Array  # (V,) position in the sequence, T for padding
    vae_timestep: jax.Array    # (V,) raw logit-normal draw n; -inf for clean conditions and padding
    # () int32: curriculum stage the data pipeline built this batch for (the train loop checks it against the
    # stage of the step it feeds, before dispatch)
    stage: jax.Array = struct.field(default_factory=lambda: np.zeros((), np.int32))

    @property
    def num_tokens(self) -> int:
        return self.text_ids.shape[0]

    def to_numpy(self) -> "PackedBatch":
        return jax.tree.map(np.asarray, self)


def describe_shapes(batch: PackedBatch) -> dict[str, tuple]:
    """Field name -> shape, for error messages and logging."""
    return {k: tuple(np.shape(v)) for k, v in vars(batch).items()}


def contiguous_runs(ids) -> tuple[np.ndarray, np.ndarray]:
    """(start position, length) of each run of equal consecutive values in a 1-D numpy array (e.g. the samples or
    splits of a pack in the packer's layout)."""
    ids = np.asarray(ids)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
    return starts, np.diff(np.r_[starts, len(ids)])
