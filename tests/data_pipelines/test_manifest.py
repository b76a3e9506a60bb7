"""JSONL manifest importer: PNG / JPEG / DICOM / NIfTI inputs, slice and frame selection, bad lines counted."""

import io
import logging

import numpy as np
from PIL import Image

from data_pipelines import dicom
from data_pipelines.bad_records import BadRecordCounter
from data_pipelines.manifest import SPLIT_SALT, Manifest, read_manifest
from data_pipelines.splits import split_for_scan

GOOD_IDS = ("vqa-png", "vqa-dicom", "gen-nifti", "edit-nifti-jpeg", "cap-nosplit")
BAD_REASONS = {"invalid_json": 1, "missing_field": 3, "duplicate_id": 1, "empty_text": 1, "bad_reference": 2,
               "unreadable_image": 1}


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _records(manifest_path):
    counter = BadRecordCounter()
    return {r.id: r for r in read_manifest(manifest_path, counter=counter)}, counter


def test_good_lines_become_valid_records(manifest_path):
    records, _ = _records(manifest_path)
    assert tuple(records) == GOOD_IDS
    for record in records.values():
        record.validate()
        assert record.license and record.source and record.source_scan
    vqa = records["vqa-png"]
    assert (vqa.task, vqa.modality, vqa.body_region, vqa.split, vqa.source) == (
        "understanding", "CXR", "chest", "train", "test-set")
    assert [(s.kind, s.role) for s in vqa.segments] == [("image", "input"), ("text", "context"), ("text", "answer")]
    assert vqa.segments[2].text == "no"
    multi = records["vqa-dicom"]
    assert [s.role for s in multi.segments if s.kind == "text"] == ["context", "answer", "context", "answer"]
    edit = records["edit-nifti-jpeg"]
    assert [s.role for s in edit.segments if s.kind == "image"] == ["input", "target"]
    assert edit.meta == {"note": "kept"} and _decode(edit.images[1]).shape == (32, 48, 3)


def test_slice_and_frame_selection(manifest_path):
    records, _ = _records(manifest_path)
    img = manifest_path.parent / "img"
    gen = records["gen-nifti"]
    assert gen.task == "generation" and [s.role for s in gen.segments if s.kind == "image"] == ["target", "target"]
    expected = dicom.read_nifti(img / "vol.nii.gz", record_id="x", axis="coronal", slices=[3, 5])
    for png, (_, want) in zip(gen.images, expected):
        np.testing.assert_array_equal(_decode(png), want)
    middle = dicom.read_nifti(img / "vol.nii.gz", record_id="x", axis="axial", slices=[5])[0][1]
    np.testing.assert_array_equal(_decode(records["edit-nifti-jpeg"].images[0]), middle)
    frame = dicom.read_dicom(img / "cine.dcm", record_id="x", frames=[1])[0]
    np.testing.assert_array_equal(_decode(records["vqa-dicom"].images[0]), frame)


def test_default_split_hashes_the_source_scan(manifest_path):
    records, _ = _records(manifest_path)
    record = records["cap-nosplit"]
    assert record.source_scan == "img/gray.png"
    assert record.split == split_for_scan("img/gray.png", salt=SPLIT_SALT)
    assert record.source == manifest_path.name
    only_test = list(read_manifest(manifest_path, split="test"))
    assert [r.id for r in only_test] == ["gen-nifti"]


def test_bad_lines_are_counted_and_logged(manifest_path, caplog):
    with caplog.at_level(logging.WARNING):
        _, counter = _records(manifest_path)
    assert dict(counter.counts) == BAD_REASONS
    messages = " ".join(r.getMessage() for r in caplog.records)
    for record_id in ("no-license", "bad-task", "bad-role", "empty-answer", "missing-file", "slice-out-of-range",
                      "broken-image", "<line 8>"):
        assert record_id in messages
    assert "manifest.jsonl:11" in messages and "duplicates the id on line 1" in messages   # the repeated 'vqa-png'
    assert "manifest.jsonl:15" in messages                                              # slice 99 out of range


def test_split_pass_counts_each_bad_line_once(manifest_path):
    manifest, counter = Manifest(manifest_path), BadRecordCounter()
    expected = {"train": 5, "val": 1, "test": 1}                       # 2 good + 3 with bad images in train
    nosplit = split_for_scan("img/gray.png", salt=SPLIT_SALT)
    expected[nosplit] += 1
    assert manifest.split_counts(counter) == expected
    assert counter.total == 6                                          # structural errors, counted once
    ids = [r.id for split in ("train", "val", "test")
           for r in manifest.records(split, counter, count_structural=False)]
    assert sorted(ids) == sorted(GOOD_IDS)
    assert dict(counter.counts) == BAD_REASONS
