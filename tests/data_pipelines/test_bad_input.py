"""Bad input never stops a dataset build: undecodable (non-UTF-8) lines, invalid JSON, repeated ids (the first
kept), missing / unreadable / oversize images are counted by reason with their record id and manifest line; a
split left without a valid record is skipped with a warning and recorded while the others are written; a manifest
without any valid record, or no manifest at all, is one `error:` line with exit status 2."""

import json
import logging

import numpy as np
import pytest

from data_pipelines import build as build_cli
from data_pipelines import tfds_builder
from data_pipelines.bad_records import BadRecordCounter
from data_pipelines.manifest import SPLIT_SALT, Manifest
from data_pipelines.schema import MAX_IMAGE_SIDE
from data_pipelines.splits import split_for_scan
from unimedvl_jax import entry_point
from unimedvl_jax.errors import UserError

BASE = {"task": "understanding", "modality": "CT", "license": "CC0-1.0"}


def _line(record_id: str, image: str, split: str | None = "train", answer: str = "yes") -> bytes:
    record = {**BASE, "id": record_id, "segments": [{"image": image}, {"question": "CT?"}, {"answer": answer}]}
    if split:
        record["split"] = split
    return json.dumps(record).encode()


@pytest.fixture
def bad_manifest(tmp_path, writers):
    """Lines (1-based): 1 good (train), 2 good (test), 3 not UTF-8, 4 invalid JSON, 5 repeats line 1's id,
    6 missing image, 7 unreadable image, 8 oversize image, 9 blank, 10 good (train)."""
    rng = np.random.default_rng(0)
    img = tmp_path / "img"
    img.mkdir()
    writers.png(img / "ok.png", rng.integers(0, 256, (16, 20), dtype=np.uint8))
    writers.png(img / "wide.png", np.zeros((1, MAX_IMAGE_SIDE + 1), np.uint8))
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    lines = [
        _line("good-1", "img/ok.png"),
        _line("good-2", "img/ok.png", split="test"),
        _line("latin-1", "img/ok.png", answer="caf\u00e9").replace("caf\\u00e9".encode(), b"caf\xe9"),
        b'{"id": "half", "task": ',
        _line("good-1", "img/ok.png", answer="again"),
        _line("no-file", "img/missing.png"),
        _line("broken", "img/broken.png"),
        _line("too-wide", "img/wide.png"),
        b"",
        _line("good-3", "img/ok.png"),
    ]
    assert b"\xe9" in lines[2]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


EXPECTED = [("undecodable_line", "latin-1", 3), ("invalid_json", "<line 4>", 4), ("duplicate_id", "good-1", 5),
            ("bad_reference", "no-file", 6), ("unreadable_image", "broken", 7), ("oversize_image", "too-wide", 8)]


def test_every_bad_kind_is_counted_with_id_and_line(bad_manifest, caplog):
    counter = BadRecordCounter(keep_records=100)
    with caplog.at_level(logging.WARNING):
        records = list(Manifest(bad_manifest).records(counter=counter))
    assert [r.id for r in records] == ["good-1", "good-2", "good-3"]
    assert records[0].segments[-1].text == "yes"                       # the first line of a repeated id is kept
    assert dict(counter.counts) == {reason: 1 for reason, _, _ in EXPECTED}
    assert sorted((r["reason"], r["id"], r["line"]) for r in counter.records) == sorted(EXPECTED)
    log = [r.getMessage() for r in caplog.records]
    for reason, record_id, line in EXPECTED:
        assert any(f"'{record_id}' ({reason})" in m and f"bad.jsonl:{line}:" in m for m in log), (reason, log)


def test_a_build_with_every_bad_kind_stores_the_counts(bad_manifest, tmp_path, capsys, caplog):
    argv = ["--dataset", "manifest", "--manifest", str(bad_manifest), "--data-dir", str(tmp_path / "data")]
    with caplog.at_level(logging.WARNING):
        assert build_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "bad records: 6" in out and "undecodable_line=1" in out and "duplicate_id=1" in out
    assert "val   empty: no valid record, not written" in out
    source = tfds_builder.ManifestSource(bad_manifest)
    path = tfds_builder.dataset_dir(tmp_path / "data", source.name)
    meta = tfds_builder.read_metadata(path)
    bad = meta["bad_records"]
    assert bad["total"] == 6 and bad["by_reason"] == {reason: 1 for reason, _, _ in EXPECTED}
    assert sorted((r["reason"], r["id"], r["line"]) for r in bad["records"]) == sorted(EXPECTED)
    assert bad["records_not_listed"] == 0
    assert {s: m["records"] for s, m in meta["splits"].items()} == {"train": 2, "test": 1, "val": 0}
    assert meta["empty_splits"] == ["val"] and meta["splits"]["val"]["empty"]
    assert sorted(r.id for r in tfds_builder.grain_dataset(path, "train")) == ["good-1", "good-3"]
    assert any("split 'val' has no valid record" in r.getMessage() for r in caplog.records)


def test_a_split_whose_lines_are_all_bad_is_skipped_and_the_others_written(tmp_path, writers, caplog):
    """Every good record hashes into one split; the only line of another split has a missing image (before, TFDS
    stopped the build with "No examples were yielded")."""
    writers.png(tmp_path / "ok.png", np.full((8, 8), 7, np.uint8))
    scans = {}
    for i in range(200):
        scans.setdefault(split_for_scan(f"scan-{i}", salt=SPLIT_SALT), []).append(f"scan-{i}")
    lines = []
    for i, scan in enumerate(scans["train"][:3]):
        record = json.loads(_line(f"good-{i}", "ok.png", split=None))
        lines.append(json.dumps({**record, "source_scan": scan}))
    record = json.loads(_line("lost", "gone.png", split=None))
    lines.append(json.dumps({**record, "source_scan": scans["test"][0]}))
    manifest = tmp_path / "one_split.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        builder, generated = tfds_builder.build(tfds_builder.ManifestSource(manifest), tmp_path / "data")
    assert generated and set(builder.info.splits) == {"train"}
    assert builder.info.splits["train"].num_examples == 3
    meta = tfds_builder.read_metadata(builder.data_dir)
    assert meta["empty_splits"] == ["val", "test"]
    assert meta["bad_records"]["records"] == [{"reason": "bad_reference", "id": "lost", "line": 4}]
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "split 'test' has no valid record" in warnings and "split 'val' has no valid record" in warnings
    with pytest.raises(UserError, match=r"no split 'test' \(it had no valid record when the dataset was built\); "
                                        r"the dataset has \['train'\]"):
        tfds_builder.data_source(builder.data_dir, "test")


def test_no_valid_record_at_all_is_one_error_line(tmp_path, capsys):
    manifest = tmp_path / "all_bad.jsonl"
    manifest.write_bytes(b"not json\n\xff\xfe\n" + _line("x", "missing.png") + b"\n")
    with pytest.raises(UserError, match=r"no valid record in any split.*'bad_reference': 1"):
        tfds_builder.build(tfds_builder.ManifestSource(manifest), tmp_path / "data")
    argv = ["--dataset", "manifest", "--manifest", str(manifest), "--data-dir", str(tmp_path / "d2")]
    with pytest.raises(SystemExit) as e:
        build_cli.main(argv)
    assert e.value.code == entry_point.USAGE_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unimedvl-build-data: error: manifest_all_bad_"), err
    assert "3 bad records" in err[0]
