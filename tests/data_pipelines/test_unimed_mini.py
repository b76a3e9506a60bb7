"""unimed-mini: real installed scans -> >= 6 modalities, >= 1000 images, all task families, split by source scan
(stratified by modality), one source per distinct image, license and provenance on every record."""

import collections

import pytest

from data_pipelines.schema import SPLITS, TASKS
from data_pipelines.sources import medical_text, unimed_mini
from data_pipelines.sources.stratified_splits import split_counts, stratified_splits

# Distinct source scans per modality and split (train, val, test): the catalog as the project's dependencies install it.
SOURCES_PER_SPLIT = {"CT": (3, 1, 2), "MRI": (6, 2, 2), "US": (4, 1, 2), "MIC": (2, 0, 1), "HIS": (2, 0, 0),
                     "CFP": (2, 0, 0), "CXR": (1, 0, 0), "XR": (1, 0, 0), "NM": (1, 0, 0)}


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
    big = {r.split for r in records if r.source_scan in ("nilearn/MNI152-ICBM2009a-sym",
                                                          "pydicom-data/color3d_jpeg_baseline")}
    assert big == {"train"}
    assert {r.split for r in records if r.source_scan == "nibabel/anatomical"} == {"test"}   # 3-plane held-out volume


def test_sources_per_modality_and_split(records):
    sources = collections.defaultdict(set)
    for r in records:
        sources[(r.modality, r.split)].add(r.source_scan)
    got = {m: tuple(len(sources[(m, s)]) for s in SPLITS) for m in {m for m, _ in sources}}
    assert SPLITS == ("train", "val", "test")
    assert got == SOURCES_PER_SPLIT
    for modality, (train, val, test) in got.items():   # the stratification guarantee
        if train + val + test >= 5:
            assert test >= 2 and val >= 1 and train >= 2, modality


def test_each_distinct_image_is_one_source(records):
    """Re-encodings of one image (other transfer syntaxes, same UIDs / pixels) must not enter as separate sources."""
    scans_of_image = collections.defaultdict(set)
    for r in records:
        if r.meta["kind"] == "vqa":
            scans_of_image[r.images[0]].add(r.source_scan)
    shared = {tuple(sorted(s)) for s in scans_of_image.values() if len(s) > 1}
    assert not shared, shared
    keys = [scan.key for scan in unimed_mini.scans()]
    assert len(keys) == len(set(keys)) == 33


def test_stratified_split_rule():
    assert [split_counts(n, (0.7, 0.15, 0.15)) for n in range(7)] == [
        (0, 0, 0), (1, 0, 0), (2, 0, 0), (2, 0, 1), (2, 1, 1), (2, 1, 2), (3, 1, 2)]
    assert split_counts(20, (0.7, 0.15, 0.15)) == (14, 3, 3)
    groups = {f"ct-{i}": "CT" for i in range(6)} | {f"us-{i}": "US" for i in range(3)} | {"nm": "NM"}
    splits = stratified_splits(groups, salt="s", fractions=(0.7, 0.15, 0.15))
    assert splits == stratified_splits(dict(reversed(groups.items())), salt="s", fractions=(0.7, 0.15, 0.15))
    per = collections.Counter((groups[k], v) for k, v in splits.items())
    assert (per["CT", "test"], per["CT", "val"], per["US", "test"], per["NM", "train"]) == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="fewer than 2"):
        split_counts(6, (0.1, 0.45, 0.45))
    with pytest.raises(ValueError, match="non-empty"):
        stratified_splits({"": "CT"}, salt="s", fractions=(0.7, 0.15, 0.15))


def test_provenance_and_license(records):
    for r in records:
        assert r.license and r.source and r.source_scan and r.modality, r.id
        assert any(p in r.source for p in ("pydicom", "scikit-image", "nilearn", "nibabel", "mahotas",
                                           "stardist", "matplotlib")), r.source
    expected = {"pydicom/": "MIT", "pydicom-data/": "MIT", "scikit-image/retina": "CC0",
                "scikit-image/microaneurysms": "CC0", "scikit-image/cell": "CC0",
                "scikit-image/ihc": "no known copyright restrictions", "nilearn/": "License: unknown",
                "nibabel/": "MIT", "mahotas/": "MIT", "stardist/histo": "Cancer Imaging Archive",
                "stardist/img2d": "2018 kaggle DSB", "matplotlib/": "Matplotlib License"}
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
    for scan_key, fact, expected in (("pydicom/J2K_pixelrep_mismatch", "plane", "axial"),   # from its IOP tag
                                     ("pydicom-data/bad_sequence", "region", "neck"),
                                     ("pydicom-data/JPGLosslessP14SV1_1s_1f_8b", "exam", "echocardiography"),
                                     ("stardist/histo", "color", "colour"),
                                     ("mahotas/nuclear", "modality_name", "fluorescence microscopy")):
        texts = [s.text for s in by_id[f"unimed-mini/{scan_key}/image/vqa"].segments if s.kind == "text"]
        asked = [q for q in medical_text.QUESTIONS[fact] if q in texts]   # single images are asked every fact once
        assert len(asked) == 1, (scan_key, texts)
        assert texts[texts.index(asked[0]) + 1] == expected, (scan_key, texts)
    mip = by_id["unimed-mini/nibabel/slicethickness_empty_string/image/vqa"]   # a projection: no slice-plane fact
    assert not any("plane" in s.text or "axial" in s.text for s in mip.segments if s.kind == "text")
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
