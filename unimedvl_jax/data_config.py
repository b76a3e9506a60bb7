"""Data section of the experiment config: pack budgets (static PackedBatch shapes), image transforms
(docs/preprocessing.md §6), CFG dropout (docs/packed_sequence.md §4.5) and where the shards live. Shared by
configs/*.py."""

from __future__ import annotations

import ml_collections

from unimedvl_jax.errors import UserError

DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024  # docs/preprocessing.md §6.4
READ_THREADS = 2        # reader threads per data stream (data_pipelines/worker_prefetch.py)
READ_BUFFER_SIZE = 16   # elements those threads decode ahead of the consumer


def data_config(**overrides) -> ml_collections.ConfigDict:
    """Pack budgets and transforms; defaults are the tiny CPU sizes."""
    c = ml_collections.ConfigDict(dict(
        # Static pack shapes: T tokens, MoT capacities, CE positions, ViT patches, VAE tokens/images/size.
        max_tokens=1024, und_capacity=1024, gen_capacity=512, max_ce=512, max_vit_patches=1024,
        max_vae_tokens=512, max_vae_images=8, vae_image_size=(128, 128),
        # ViT: side 224 = 16 patches (= the tiny table side); VAE: stride = downsample·latent_patch_size = 16.
        vit_transform=dict(max_size=224, min_size=112, stride=14, max_pixels=DEFAULT_MAX_PIXELS),
        vae_transform=dict(max_size=128, min_size=64, stride=16, max_pixels=DEFAULT_MAX_PIXELS),
        cfg_dropout=dict(text=0.1, vit=0.3, vae=0.3),  # BAGEL training-script values (docs/packed_sequence.md §4.5)
        special_token_loss=False,
        # Shards: a TFDS data dir and dataset directory name (python -m data_pipelines.build ...).
        data_dir="data",
        dataset="unimed_mini",  # builder config name: unimed_mini or manifest_<stem>_<hash>
        tokenizer="",  # tokenizer.json / SentencePiece dir; empty = train SentencePiece on the train split
        train_split="train",
        # UniMedVL mixture YAML streamed from its JSONL / parquet files instead of shards (docs/unimedvl_format.md);
        # dataset_info file (empty = the YAML's own dataset_info key).
        mixture="", mixture_dataset_info="",
        num_workers=0,  # grain worker processes per data shard (0: decode in the training process)
        # Reader threads per stream and how many elements they decode ahead (data_pipelines/worker_prefetch.py).
        read_threads=READ_THREADS, read_buffer_size=READ_BUFFER_SIZE,
        seed=0,
        balance_alpha=0.0,  # modality-balanced sampling per task family, weight n_m^-alpha (data_pipelines/balance.py)
    ))
    c.update(overrides)
    return c


def validate_stream_options(c: ml_collections.ConfigDict) -> None:
    """Fail with one error line (a UserError) on data stream settings no stream can run with, before anything
    is built."""
    errors = [f"data.{key}={c[key]!r} must be an integer >= {low}"
              for key, low in (("num_workers", 0), ("read_threads", 1), ("read_buffer_size", 1))
              if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < low]
    if errors:
        raise UserError("invalid data config: " + "; ".join(errors))
