"""TFDS builder: manifest -> ArrayRecord shards without TensorFlow, read back via tfds data sources and grain."""

import math
import sys

import grain
import tensorflow_datasets as tfds

from data_pipelines import build as build_cli
from data_pipelines import tfds_builder
from data_pipelines.bad_records import BadRecordCounter
from data_pipelines.manifest import read_manifest


def test_manifest_build_round_trip(manifest_path, tmp_path):
    data_dir = tmp_path / "tfds"
    source = tfds_builder.ManifestSource(manifest_path)
    builder, generated = tfds_builder.build(source, data_dir, records_per_shard=1)
    assert generated
    expected = {r.id: r for r in read_manifest(manifest_path, counter=BadRecordCounter())}
    path = tfds_builder.dataset_dir(data_dir, source.name)
    seen = {}
    for split, info in builder.info.splits.items():
        assert info.num_shards == max(1, math.ceil(info.num_examples / 1))
        ds = tfds.data_source(f"{tfds_builder.DATASET}/{source.name}", data_dir=str(data_dir), split=split)
        assert len(ds) == info.num_examples
        for record in grain.MapDataset.source(ds).map(tfds_builder.decode_example):
            assert record.split == split
            seen[record.id] = record
        assert {r.id for r in tfds_builder.grain_dataset(path, split)} <= set(expected)
    assert seen.keys() == expected.keys()
    for record_id, record in seen.items():
        assert record.to_bytes() == expected[record_id].to_bytes()
    meta = tfds_builder.read_metadata(path)
    assert meta["bad_records"]["total"] == 9
    assert sum(s["records"] for s in meta["splits"].values()) == len(expected)
    assert "tensorflow" not in sys.modules


def test_second_build_is_cached(manifest_path, tmp_path, capsys):
    argv = ["--dataset", "manifest", "--manifest", str(manifest_path), "--data-dir", str(tmp_path / "d"),
            "--shard-records", "2"]
    assert build_cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "built in" in first and "bad records: 9" in first and "missing_field=3" in first
    assert "duplicate_id=1" in first
    assert build_cli.main(argv) == 0
    assert "already built (cached" in capsys.readouterr().out
    assert build_cli.main(argv + ["--force"]) == 0
    assert "built in" in capsys.readouterr().out


def test_unimed_mini_trial_build(tmp_path):
    source = tfds_builder.UnimedMiniSource()
    builder, _ = tfds_builder.build(source, tmp_path, max_examples_per_split=4)
    assert set(builder.info.splits) == {"train", "val", "test"}
    path = tfds_builder.dataset_dir(tmp_path, f"{source.name}_first4")
    assert str(path) == builder.data_dir
    records = list(tfds_builder.grain_dataset(path, "val"))
    assert len(records) == 4 and all(r.license and r.source_scan for r in records)
    for record in records:
        record.validate()
