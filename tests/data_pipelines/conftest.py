"""Fixtures for data pipeline tests: DICOM / NIfTI / PNG writers and a small JSONL manifest with bad lines."""

import json
import pathlib
import types

import numpy as np
import pytest


def write_dicom(path: pathlib.Path, pixels: np.ndarray, **tags) -> pathlib.Path:
    """Write a minimal uncompressed grayscale DICOM (one frame (H, W) or several (F, H, W)) with extra tags."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.int16 if ds.PixelRepresentation else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: pathlib.Path, data: np.ndarray, affine=None) -> pathlib.Path:
    """Write a NIfTI-1 volume (RAS identity affine by default)."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def write_png(path: pathlib.Path, array: np.ndarray) -> pathlib.Path:
    """Write an 8-bit PNG (or JPEG, by suffix) with PIL."""
    from PIL import Image

    Image.fromarray(np.asarray(array)).save(path)
    return path


@pytest.fixture
def writers():
    """The file writers as a namespace: writers.dicom / writers.nifti / writers.png."""
    return types.SimpleNamespace(dicom=write_dicom, nifti=write_nifti, png=write_png)




@pytest.fixture
def manifest_path(tmp_path) -> pathlib.Path:
    """A JSONL manifest (PNG, JPEG, multi-frame DICOM, NIfTI) in tmp_path with 5 good and 9 bad lines."""
    rng = np.random.default_rng(0)
    img = tmp_path / "img"
    img.mkdir()
    write_png(img / "gray.png", rng.integers(0, 256, (40, 56), dtype=np.uint8))
    write_png(img / "color.jpg", rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    write_dicom(img / "cine.dcm", rng.integers(0, 2000, (3, 24, 20)).astype(np.int16), RescaleIntercept=-1024,
                RescaleSlope=1, WindowCenter=40, WindowWidth=400)
    write_nifti(img / "vol.nii.gz", rng.random((12, 14, 10)).astype(np.float32))
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    base = {"modality": "MRI", "license": "CC0-1.0", "source": "test-set", "split": "train"}
    lines = [
        {**base, "id": "vqa-png", "task": "understanding", "modality": "CXR", "body_region": "chest",
         "segments": [{"image": "img/gray.png"}, {"question": "Is there a fracture?"}, {"answer": "no"}]},
        {**base, "id": "vqa-dicom", "task": "understanding", "modality": "CT", "split": "val",
         "segments": [{"image": "img/cine.dcm", "frame": 1}, {"text": "Which modality?"}, {"answer": "CT"},
                      {"text": "Which frame?", "role": "context"}, {"text": "the second", "role": "answer"}]},
        {**base, "id": "gen-nifti", "task": "generation", "split": "test",
         "segments": [{"text": "Two coronal slices."}, {"image": "img/vol.nii.gz", "slices": [3, 5],
                                                        "axis": "coronal"}]},
        {**base, "id": "edit-nifti-jpeg", "task": "interleaved", "meta": {"note": "kept"},
         "segments": [{"image": "img/vol.nii.gz"}, {"text": "Make it colourful."},
                      {"image": "img/color.jpg", "role": "target"}]},
        {"id": "cap-nosplit", "task": "understanding", "modality": "US", "license": "CC-BY-4.0",
         "segments": [{"image": "img/gray.png"}, {"text": "Describe."}, {"answer": "a gray image"}]},
        "",
        "# a comment line",
        "{this is not json",
        {**base, "id": "no-license", "task": "understanding", "license": "",
         "segments": [{"image": "img/gray.png"}, {"answer": "x"}]},
        {**base, "id": "bad-task", "task": "segmentation", "segments": [{"image": "img/gray.png"}]},
        {**base, "id": "vqa-png", "task": "understanding", "segments": [{"image": "img/gray.png"}, {"answer": "y"}]},
        {**base, "id": "bad-role", "task": "understanding", "segments": [{"image": "img/gray.png", "role": "mask"}]},
        {**base, "id": "empty-answer", "task": "understanding",
         "segments": [{"image": "img/gray.png"}, {"question": "Why?"}, {"answer": "   "}]},
        {**base, "id": "missing-file", "task": "understanding", "segments": [{"image": "img/nope.png"},
                                                                             {"answer": "x"}]},
        {**base, "id": "slice-out-of-range", "task": "generation",
         "segments": [{"text": "slice"}, {"image": "img/vol.nii.gz", "slice": 99}]},
        {**base, "id": "broken-image", "task": "understanding", "segments": [{"image": "img/broken.png"},
                                                                             {"answer": "x"}]},
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path
