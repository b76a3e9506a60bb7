"""TFDS builder writing records (unimed-mini, a JSONL manifest or a UniMedVL mixture YAML) to ArrayRecord shards,
without TensorFlow.

Layout: DATA_DIR/unimed_records/<config>/<version>/unimed_records-<split>.array_record-0000i-of-0000n, where
<config> is 'unimed_mini' (or 'unimed_mini_side<N>' for another max side), 'manifest_<stem>_<sha256[:8] of the
manifest text>' or 'mixture_<stem>_<sha256[:8] of the YAML and dataset_info>' (every record in 'train', each with
its explicit item plan and its group's transforms: docs/unimedvl_format.md).
Each example holds the serialised schema.Record ('record', bytes) plus 'id', 'task' and 'modality' for filtering
without decoding. The dataset's metadata.json holds per-split counts (records, tasks, modalities,
kinds, images) and the bad-record counts by reason (with the reason, record id and manifest line of the first
1000 bad records).

Empty splits: a split without one valid record (every record of the manifest hashed into the other splits, or all
of its lines bad) is not written; the build logs a warning and records it in metadata.json ('empty_splits', and
'splits' with 0 records and "empty": true). A source without any valid record raises errors.UserError.

Shard size: `records_per_shard=N` (CLI --shard-records) writes ceil(records / N) shards per split; without it TFDS
picks the shard count from the byte size (one shard below 64 MiB). `max_examples_per_split` truncates each split
(quick trial builds, stored under the config name <config>_first<N>). A prepared dataset is reused: building
again is a no-op unless force=True.

Reading: `data_source(dataset_dir, split)` (or `tfds.data_source('unimed_records/<config>', data_dir=DATA_DIR,
split=...)`, or `tfds.builder_from_directory(dataset_dir).as_data_source(split)`) gives a random-access source of
dicts; `grain_dataset(dataset_dir, split)` wraps it in `grain.MapDataset.source(...).map(decode_example)` -> Record.
The builder class is not registered in the TFDS catalog, so tfds.data_source always reads the files on disk.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import logging
import math
import pathlib
import time
from collections.abc import Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import shard_utils

from data_pipelines.bad_records import BadRecordCounter
from data_pipelines.manifest import Manifest
from data_pipelines.mixture import Mixture, mixture_records
from data_pipelines.schema import SPLITS, Record
from data_pipelines.sources import unimed_mini
from data_pipelines.splits import split_for_scan
from unimedvl_jax.errors import UserError

log = logging.getLogger(__name__)

DATASET = "unimed_records"
DATASET_VERSION = "1.2.0"
PROGRESS_EVERY = 1000
KEEP_BAD_RECORDS = 1000  # bad records listed (reason, id, line) in metadata.json; all are counted
UNIMED_MINI = "unimed_mini"  # config name of the embedded dataset at its default image size


# --------------------------------------------------------------------------------------------- sources


class UnimedMiniSource:
    """The embedded unimed-mini dataset as a record source."""

    def __init__(self, max_side: int = unimed_mini.MAX_SIDE):
        self.max_side = max_side
        self.name = UNIMED_MINI if max_side == unimed_mini.MAX_SIDE else f"unimed_mini_side{max_side}"
        self.description = unimed_mini.__doc__.splitlines()[0]

    def splits(self, counter: BadRecordCounter) -> list[str]:
        """Splits holding at least one scan."""
        present = {split_for_scan(s.key, salt=unimed_mini.SALT, fractions=unimed_mini.SPLIT_FRACTIONS)
                   for s in unimed_mini.scans()}
        return [s for s in SPLITS if s in present]

    def records(self, split: str, counter: BadRecordCounter) -> Iterator[Record]:
        """Records of one split."""
        return unimed_mini.generate(split=split, max_side=self.max_side)


class ManifestSource:
    """A JSONL manifest as a record source; the config name carries a hash of the manifest text."""

    def __init__(self, path):
        self.manifest = Manifest(path)
        digest = hashlib.sha256(self.manifest.path.read_bytes()).hexdigest()[:8]
        stem = "".join(c if c.isalnum() else "_" for c in self.manifest.path.name.split(".")[0]).lower()
        self.name = f"manifest_{stem}_{digest}"
        self.description = f"records imported from {self.manifest.path}"

    def splits(self, counter: BadRecordCounter) -> list[str]:
        """Splits with at least one structurally valid line (structural errors are counted here, once)."""
        counts = self.manifest.split_counts(counter)
        return [s for s in SPLITS if counts.get(s)]

    def records(self, split: str, counter: BadRecordCounter) -> Iterator[Record]:
        """Valid records of one split; image-level errors are counted."""
        return self.manifest.records(split, counter, count_structural=False)


class MixtureSource:
    """A UniMedVL mixture YAML as a record source: every selected line / row of every group, all in 'train'."""

    def __init__(self, path, dataset_info=None):
        self.mixture = Mixture.load(path, dataset_info)
        stem = "".join(c if c.isalnum() else "_" for c in pathlib.Path(path).name.split(".")[0]).lower()
        self.name = f"mixture_{stem}_{self.mixture.digest[:8]}"
        self.description = f"UniMedVL-format records of the mixture {self.mixture.path}"

    def splits(self, counter: BadRecordCounter) -> list[str]:
        """Only 'train': the official formats hold training data."""
        return ["train"]

    def records(self, split: str, counter: BadRecordCounter) -> Iterator[Record]:
        """Valid records of every group; bad lines, rows and dropped images are counted."""
        return mixture_records(self.mixture, counter)


# --------------------------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class SplitStats:
    """Counts of one split, filled while its records are written."""

    records: int = 0
    images_stored: int = 0
    task: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    modality: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unique_images: set = dataclasses.field(default_factory=set)
    unique_images_by_modality: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, record: Record) -> None:
        """Count one record (unique images from meta['image_keys'] when present; '@' marks derived images)."""
        self.records += 1
        self.images_stored += len(record.images)
        self.task[record.task] += 1
        self.modality[record.modality] += 1
        self.kind[str(record.meta.get("kind", record.task)).split("-")[0]] += 1
        keys = record.meta.get("image_keys") or [f"{record.id}#{i}" for i in range(len(record.images))]
        for key in keys:
            if "@" not in key and key not in self.unique_images:
                self.unique_images.add(key)
                self.unique_images_by_modality[record.modality] += 1

    def as_dict(self) -> dict:
        """JSON-friendly counts."""
        return {"records": self.records, "images_stored": self.images_stored, "unique_images": len(self.unique_images),
                "unique_images_by_modality": dict(sorted(self.unique_images_by_modality.items())),
                "task": dict(sorted(self.task.items())), "modality": dict(sorted(self.modality.items())),
                "kind": dict(sorted(self.kind.items()))}


# --------------------------------------------------------------------------------------------- builder


@dataclasses.dataclass(frozen=True)
class RecordsPerShard(shard_utils.ShardConfig):
    """Shard config with a fixed number of records per shard (per split)."""

    records_per_shard: int = 1000

    def get_number_shards(self, total_size: int, num_examples: int, uses_precise_sharding: bool = True) -> int:
        """ceil(num_examples / records_per_shard), at least 1."""
        return max(1, math.ceil(num_examples / self.records_per_shard))


@dataclasses.dataclass
class ShardedDownloadConfig(tfds.download.DownloadConfig):
    """DownloadConfig with an optional records-per-shard setting."""

    records_per_shard: int | None = None

    def get_shard_config(self) -> shard_utils.ShardConfig:
        """RecordsPerShard when records_per_shard is set, else TFDS's size-based default."""
        if self.records_per_shard:
            return RecordsPerShard(records_per_shard=self.records_per_shard)
        return super().get_shard_config()


class UnimedRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Serialised records of one source (unimed-mini or a manifest), split train/val/test, in ArrayRecord files."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {"1.0.0": "Record schema v1: JSON header + PNG blobs.",
                     "1.1.0": "unimed-mini: MNI tissue maps answer modality questions with 'MRI' and get their own "
                              "'which derived map' question.",
                     "1.2.0": "Records may carry an explicit item plan (UniMedVL formats, docs/unimedvl_format.md); "
                              "unimed-mini: more registry sources, splits stratified by modality."}

    def __init__(self, *, source, data_dir, config_name: str | None = None, **kwargs):
        self.source = source
        self.bad_records = BadRecordCounter(keep_records=KEEP_BAD_RECORDS)
        self.split_stats: dict[str, SplitStats] = {}
        self.empty_splits: list[str] = []
        config = tfds.core.BuilderConfig(name=config_name or source.name, description=source.description)
        super().__init__(data_dir=data_dir, config=config, file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.builder_config.description}. Each example is a serialised "
                        "data_pipelines.schema.Record (use tfds_builder.decode_example).",
            features=tfds.features.FeaturesDict({
                "record": tfds.features.Scalar(dtype=np.object_, doc="schema.Record.to_bytes()"),
                "id": tfds.features.Text(),
                "task": tfds.features.Text(),
                "modality": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        """One generator per split holding a valid record. Each split's records are read up to its first valid
        one here (TFDS fails on a split that yields nothing); a split without any is left out and recorded."""
        self.info.metadata["build_started"] = time.time()
        generators = {}
        for split in self.source.splits(self.bad_records):
            records = iter(self.source.records(split, self.bad_records))
            first = next(records, None)
            if first is not None:
                generators[split] = self._generate_examples(split, itertools.chain([first], records))
        self.empty_splits = [split for split in SPLITS if split not in generators]
        if not generators:
            bad = self.bad_records.as_dict()
            raise UserError(f"{self.source.name}: no valid record in any split, nothing to write; "
                            f"{bad['total']} bad records by reason: {bad['by_reason']} (the warnings above name "
                            f"each one with its line)")
        for split in self.empty_splits:
            log.warning("%s: split %r has no valid record: not written (the other splits are)", self.source.name,
                        split)
        return generators

    def _generate_examples(self, split: str, records):
        stats = self.split_stats.setdefault(split, SplitStats())
        for record in records:
            stats.add(record)
            if stats.records % PROGRESS_EVERY == 0:
                print(f"  {self.source.name} {split}: {stats.records} records", flush=True)
            yield record.id, {"record": record.to_bytes(), "id": record.id, "task": record.task,
                              "modality": record.modality}
        empty = {name: {**SplitStats().as_dict(), "empty": True} for name in self.empty_splits}
        self.info.metadata.update({
            "source": self.source.name,
            "splits": {name: s.as_dict() for name, s in self.split_stats.items()} | empty,
            "empty_splits": list(self.empty_splits),
            "bad_records": self.bad_records.as_dict(),
            "build_seconds": round(time.time() - self.info.metadata["build_started"], 1),
        })


def build(source, data_dir, *, records_per_shard: int | None = None, max_examples_per_split: int | None = None,
          force: bool = False) -> tuple[UnimedRecords, bool]:
    """Build (or reuse) the ArrayRecord dataset of a source; returns (builder, whether it was generated now).

    A truncated build (max_examples_per_split) gets its own config name '<name>_first<N>', so it never shadows the
    full dataset in the cache. The dataset directory is `builder.data_dir`."""
    name = source.name + (f"_first{max_examples_per_split}" if max_examples_per_split else "")
    builder = UnimedRecords(source=source, data_dir=str(data_dir), config_name=name)
    if builder.is_prepared() and not force:
        return builder, False
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if force else \
        tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    config = ShardedDownloadConfig(records_per_shard=records_per_shard, max_examples_per_split=max_examples_per_split,
                                   download_mode=mode, try_download_gcs=False)
    try:
        builder.download_and_prepare(download_config=config)   # file_format is set on the builder (passing it
        # here again fails on a forced rebuild: TFDS refuses to override the format of an existing DatasetInfo)
    except AssertionError as e:  # TFDS asserts when a split yields no examples (e.g. all its lines are bad)
        raise RuntimeError(f"building {source.name} failed ({e}); bad records: {builder.bad_records.as_dict()}") from e
    return builder, True


# --------------------------------------------------------------------------------------------- reading


def dataset_dir(data_dir, name: str) -> pathlib.Path:
    """Directory of a built dataset: DATA_DIR/unimed_records/<name>/<version>."""
    return pathlib.Path(data_dir) / DATASET / name / DATASET_VERSION


def data_source(path, split: str):
    """Random-access source (ArrayRecordDataSource) of one split of a built dataset directory; a split the dataset
    lacks (e.g. one left empty at build time) is a UserError naming the directory and the splits it has."""
    builder = tfds.builder_from_directory(str(path))
    if split.isidentifier() and split not in builder.info.splits:  # a plain name (not a TFDS slice expression)
        empty = (builder.info.metadata or {}).get("empty_splits", [])
        why = " (it had no valid record when the dataset was built)" if split in empty else ""
        raise UserError(f"{path}: no split {split!r}{why}; the dataset has {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def decode_example(example: dict) -> Record:
    """TFDS example dict -> schema.Record (raises schema.BadRecord on corrupt bytes)."""
    record_id = example["id"].decode() if isinstance(example["id"], bytes) else str(example["id"])
    return Record.from_bytes(example["record"], record_id=record_id)


def grain_dataset(path, split: str):
    """grain.MapDataset of decoded Records for one split of a built dataset directory."""
    return grain.MapDataset.source(data_source(path, split)).map(decode_example)


def read_metadata(path) -> dict:
    """The build metadata (per-split counts, bad records) stored with a built dataset."""
    return dict(tfds.builder_from_directory(str(path)).info.metadata or {})
