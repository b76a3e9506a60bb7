"""A dataset directory ready to read: build unimed-mini when it is missing, and describe a built directory."""

from __future__ import annotations

import pathlib

import jax

from data_pipelines import tfds_builder
from unimedvl_jax import distributed


def ensure_dataset(data_cfg, console=print) -> pathlib.Path:
    """Build unimed-mini into data_cfg.data_dir when it is missing (process 0; the others wait); return its path.

    Any other dataset must have been built beforehand (`unimedvl-build-data --dataset manifest ...`). With
    data.mixture the training data is streamed from the mixture's files: nothing to build, its path is returned."""
    if getattr(data_cfg, "mixture", ""):
        return pathlib.Path(data_cfg.mixture)
    path = tfds_builder.dataset_dir(data_cfg.data_dir, data_cfg.dataset)
    if not path.exists() and jax.process_index() == 0:
        if data_cfg.dataset != tfds_builder.UNIMED_MINI:
            raise FileNotFoundError(f"{path}: dataset {data_cfg.dataset!r} is not built; build it with "
                                    f"`unimedvl-build-data --dataset manifest --manifest FILE "
                                    f"--data-dir {data_cfg.data_dir}`")
        console(f"dataset {path} missing: building unimed-mini (as `unimedvl-build-data --dataset unimed-mini`)")
        builder, _ = tfds_builder.build(tfds_builder.UnimedMiniSource(), data_cfg.data_dir)
        console(summary(pathlib.Path(builder.data_dir)))
    distributed.barrier("dataset built")
    return path


def _counts(counter: dict) -> str:
    """'a=1 b=2' from a dict of counts."""
    return " ".join(f"{k}={v}" for k, v in counter.items()) or "-"


def summary(path: pathlib.Path) -> str:
    """Human-readable counts of a built dataset directory (from its metadata and shard files)."""
    meta = tfds_builder.read_metadata(path)
    lines = [f"dataset: {path}"]
    for split, s in meta.get("splits", {}).items():
        if s.get("empty"):
            lines.append(f"  {split:5s} empty: no valid record, not written")
            continue
        shards = sorted(path.glob(f"{tfds_builder.DATASET}-{split}.array_record-*"))
        lines.append(f"  {split:5s} records={s['records']} unique_images={s['unique_images']} "
                     f"shards={len(shards)} bytes={sum(f.stat().st_size for f in shards)}")
        lines.append(f"        task:     {_counts(s['task'])}")
        lines.append(f"        kind:     {_counts(s['kind'])}")
        lines.append(f"        modality: {_counts(s['modality'])}")
        lines.append(f"        images by modality: {_counts(s['unique_images_by_modality'])}")
    bad = meta.get("bad_records", {})
    lines.append(f"  bad records: {bad.get('total', 0)} {_counts(bad.get('by_reason', {}))}")
    for examples in bad.get("examples", {}).values():
        lines.extend(f"    {example}" for example in examples)
    total = sum(f.stat().st_size for f in path.glob(f"{tfds_builder.DATASET}-*.array_record-*"))
    lines.append(f"  total shard bytes: {total}; build seconds: {meta.get('build_seconds', '?')}")
    return "\n".join(lines)
