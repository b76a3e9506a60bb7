"""unimed-mini: real installed scans -> >= 6 modalities, >= 1000 images, all task families, split by source scan."""

import collections

import pytest

from data_pipelines.schema import SPLITS, TASKS
from data_pipelines.sources import unimed_mini


@pytest.fixture(scope="module")
def records():
    """All unimed-mini records, generated once for the module (about 15 s on 2 CPU cores)."""
    return list(unimed_mini.generate())


def _unique_images(records):
    """Source images (slices / frames / 2-D images); '@' keys are derived inputs (degraded, re-windowed)."""
    return {key: r.modality for r in records for key in r.meta["image_keys"] if "@" not in key}


def test_size_modalities_and_tasks(records):
    images = _unique_images(records)
    modalities = collections.Counter(images.values())
    assert len(images) >= 1000
    assert len(modalities) >= 6, modalities
    assert {"CT", "MRI", "CXR", "US", "NM", "CFP", "HIS"} <= set(modalities)
    assert {r.task for r in records} == set(TASKS)
    kinds = {r.meta["kind"].split("-")[0] for r in records}
    assert kinds == {"vqa", "caption", "t2i", "sr2", "sr4", "denoise", "window", "translate"}
    assert len({r.id for r in records}) == len(records)


def test_split_by_source_scan_never_by_slice(records):
    splits_of_scan = collections.defaultdict(set)
    for r in records:
        splits_of_scan[r.source_scan].add(r.split)
    assert all(len(s) == 1 for s in splits_of_scan.values()), splits_of_scan
    assert {r.split for r in records} == set(SPLITS)
    mni = [r for r in records if r.source_scan.startswith("nilearn/")]
    assert len({key.split("/")[-1].split("-")[0] for r in mni for key in r.meta["image_keys"]}) == 3  # t1, gm, wm
    assert len({r.split for r in mni}) == 1


def test_provenance_and_license(records):
    for r in records:
        assert r.license and r.source and r.source_scan and r.modality, r.id
        assert any(p in r.source for p in ("pydicom", "scikit-image", "nilearn", "nibabel")), r.source
    expected = {"pydicom/": "MIT", "pydicom-data/": "MIT", "scikit-image/retina": "CC0",
                "scikit-image/microaneurysms": "CC0", "scikit-image/cell": "CC0",
                "scikit-image/ihc": "no known copyright restrictions", "nilearn/": "License: unknown",
                "nibabel/": "MIT"}
    for r in records:
        (prefix,) = [p for p in expected if r.source_scan.startswith(p)]
        assert expected[prefix] in r.license, (r.id, r.license)


def test_records_validate_and_answers_come_from_tags(records):
    for r in records[::7]:
        r.validate()
    by_id = {r.id: r for r in records}
    chest = by_id["unimed-mini/pydicom-data/RG1_UNCR/image/vqa"]
    qa = dict(zip([s.text for s in chest.segments if s.role == "context"],
                  [s.text for s in chest.segments if s.role == "answer"]))
    assert qa["Which body region is shown in this image?"] == "chest"
    assert qa["Was this radiograph taken in AP or PA projection?"] == "PA (posteroanterior)"
    assert qa["What is the DICOM photometric interpretation of this image?"] == "MONOCHROME1"
    axial = [r for r in records if "/t1-axial-" in r.id and r.meta["kind"] == "vqa"]
    for r in axial:
        texts = [s.text for s in r.segments if s.kind == "text"]
        if "Is this an axial, coronal or sagittal image?" in texts:
            assert texts[texts.index("Is this an axial, coronal or sagittal image?") + 1] == "axial"


def test_interleaved_records_pair_input_and_target(records):
    for r in records:
        if r.task == "interleaved":
            assert [s.role for s in r.segments if s.kind == "image"] == ["input", "target"]
            assert r.images[0] != r.images[1]
        if r.task == "generation":
            assert [s.role for s in r.segments] == ["context", "target"]


def test_deterministic_and_split_filtering_consistent(records):
    for split in ("val", "test"):
        again = list(unimed_mini.generate(split=split))
        mine = [r for r in records if r.split == split]
        assert [r.id for r in again] == [r.id for r in mine]
        assert [r.to_bytes() for r in again] == [r.to_bytes() for r in mine]
