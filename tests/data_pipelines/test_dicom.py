"""Medical image readers: DICOM windowing / rescale / MONOCHROME1 / frames, the DICOM transfer syntaxes (compressed
files that pydicom / pydicom-data ship against their uncompressed twins), NIfTI slicing and orientation, rasters."""

import pathlib
import zlib

import numpy as np
import pydicom
import pytest
from pydicom import uid

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


# --------------------------------------------------------------------------------------------- transfer syntaxes
# Every file below is installed by a dependency: pydicom's own test files (pydicom/data/test_files, MIT) or
# pydicom-data 1.0.0 (the `data_store` package, MIT); get_testdata_file(download=False) never touches the network.


def _testfile(name: str) -> pathlib.Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not installed (pydicom / pydicom-data test files)"
    return pathlib.Path(path)


def _decode(name: str):
    """(dataset, pydicom's pixel_array) of an installed test file."""
    ds = pydicom.dcmread(_testfile(name))
    return ds, ds.pixel_array


def _psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


# (transfer syntax, compressed / re-encoded file, its uncompressed explicit-VR-little-endian twin)
LOSSLESS = [
    pytest.param(uid.JPEGLosslessSV1, "SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", id="jpeg-lossless-sv1-rgb"),
    pytest.param(uid.JPEGLSLossless, "MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", id="jpeg-ls-lossless"),
    pytest.param(uid.JPEG2000Lossless, "MR_small_jp2klossless.dcm", "MR_small.dcm", id="j2k-lossless"),
    pytest.param(uid.JPEG2000Lossless, "US1_J2KR.dcm", "US1_UNCR.dcm", id="j2k-lossless-ybr-rct"),
    pytest.param(uid.JPEG2000Lossless, "693_J2KR.dcm", "693_UNCR.dcm", id="j2k-lossless-ct-rescale-window"),
    pytest.param(uid.RLELossless, "MR_small_RLE.dcm", "MR_small.dcm", id="rle"),
    pytest.param(uid.RLELossless, "SC_rgb_rle.dcm", "SC_rgb.dcm", id="rle-rgb"),
    pytest.param(uid.ExplicitVRBigEndian, "MR_small_bigendian.dcm", "MR_small.dcm", id="explicit-big-endian"),
    pytest.param(uid.ExplicitVRBigEndian, "SC_rgb_expb.dcm", "SC_rgb.dcm", id="explicit-big-endian-rgb"),
    pytest.param(uid.ImplicitVRLittleEndian, "MR_small_implicit.dcm", "MR_small.dcm", id="implicit-little-endian"),
    pytest.param(uid.ExplicitVRLittleEndian, "MR_small.dcm", "MR_small.dcm", id="explicit-little-endian"),
    # multi-frame: 10-frame enhanced MR, 2-frame RGB
    pytest.param(uid.JPEGLSLossless, "emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm", id="multiframe-jpeg-ls"),
    pytest.param(uid.JPEG2000Lossless, "emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm", id="multiframe-j2k"),
    pytest.param(uid.RLELossless, "emri_small_RLE.dcm", "emri_small.dcm", id="multiframe-rle"),
    pytest.param(uid.ExplicitVRBigEndian, "emri_small_big_endian.dcm", "emri_small.dcm", id="multiframe-big-endian"),
    pytest.param(uid.RLELossless, "SC_rgb_rle_2frame.dcm", "SC_rgb_2frame.dcm", id="multiframe-rle-rgb"),
]


@pytest.mark.parametrize("syntax, name, twin", LOSSLESS)
def test_lossless_transfer_syntax_equals_uncompressed_twin(syntax, name, twin):
    ds, pixels = _decode(name)
    twin_ds, reference = _decode(twin)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert twin_ds.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian
    np.testing.assert_array_equal(pixels, reference)                      # pydicom + the decoder plugins
    image = dicom.load_dicom(_testfile(name), record_id=name)             # modality values (rescale / LUT), window
    twin_image = dicom.load_dicom(_testfile(twin), record_id=twin)
    np.testing.assert_array_equal(image.frames, twin_image.frames)
    assert image.window == twin_image.window
    ours = dicom.read_dicom(_testfile(name), record_id=name)
    theirs = dicom.read_dicom(_testfile(twin), record_id=twin)
    assert len(ours) == len(theirs) == int(ds.get("NumberOfFrames", 1) or 1)   # one image per frame
    for a, b in zip(ours, theirs):                                        # our windowed / colour uint8 output
        assert a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    if len(ours) > 1:                                                     # frame selection on compressed data
        np.testing.assert_array_equal(dicom.read_dicom(_testfile(name), record_id=name, frames=[1])[0], theirs[1])


def test_jpeg_lossless_sv1_grayscale():
    """The 16-bit CT-like and the 8-bit JPEG Lossless SV1 files have no uncompressed twin: pydicom's reference pixels
    (its tests/pixels/pixels_reference.py), and JPEG-LL.dcm against the same scan stored lossy (JPGExtended.dcm)."""
    ds, ll = _decode("JPEG-LL.dcm")
    assert ds.file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1 and ll.shape == (1024, 256) and ll.dtype == np.int16
    assert tuple(ll[400, 124:132]) == (60, 58, 61, 68, 59, 65, 64, 67)
    assert tuple(ll[600, 124:132]) == (3, 1, 2, 0, 2, 1, 2, 0)
    _, lossy = _decode("JPGExtended.dcm")                                 # JPEG Extended (process 2 & 4), 12-bit
    assert _psnr(ll, lossy, peak=float(ll.max() - ll.min())) > 35         # measured 37.7 dB
    ds8, ll8 = _decode("JPGLosslessP14SV1_1s_1f_8b.dcm")
    assert ds8.file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1 and ll8.shape == (768, 1024)
    assert tuple(ll8[300, 512:520]) == (26, 26, 25, 22, 19, 16, 14, 15)
    assert tuple(ll8[600, 512:520]) == (45, 43, 41, 38, 33, 30, 26, 21)
    (out,) = dicom.read_dicom(_testfile("JPEG-LL.dcm"), record_id="ll")
    assert out.shape == (1024, 256) and out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def _jpeg_ls_near(name: str) -> int:
    """NEAR, the maximum absolute error a JPEG-LS encoder allowed itself (the byte after the SOS components)."""
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(_testfile(name))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    sos = frame.index(b"\xff\xda")
    return frame[sos + 5 + 2 * frame[sos + 4]]


@pytest.mark.parametrize("name", ["SC_rgb_jls_lossy_line.dcm", "SC_rgb_jls_lossy_sample.dcm"])
def test_jpeg_ls_near_lossless_within_near(name):
    ds, pixels = _decode(name)
    assert ds.file_meta.TransferSyntaxUID == uid.JPEGLSNearLossless
    near = _jpeg_ls_near(name)
    assert near == 2
    _, original = _decode("SC_rgb.dcm")
    error = np.abs(pixels.astype(int) - original.astype(int))
    assert 0 < error.max() <= near                                         # lossy, within the codec's bound
    (ours,) = dicom.read_dicom(_testfile(name), record_id=name)
    assert np.abs(ours.astype(int) - original.astype(int)).max() <= near


# JPEG 2000 lossy: *_UNCI is the lossy image as decoded by the reference toolkit, *_UNCR the original scan.
@pytest.mark.parametrize("name, decoded, original, min_psnr", [
    pytest.param("US1_J2KI.dcm", "US1_UNCI.dcm", "US1_UNCR.dcm", 35.0, id="j2k-ybr-ict-8bit"),    # measured 36.6 dB
    pytest.param("693_J2KI.dcm", "693_UNCI.dcm", "693_UNCR.dcm", 40.0, id="j2k-ct-14bit"),        # measured 42.6 dB
])
def test_jpeg2000_lossy_within_codec_error(name, decoded, original, min_psnr):
    ds, pixels = _decode(name)
    assert ds.file_meta.TransferSyntaxUID == uid.JPEG2000
    _, reference = _decode(decoded)
    assert np.abs(pixels.astype(int) - reference.astype(int)).max() <= 1   # decoder rounding (measured 0)
    orig_ds, scan = _decode(original)
    assert _psnr(pixels, scan, peak=2.0 ** int(orig_ds.BitsStored) - 1) >= min_psnr
    ours, = dicom.read_dicom(_testfile(name), record_id=name)
    theirs, = dicom.read_dicom(_testfile(decoded), record_id=decoded)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_jpeg_baseline_and_extended_lossy():
    """8-bit YBR_FULL_422 baseline against dcmtk's decompression of the same file (IDCT / upsampling rounding of two
    conformant decoders: Pillow matches it exactly, libjpeg within 2); 12-bit extended: pydicom's reference pixels."""
    ds, pixels = _decode("SC_rgb_dcmtk_+eb+cy+np.dcm")
    assert ds.file_meta.TransferSyntaxUID == uid.JPEGBaseline8Bit and ds.PhotometricInterpretation == "YBR_FULL_422"
    _, dcmtk = _decode("SC_rgb_dcmtk_ebcynp_dcmd.dcm")
    assert np.abs(pixels.astype(int) - dcmtk.astype(int)).max() <= 2
    ds12, ext = _decode("JPGExtended.dcm")
    assert ds12.file_meta.TransferSyntaxUID == uid.JPEGExtended12Bit
    assert ext[420, 140] == 244 and ext[230, 120] == 95


def test_deflated_explicit_little_endian():
    """Deflate compresses the whole dataset: inflate it with zlib ourselves and find the decoded pixels in it."""
    path = _testfile("image_dfl.dcm")
    ds, pixels = _decode("image_dfl.dcm")
    assert ds.file_meta.TransferSyntaxUID == uid.DeflatedExplicitVRLittleEndian
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"      # (0002,0000) group length first
    body = 132 + 12 + int.from_bytes(raw[140:144], "little")                    # end of the file meta group
    inflated = zlib.decompress(raw[body:], -zlib.MAX_WBITS)
    assert pixels.dtype == np.uint8 and pixels.tobytes() in inflated
    assert tuple(pixels[300, 255:263]) == (138, 65, 65, 65, 65, 35, 35, 35)     # pydicom's reference pixels
    (ours,) = dicom.read_dicom(path, record_id="dfl")
    assert ours.shape == (512, 512) and ours.dtype == np.uint8


@pytest.mark.parametrize("name, photometric", [("SC_ybr_full_uncompressed.dcm", "YBR_FULL"),
                                               ("SC_ybr_full_422_uncompressed.dcm", "YBR_FULL_422")])
def test_ybr_full_becomes_rgb(name, photometric):
    """Both files hold the YBR planes of the JPEG SC_rgb_dcmtk_+eb+cy+n2.dcm uncompressed (pydicom's test-file README);
    dcmtk decompressed that JPEG to RGB as SC_rgb_dcmtk_ebcyn2_dcmd.dcm: the conversion must match it exactly."""
    ds, _ = _decode(name)
    assert ds.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian and ds.PhotometricInterpretation == photometric
    twin_ds, rgb = _decode("SC_rgb_dcmtk_ebcyn2_dcmd.dcm")
    assert twin_ds.PhotometricInterpretation == "RGB"
    (ours,) = dicom.read_dicom(_testfile(name), record_id=name)
    assert ours.shape == (100, 100, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, rgb)
    _, original = _decode("SC_rgb.dcm")                                   # the colour bars before JPEG
    assert np.abs(ours.astype(int) - original.astype(int)).max() <= 6     # baseline JPEG loss (measured 6)


def test_ybr_multiframe_jpeg_baseline_cine_is_rgb():
    """30-frame YBR_FULL_422 ultrasound cine: one RGB image per frame; the grey-scale B-mode has R = G = B once
    converted (the raw YBR planes differ by ~126 there)."""
    path = _testfile("examples_ybr_color.dcm")
    image = dicom.load_dicom(path, record_id="cine")
    assert image.dataset.PhotometricInterpretation == "YBR_FULL_422" and image.frames.shape == (30, 240, 320, 3)
    frames = dicom.read_dicom(path, record_id="cine", frames=[0, 29])
    for frame in frames:
        assert np.median(np.abs(frame[..., 0].astype(int) - frame[..., 1])) == 0


def test_decoder_plugins_are_installed():
    """The pyproject dependencies give pydicom a decoder for every compressed syntax above."""
    from pydicom.pixels import get_decoder

    expected = {uid.JPEGLosslessSV1: "pylibjpeg", uid.JPEGLossless: "pylibjpeg", uid.JPEGExtended12Bit: "pylibjpeg",
                uid.JPEGLSLossless: "pyjpegls", uid.JPEGLSNearLossless: "pyjpegls",
                uid.JPEG2000Lossless: "pylibjpeg", uid.JPEG2000: "pylibjpeg", uid.HTJ2KLossless: "pylibjpeg",
                uid.RLELossless: "pylibjpeg"}
    for syntax, plugin in expected.items():
        assert plugin in get_decoder(syntax).available_plugins, (syntax.name, get_decoder(syntax).missing_dependencies)


def test_cli_reader_accepts_jpeg_lossless():
    """unimedvl-vqa / -edit read --image with inference.loading.read_input_image."""
    from unimedvl_jax.inference.loading import read_input_image

    path = _testfile("JPEG-LL.dcm")
    image = read_input_image(path)
    assert image.shape == (1024, 256, 3) and image.dtype == np.uint8
    (gray,) = dicom.read_dicom(path, record_id="ll")
    np.testing.assert_array_equal(image, np.repeat(gray[..., None], 3, axis=-1))
    assert dicom.image_kind(path) == "dicom"


def test_missing_decoder_names_file_and_transfer_syntax(monkeypatch):
    """What an install without the plugins reported (issue #14), now with the file and its transfer syntax."""
    from pydicom.pixels import get_decoder

    decoder = get_decoder(uid.JPEGLosslessSV1)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")})
    path = _testfile("JPEG-LL.dcm")
    with pytest.raises(BadRecord) as info:
        dicom.read_image(path, record_id="ll")
    assert info.value.reason == "unreadable_image"
    message = str(info.value)
    for part in (str(path), "JPEG Lossless, Non-Hierarchical, First-Order Prediction", "1.2.840.10008.1.2.4.70",
                 "no decoder plugin", "pylibjpeg-libjpeg"):
        assert part in message, (part, message)


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
