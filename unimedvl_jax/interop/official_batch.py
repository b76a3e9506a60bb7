"""Adapter from the official packed training inputs (BAGEL `pack_sequence` output, docs/packed_sequence.md §4.4) to our
PackedBatch.

Official tensors are lists of indexes into one packed sequence; ours are static-shape per-token arrays.
The adapter is exact: it derives token kinds from the index lists, sample/split ids and modes from
`sample_lens` / `split_lens` / `attn_modes`, latent token grids from `patchified_vae_latent_shapes`, and
the MoT routing buffers from the token kinds. Optional `pad_tokens` appends padding (a causal pad sample,
as the flex path does) to check that padding changes nothing.
"""

from __future__ import annotations

import numpy as np

from unimedvl_jax.packed_batch import PAD, SPLIT_MODES, TEXT, VAE, VIT, PackedBatch, contiguous_runs
from unimedvl_jax.patches import grid_rows_cols


def _i(x):
    return np.asarray(x, np.int64).reshape(-1)


def official_to_packed_batch(t: dict, attn_modes: list[str], *, vit_patch_dim: int = 588, latent_channels: int = 16,
                             pad_tokens: int = 0) -> tuple[PackedBatch, np.ndarray]:
    """(PackedBatch, latents NHWC) from the official forward kwargs `t` (numpy) and the split attn modes."""
    sample_lens, split_lens = _i(t["sample_lens"]), _i(t["split_lens"])
    length = int(sample_lens.sum())
    total = length + pad_tokens
    if int(split_lens.sum()) != length or len(attn_modes) != len(split_lens):
        raise ValueError(f"split_lens {split_lens.tolist()} / attn_modes {attn_modes} do not tile "
                         f"sample_lens {sample_lens.tolist()}")
    kind = np.full(total, PAD, np.int32)
    text_ids = np.zeros(total, np.int32)
    text_idx = _i(t["packed_text_indexes"])
    kind[text_idx], text_ids[text_idx] = TEXT, _i(t["packed_text_ids"])
    vit_idx = _i(t.get("packed_vit_token_indexes", []))
    vae_idx = _i(t.get("packed_vae_token_indexes", []))
    kind[vit_idx], kind[vae_idx] = VIT, VAE

    sample_id = np.concatenate([np.repeat(np.arange(len(sample_lens)), sample_lens),
                                np.full(pad_tokens, len(sample_lens))]).astype(np.int32)
    split_id = np.concatenate([np.repeat(np.arange(len(split_lens)), split_lens),
                               np.full(pad_tokens, len(split_lens))]).astype(np.int32)
    modes = np.array([SPLIT_MODES[m] for m in attn_modes] + [SPLIT_MODES["causal"]], np.int32)
    split_mode = modes[split_id]
    position_ids = np.concatenate([_i(t["packed_position_ids"]), np.zeros(pad_tokens, np.int64)]).astype(np.int32)

    # ViT patches, one image per vit_token_seqlens entry.
    seqlens = _i(t.get("vit_token_seqlens", []))
    vit_image_id = np.repeat(np.arange(len(seqlens)), seqlens).astype(np.int32)
    vit_patches = (np.asarray(t["packed_vit_tokens"], np.float32) if len(vit_idx)
                   else np.zeros((0, vit_patch_dim), np.float32))

    # VAE latent tokens in image order, raster order inside each image (docs/model.md §3.10).
    shapes = np.asarray(t.get("patchified_vae_latent_shapes", np.zeros((0, 2))), np.int64).reshape(-1, 2)
    img, row, col = [], [], []
    for n, (h, w) in enumerate(shapes):
        r, c = grid_rows_cols(h, w)
        img.append(np.full(h * w, n)), row.append(r), col.append(c)
    cat = (lambda xs: np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32))
    timesteps = np.asarray(t.get("packed_timesteps", np.zeros(0)), np.float32)

    und = np.nonzero((kind == TEXT) | (kind == VIT))[0].astype(np.int32)
    gen = np.nonzero(kind == VAE)[0].astype(np.int32)
    ce_index = _i(t.get("ce_loss_indexes", [])).astype(np.int32)
    latents = np.transpose(np.asarray(t["padded_latent"], np.float32), (0, 2, 3, 1)) if len(vae_idx) else \
        np.zeros((0, 2, 2, latent_channels), np.float32)
    images = (np.transpose(np.asarray(t["padded_images"], np.float32), (0, 2, 3, 1))
              if "padded_images" in t else np.zeros((0, 16, 16, 3), np.float32))
    batch = PackedBatch(
        text_ids=text_ids, token_kind=kind, sample_id=sample_id, split_id=split_id, split_mode=split_mode,
        position_ids=position_ids, und_index=und, gen_index=gen, ce_index=ce_index,
        ce_labels=_i(t.get("packed_label_ids", [])).astype(np.int32),
        ce_weight=np.ones(len(ce_index), np.float32),
        vit_patches=vit_patches, vit_position_ids=_i(t.get("packed_vit_position_ids", [])).astype(np.int32),
        vit_image_id=vit_image_id, vit_token_index=vit_idx.astype(np.int32), vae_images=images,
        vae_token_image=cat(img), vae_token_row=cat(row), vae_token_col=cat(col),
        vae_position_ids=_i(t.get("packed_latent_position_ids", [])).astype(np.int32),
        vae_token_index=vae_idx.astype(np.int32), vae_timestep=timesteps)
    return batch, latents


def _runs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value, length) of each run of equal values in `ids`."""
    starts, lengths = contiguous_runs(ids)
    return ids[starts], lengths


def packed_batch_to_official(batch: PackedBatch, latents) -> tuple[dict, list[list[str]]]:
    """(official forward kwargs as numpy, the attn modes of each sample's splits) of one numpy PackedBatch and its
    latents (N, h, w, C): the inverse of official_to_packed_batch (padding and capacity slots dropped).

    The kwargs are those of the official training forward with `split_lens` / `attn_modes` (the packed-mask form);
    `split_lens_per_sample` lists each sample's splits, for building the per-sample masks."""
    kind = np.asarray(batch.token_kind)
    length = int(np.count_nonzero(kind != PAD))
    if np.any(kind[:length] == PAD):
        raise ValueError(f"padding tokens among the first {length} tokens: the official layout packs the real tokens "
                         "first")
    samples, sample_lens = _runs(np.asarray(batch.sample_id)[:length])
    splits, split_lens = _runs(np.asarray(batch.split_id)[:length])
    for what, ids in (("sample", samples), ("split", splits)):
        values, counts = np.unique(ids, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(f"{what} {int(values[counts > 1][0])} is not one contiguous run of tokens: the official "
                             f"layout packs each {what} in one piece")
    mode_names = {v: k for k, v in SPLIT_MODES.items()}
    split_sample = np.asarray(batch.sample_id)[np.cumsum(split_lens) - 1]
    split_mode = np.asarray(batch.split_mode)[np.cumsum(split_lens) - 1]
    attn_modes = [[mode_names[int(m)] for m in split_mode[split_sample == s]] for s in samples]

    text_idx = np.flatnonzero(kind == TEXT)
    ce = np.asarray(batch.ce_weight) > 0
    vit = np.asarray(batch.vit_token_index) < len(kind)
    vae = np.asarray(batch.vae_token_index) < len(kind)
    vae_index = np.asarray(batch.vae_token_index)[vae]
    timesteps = np.asarray(batch.vae_timestep, np.float32)[vae]
    images, rows, cols = (np.asarray(x)[vae] for x in (batch.vae_token_image, batch.vae_token_row,
                                                        batch.vae_token_col))
    shapes = [(int(rows[images == n].max()) + 1, int(cols[images == n].max()) + 1) for n in _runs(images)[0]]
    t = dict(
        sequence_length=length, sample_lens=sample_lens, split_lens=split_lens,
        split_lens_per_sample=[split_lens[split_sample == s] for s in samples],
        packed_text_ids=np.asarray(batch.text_ids)[text_idx].astype(np.int64), packed_text_indexes=text_idx,
        packed_position_ids=np.asarray(batch.position_ids)[:length].astype(np.int64))
    if ce.any():
        t.update(ce_loss_indexes=np.asarray(batch.ce_index)[ce].astype(np.int64),
                 packed_label_ids=np.asarray(batch.ce_labels)[ce].astype(np.int64))
    if vit.any():
        t.update(packed_vit_tokens=np.asarray(batch.vit_patches, np.float32)[vit],
                 packed_vit_token_indexes=np.asarray(batch.vit_token_index)[vit].astype(np.int64),
                 packed_vit_position_ids=np.asarray(batch.vit_position_ids)[vit].astype(np.int64),
                 vit_token_seqlens=_runs(np.asarray(batch.vit_image_id)[vit])[1].astype(np.int32))
    if vae.any():
        t.update(padded_latent=np.transpose(np.asarray(latents, np.float32)[:len(shapes)], (0, 3, 1, 2)),
                 patchified_vae_latent_shapes=np.asarray(shapes, np.int64),
                 packed_latent_position_ids=np.asarray(batch.vae_position_ids)[vae].astype(np.int64),
                 packed_vae_token_indexes=vae_index.astype(np.int64), packed_timesteps=timesteps,
                 mse_loss_indexes=vae_index[np.isfinite(timesteps)].astype(np.int64))
    return t, attn_modes
