"""From config to a running input pipeline: open the built shards (or the UniMedVL mixture YAML of data.mixture,
streamed from its files: docs/unimedvl_format.md), get a tokenizer, build the iterator."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from data_pipelines import tfds_builder
from data_pipelines.balance import balance_tasks
from data_pipelines.data_shards import DataShardLayout
from data_pipelines.mixture import Mixture
from data_pipelines.packing import Packer
from data_pipelines.pipeline import PackedBatchIterator, ShardedPackIterator, source_records, split_by_task
from data_pipelines.sample_plan import Planner
from data_pipelines.schema import decode_image
from data_pipelines.transforms import ImageTransform
from data_pipelines.unimedvl_stream import MixturePackIterator
from data_pipelines.worker_prefetch import StreamOptions
from unimedvl_jax.curriculum import StageSchedule
from unimedvl_jax.tokenizers import SentencePieceTokenizer, load_tokenizer

log = logging.getLogger(__name__)


def open_split(data_cfg, split: str):
    """Random-access source of one split of the dataset named by data_cfg (data_dir, dataset)."""
    path = tfds_builder.dataset_dir(data_cfg.data_dir, data_cfg.dataset)
    if not path.exists():
        raise FileNotFoundError(f"{path}: dataset not built; run `python -m data_pipelines.build --dataset "
                                f"unimed-mini --data-dir {data_cfg.data_dir}` (or --dataset manifest ...)")
    return tfds_builder.data_source(path, split)


def open_mixture(data_cfg) -> Mixture | None:
    """The Mixture of data_cfg.mixture (dataset_info from data_cfg.mixture_dataset_info or the YAML), else None."""
    path = getattr(data_cfg, "mixture", "")
    return Mixture.load(path, getattr(data_cfg, "mixture_dataset_info", "") or None) if path else None


def corpus_texts(source) -> list[str]:
    """Every text segment of a source's records (bad records logged and skipped), for training a tokenizer."""
    return [s.text for record in source_records(source, name="tokenizer corpus") for s in record.segments
            if s.kind == "text" and s.text]


def get_tokenizer(data_cfg, model_cfg, *, workdir: str | None = None):
    """data_cfg.tokenizer if set; else a SentencePiece model trained on the train split (cached in workdir)."""
    if data_cfg.tokenizer:
        return load_tokenizer(data_cfg.tokenizer)
    cached = os.path.join(workdir, "tokenizer") if workdir else None
    if cached and os.path.isdir(cached):
        return load_tokenizer(cached)
    mixture = open_mixture(data_cfg)
    texts = list(mixture.texts()) if mixture else corpus_texts(open_split(data_cfg, data_cfg.train_split))
    tok = SentencePieceTokenizer.train(texts, vocab_size=model_cfg.llm.vocab_size,
                                       special_ids=dict(model_cfg.special_tokens))
    log.info("trained a %d-piece SentencePiece tokenizer on %d texts", tok.vocab_size, len(texts))
    if cached:
        tok.save(cached)
    return tok


def _pack_iterator(cfg, tokenizer, task_sources, *, shard_index: int, shard_count: int, packs_per_step: int,
                   start_step: int = 0, num_workers: int | None = None):
    """The PackedBatch iterator of one data shard: source[shard_index::shard_count] of each task's records, or of
    each group's lines when `task_sources` is a Mixture."""
    data_cfg = cfg.data
    kind = MixturePackIterator if isinstance(task_sources, Mixture) else PackedBatchIterator
    return kind(
        task_sources, StageSchedule.from_config(cfg.curriculum), Planner.from_config(data_cfg, cfg.model, tokenizer),
        Packer.from_config(data_cfg, cfg.model), seed=int(data_cfg.seed), start_step=start_step,
        shard_index=shard_index, shard_count=shard_count,
        stream=StreamOptions.from_config(data_cfg, num_workers), packs_per_step=packs_per_step)


def _train_sources(data_cfg, split: str | None = None):
    """The Mixture of data.mixture (training data only: no other split), else the per-task sources of a split
    (the train split modality-balanced by data.balance_alpha, data_pipelines/balance.py)."""
    mixture = open_mixture(data_cfg)
    if mixture is None:
        split = split or data_cfg.train_split
        tasks = split_by_task(open_split(data_cfg, split))
        if split != data_cfg.train_split:
            return tasks
        return balance_tasks(tasks, data_cfg.get("balance_alpha", 0.0), seed=int(data_cfg.seed))
    if split not in (None, data_cfg.train_split):
        raise ValueError(f"data.mixture={data_cfg.mixture} is training data only: it has no split {split!r}")
    return mixture


def make_iterator(cfg, tokenizer, *, split: str | None = None, start_step: int = 0, shard_index: int | None = None,
                  shard_count: int | None = None, num_workers: int | None = None,
                  packs_per_step: int = 1) -> PackedBatchIterator | MixturePackIterator:
    """One PackedBatch iterator of cfg (model, data, curriculum); by default this JAX process's share. With
    data.mixture it streams the mixture's files (unimedvl_stream.MixturePackIterator)."""
    return _pack_iterator(cfg, tokenizer, _train_sources(cfg.data, split),
                          shard_index=jax.process_index() if shard_index is None else shard_index,
                          shard_count=jax.process_count() if shard_count is None else shard_count,
                          packs_per_step=packs_per_step, start_step=start_step, num_workers=num_workers)


def make_sharded_iterator(cfg, tokenizer, layout: DataShardLayout, *,
                          num_workers: int | None = None) -> ShardedPackIterator:
    """The iterators of this process's data shards (data_pipelines/data_shards.py): shard s reads
    source[s::layout.shards] and yields layout.rows_per_shard packs per train step (one packer per shard)."""
    task_sources = _train_sources(cfg.data)
    return ShardedPackIterator(
        {s: _pack_iterator(cfg, tokenizer, task_sources, shard_index=s, shard_count=layout.shards,
                           packs_per_step=layout.rows_per_shard, num_workers=num_workers)
         for s in layout.local_shards},
        layout.rows_per_shard)


def split_images(data_cfg, split: str, *, max_images: int = 0) -> list[np.ndarray]:
    """Distinct images of a split, each resized by the VAE transform (docs/preprocessing.md §6) to float32
    HxWx3 in [-1, 1]."""
    transform = ImageTransform.from_config(data_cfg.vae_transform)
    seen, images = set(), []
    for record in source_records(open_split(data_cfg, split), name=split):
        for key, blob in zip(record.meta.get("image_keys", [f"{record.id}/{j}" for j in range(len(record.images))]),
                             record.images):
            if key in seen:
                continue
            seen.add(key)
            images.append(transform(decode_image(blob, record_id=record.id)).astype(np.float32))
            if max_images and len(images) >= max_images:
                return images
    if not images:
        raise ValueError(f"split {split!r} of {data_cfg.dataset} in {data_cfg.data_dir} has no images")
    return images
