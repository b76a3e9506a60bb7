"""Medical image readers: DICOM windowing / rescale / MONOCHROME1 / frames, NIfTI slicing and orientation, rasters."""

import numpy as np
import pytest

from data_pipelines import dicom
from data_pipelines.schema import BadRecord


def test_dicom_rescale_then_first_window(tmp_path, writers):
    stored = np.array([[0, 1004, 1064, 1124], [1100, 2000, 500, 1064]], np.int16)   # HU = stored - 1024
    path = writers.dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024,
                         WindowCenter=[40, 400], WindowWidth=[200, 2000])
    (out,) = dicom.read_dicom(path, record_id="ct")
    assert out.dtype == np.uint8 and out.shape == (2, 4)
    hu = stored.astype(np.float32) - 1024                   # window 40/200 -> [-60, 140]
    expected = np.clip(np.rint((hu + 60) * 255 / 200), 0, 255)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0] == 0 and out[1, 1] == 255


def test_dicom_percentile_window_and_monochrome1(tmp_path, writers):
    ramp = np.arange(100 * 50, dtype=np.int16).reshape(100, 50)
    mono2 = dicom.read_dicom(writers.dicom(tmp_path / "m2.dcm", ramp), record_id="m2")[0]
    mono1 = dicom.read_dicom(writers.dicom(tmp_path / "m1.dcm", ramp, PhotometricInterpretation="MONOCHROME1"),
                             record_id="m1")[0]
    assert mono2.min() == 0 and mono2.max() == 255           # 0.5 / 99.5 percentile window spans the range
    assert mono2[0, 0] == 0 and mono2[-1, -1] == 255
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_dicom_multiframe_frames(tmp_path, writers):
    frames = np.stack([np.full((6, 7), v, np.int16) for v in (0, 100, 200)])
    path = writers.dicom(tmp_path / "cine.dcm", frames, WindowCenter=100, WindowWidth=200)
    out = dicom.read_dicom(path, record_id="cine")
    assert [int(f[0, 0]) for f in out] == [0, 128, 255]
    assert [int(f[0, 0]) for f in dicom.read_dicom(path, record_id="cine", frames=[2])] == [255]
    with pytest.raises(BadRecord, match="cine") as info:
        dicom.read_dicom(path, record_id="cine", frames=[3])
    assert info.value.reason == "bad_reference"


def test_dicom_color_and_unreadable(tmp_path):
    from pydicom.data import get_testdata_file

    rgb = dicom.read_dicom(get_testdata_file("ExplVR_BigEnd.dcm", download=False), record_id="us")[0]
    assert rgb.shape == (60, 80, 3) and rgb.dtype == np.uint8
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    with pytest.raises(BadRecord, match="bad-dicom") as info:
        dicom.read_image(bad, record_id="bad-dicom")
    assert info.value.reason == "unreadable_image"


def test_nifti_slices_planes_and_reorientation(tmp_path, writers):
    data = np.zeros((5, 6, 7), np.float32)
    data[1, 2, 3] = 1.0                                      # one bright voxel at (x=1, y=2, z=3)
    ras = writers.nifti(tmp_path / "ras.nii.gz", data)
    las = writers.nifti(tmp_path / "las.nii.gz", data[::-1], affine=np.diag([-1.0, 1, 1, 1]))
    for path in (ras, las):                                  # same anatomy, stored flipped: same slices
        (i, axial), = dicom.read_nifti(path, record_id="v", axis="axial", slices=[3])
        assert i == 3 and axial.shape == (6, 5)              # rows: anterior -> posterior, cols: x
        assert np.argwhere(axial == axial.max()).tolist() == [[6 - 1 - 2, 1]]
        sagittal = dicom.read_nifti(path, record_id="v", axis=0)
        assert len(sagittal) == 5 and sagittal[1][1].shape == (7, 6)
        assert dicom.read_nifti(path, record_id="v", axis="coronal", slices=[2])[0][1].max() == 255


def test_nifti_4d_and_bad_slices(tmp_path, writers):
    vol = np.stack([np.zeros((4, 4, 3)), np.arange(48).reshape(4, 4, 3)], axis=-1).astype(np.float32)
    path = writers.nifti(tmp_path / "t.nii", vol)
    assert dicom.read_image(path, record_id="t")[0].max() == 0                # time point 0 is empty
    assert dicom.read_image(path, record_id="t", volume=1)[0].max() > 0
    assert len(dicom.read_image(path, record_id="t", slices=[0, 2])) == 2
    for kwargs in (dict(slices=[3]), dict(volume=2)):
        with pytest.raises(BadRecord, match="'t'") as info:
            dicom.read_image(path, record_id="t", **kwargs)
        assert info.value.reason == "bad_reference"


def test_raster_modes(tmp_path, writers):
    from PIL import Image

    gray = dicom.read_raster(writers.png(tmp_path / "g.png", np.full((4, 6), 9, np.uint8)), record_id="g")
    assert gray.shape == (4, 6) and gray.dtype == np.uint8
    deep = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(deep).save(tmp_path / "d.png")
    out = dicom.read_raster(tmp_path / "d.png", record_id="d")
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    rgba = np.zeros((3, 3, 4), np.uint8)                     # fully transparent -> white
    assert (dicom.read_raster(writers.png(tmp_path / "a.png", rgba), record_id="a") == 255).all()
    Image.new("L", (9000, 1)).save(tmp_path / "wide.png")
    with pytest.raises(BadRecord, match="wide") as info:
        dicom.read_raster(tmp_path / "wide.png", record_id="wide")
    assert info.value.reason == "oversize_image"
