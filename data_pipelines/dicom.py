"""Medical image readers: DICOM (windowed), NIfTI volume slices and PNG/JPEG files -> uint8 arrays.

Grayscale images come back as 2-D uint8 (H, W), colour as (H, W, 3) uint8; 3-channel expansion happens later in
the transforms. Anything that cannot be decoded raises schema.BadRecord('unreadable_image', record_id, detail).

DICOM: modality values = stored values through RescaleSlope/Intercept (or the Modality LUT), then the first
WindowCenter/WindowWidth (top level or the enhanced multi-frame functional groups) maps them linearly to 0..255;
without window tags a 0.5-99.5 percentile window over all frames is used. MONOCHROME1 is inverted after windowing.
Colour (RGB / YBR via pydicom, PALETTE COLOR via its LUT) is scaled to 8 bits. Multi-frame files (cines, enhanced
CT/MR) give one image per frame.

Transfer syntaxes: pydicom reads implicit / explicit VR little endian, explicit VR big endian and deflated files
itself; compressed pixel data is decoded by the plugins this package depends on: pylibjpeg with pylibjpeg-libjpeg
(JPEG Lossless process 14 and its selection value 1, the usual CT / MR archive compression; JPEG Baseline /
Extended), pyjpegls (JPEG-LS lossless and near-lossless; libjpeg decodes these too), pylibjpeg-openjpeg (JPEG 2000
lossless / lossy, HTJ2K) and pylibjpeg-rle (RLE Lossless; pydicom also has its own decoder). Pillow stays a fallback
for JPEG Baseline and JPEG 2000. YBR_FULL / YBR_FULL_422 pixels are converted to RGB (`as_rgb`), YBR_RCT / YBR_ICT by
the JPEG 2000 codec. A file that no installed plugin can decode raises BadRecord('unreadable_image') naming the
file and its transfer syntax.

NIfTI (and anything else nibabel loads): the volume is reoriented to the closest canonical RAS orientation, so voxel
axis 0/1/2 is the sagittal/coronal/axial slicing axis. Sagittal and coronal slices are shown superior-up, axial
slices anterior-up, with the patient's right on the image right (neurological convention). The
percentile window is computed over the whole (selected) volume so that slices of one volume share a window.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import warnings

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder

from data_pipelines.schema import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, BadRecord, pil_to_rgb

PLANES = ("sagittal", "coronal", "axial")   # canonical RAS voxel axis -> anatomical plane of its slices
PERCENTILES = (0.5, 99.5)
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh", ".img", ".hdr")
DICOM_SUFFIXES = (".dcm", ".dicom")
# pyproject.toml dependencies that give pydicom its decoders for compressed transfer syntaxes
DICOM_DECODER_PLUGINS = ("pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls")


# --------------------------------------------------------------------------------------------- windowing


def percentile_window(values: np.ndarray, percentiles=PERCENTILES) -> tuple[float, float]:
    """(center, width) spanning the given low/high percentiles of the values."""
    values = np.asarray(values, np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return float((lo + hi) / 2), float(hi - lo)


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window: center - width/2 -> 0 and center + width/2 -> 255, clipped, as uint8."""
    width = max(float(width), 1e-6)
    lo = float(center) - width / 2
    scaled = (np.asarray(values, np.float32) - lo) * (255.0 / width)
    return np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- DICOM


@dataclasses.dataclass
class DicomImage:
    """A decoded DICOM object: per-frame modality values (grayscale) or 8-bit RGB frames, plus its tags."""

    dataset: object                        # pydicom.Dataset (pixel data released)
    frames: np.ndarray                     # (F, H, W) float32 modality values, or (F, H, W, 3) uint8 colour
    window: tuple[float, float] | None     # first WindowCenter/WindowWidth in modality units, if tagged
    monochrome1: bool

    @property
    def is_color(self) -> bool:
        """True for RGB / YBR / PALETTE COLOR images."""
        return self.frames.ndim == 4

    def to_uint8(self, window: tuple[float, float] | None = None, frames=None) -> list[np.ndarray]:
        """8-bit frames: the given window, else the tagged window, else the percentile window over all frames."""
        index = range(len(self.frames)) if frames is None else frames
        if self.is_color:
            return [self.frames[i] for i in index]
        center, width = window or self.window or percentile_window(self.frames)
        out = [apply_window(self.frames[i], center, width) for i in index]
        return [255 - f for f in out] if self.monochrome1 else out


def tag_value(ds, keyword: str):
    """A tag value from the top level, else from the shared / first per-frame functional group (enhanced files)."""
    if keyword in ds and ds[keyword].value not in (None, ""):
        return ds[keyword].value
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in ds.get(groups, [])[:1]:
            for elem in item:
                if elem.VR == "SQ":
                    for sub in elem.value[:1]:
                        if keyword in sub and sub[keyword].value not in (None, ""):
                            return sub[keyword].value
    return None


def _first_number(value) -> float | None:
    """First entry of a possibly multi-valued DS/IS tag, as float."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return None if value is None else float(value)


def _modality_values(ds, pixels: np.ndarray) -> np.ndarray:
    """Stored values -> modality values (Modality LUT or RescaleSlope/Intercept), float32."""
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return np.asarray(apply_modality_lut(pixels, ds), np.float32)
    slope = _first_number(tag_value(ds, "RescaleSlope"))
    intercept = _first_number(tag_value(ds, "RescaleIntercept"))
    values = pixels.astype(np.float32)
    return values * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)


def _color_to_uint8(ds, pixels: np.ndarray) -> np.ndarray:
    """RGB (already converted from YBR by pydicom) or PALETTE COLOR -> uint8 RGB."""
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        bits = 16 if pixels.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored", 8 * pixels.dtype.itemsize))
    if pixels.dtype == np.uint8 and bits <= 8:
        return pixels
    return np.rint(pixels.astype(np.float64) * (255.0 / (2.0**bits - 1))).clip(0, 255).astype(np.uint8)


def _transfer_syntax_note(ds) -> str:
    """' [transfer syntax <name> (<UID>)]' of a read dataset, with why it cannot be decoded when no plugin can."""
    try:
        syntax = ds.file_meta.get("TransferSyntaxUID") if ds is not None and hasattr(ds, "file_meta") else None
        if not syntax:
            return ""
        why = ""
        if syntax.is_transfer_syntax and syntax.is_compressed:
            try:
                if not get_decoder(syntax).is_available:
                    why = (f"; no decoder plugin for it is installed: the DICOM decoder plugins "
                           f"{', '.join(DICOM_DECODER_PLUGINS)} are dependencies of unimedvl_jax, reinstall it "
                           f"or pip install them")
            except NotImplementedError:
                why = "; pydicom has no pixel data decoder for this transfer syntax"
        return f" [transfer syntax {syntax.name} ({syntax}){why}]"
    except Exception:  # a malformed file meta must not hide the original error
        return ""


def load_dicom(source, *, record_id: str) -> DicomImage:
    """Read and decode a DICOM file (path or bytes) into modality values; BadRecord('unreadable_image') on failure
    (its detail names the file and, once the header is read, its transfer syntax)."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    ds = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
                raise ValueError("no pixel data")
            check_size(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), record_id=record_id, name=name)
            ds.pixel_array_options(as_rgb=True)   # YBR_FULL / YBR_FULL_422 -> RGB (pydicom's default, made explicit)
            pixels = ds.pixel_array
    except BadRecord:
        raise
    except Exception as e:  # pydicom raises many types for corrupt / unsupported files
        raise BadRecord("unreadable_image", record_id,
                        f"DICOM {name}{_transfer_syntax_note(ds)}: {type(e).__name__}: {e}") from e
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    color = int(ds.get("SamplesPerPixel", 1)) == 3 or ds.get("PhotometricInterpretation") == "PALETTE COLOR"
    if n_frames == 1:
        pixels = pixels[None]
    frames = _color_to_uint8(ds, pixels) if color else pixels
    if frames.ndim != (4 if color else 3) or 0 in frames.shape:
        raise BadRecord("unreadable_image", record_id, f"DICOM {name}: unexpected pixel array shape {frames.shape}")
    if color:
        window = None
    else:
        frames = _modality_values(ds, frames)
        center, width = _first_number(tag_value(ds, "WindowCenter")), _first_number(tag_value(ds, "WindowWidth"))
        window = (center, width) if center is not None and width else None
    if "PixelData" in ds:
        del ds.PixelData
    return DicomImage(ds, frames, window, ds.get("PhotometricInterpretation") == "MONOCHROME1")


def read_dicom(source, *, record_id: str, frames=None, window=None) -> list[np.ndarray]:
    """DICOM -> list of uint8 frames (all frames, or the given frame indices), windowed as described above."""
    image = load_dicom(source, record_id=record_id)
    _check_indices(frames, len(image.frames), "frame", record_id, source)
    return image.to_uint8(window=window, frames=frames)


# --------------------------------------------------------------------------------------------- NIfTI


@dataclasses.dataclass
class Volume:
    """A 3-D volume in closest-canonical RAS orientation (float32) with its voxel sizes."""

    data: np.ndarray          # (X, Y, Z)
    zooms: tuple[float, ...]

    def num_slices(self, axis: int) -> int:
        """Number of slices along a voxel axis."""
        return self.data.shape[axis]

    def slice(self, axis: int, index: int) -> np.ndarray:
        """One 2-D slice (float32) oriented for display (sagittal/coronal superior-up, axial anterior-up)."""
        return np.rot90(self.data[(slice(None),) * axis + (index,)])


def load_volume(path, *, record_id: str, volume: int = 0) -> Volume:
    """Load a NIfTI (or other nibabel) image, pick time point `volume` of 4-D data, reorient to canonical RAS."""
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.ascontiguousarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise BadRecord("unreadable_image", record_id, f"volume {path}: {type(e).__name__}: {e}") from e
    while data.ndim > 3:
        if not 0 <= volume < data.shape[3]:
            raise BadRecord("bad_reference", record_id, f"volume {path}: time point {volume} out of "
                                                        f"range [0, {data.shape[3]})")
        data, volume = data[:, :, :, volume], 0
    if data.ndim != 3 or 0 in data.shape:
        raise BadRecord("unreadable_image", record_id, f"volume {path}: shape {data.shape} is not a 3-D volume")
    return Volume(data, tuple(float(z) for z in img.header.get_zooms()[:3]))


def plane_axis(axis) -> int:
    """Voxel axis for 0/1/2 or 'sagittal'/'coronal'/'axial'."""
    if isinstance(axis, str):
        if axis.lower() not in PLANES:
            raise ValueError(f"axis {axis!r} is not one of {PLANES} or 0/1/2")
        return PLANES.index(axis.lower())
    if axis not in (0, 1, 2):
        raise ValueError(f"axis {axis!r} is not one of {PLANES} or 0/1/2")
    return int(axis)


def volume_slices(vol: Volume, *, record_id: str, axis=2, slices=None, window=None,
                  name: str = "<volume>") -> list[tuple[int, np.ndarray]]:
    """[(slice index, uint8 slice)] of a loaded volume along `axis` (all, or the given indices), windowed."""
    try:
        axis = plane_axis(axis)
    except ValueError as e:
        raise BadRecord("bad_reference", record_id, f"volume {name}: {e}") from e
    n = vol.num_slices(axis)
    indices = list(range(n)) if slices is None else list(slices)
    _check_indices(indices, n, f"{PLANES[axis]} slice", record_id, name)
    center, width = window or percentile_window(vol.data)
    return [(i, apply_window(vol.slice(axis, i), center, width)) for i in indices]


def read_nifti(path, *, record_id: str, axis=2, slices=None, volume: int = 0,
               window=None) -> list[tuple[int, np.ndarray]]:
    """Volume file -> [(slice index, uint8 slice)] along `axis` (all slices, or the given indices),
    percentile-windowed over the whole volume unless a (center, width) window is given."""
    vol = load_volume(path, record_id=record_id, volume=volume)
    return volume_slices(vol, record_id=record_id, axis=axis, slices=slices, window=window, name=str(path))


# --------------------------------------------------------------------------------------------- PNG / JPEG


def read_raster(source, *, record_id: str) -> np.ndarray:
    """PNG/JPEG/TIFF (path or bytes) -> uint8 (H, W) grayscale or (H, W, 3) RGB; 16-bit/float percentile-windowed."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as img:
            check_size(img.size[1], img.size[0], record_id=record_id, name=name)
            img.load()
            if img.mode in ("L", "1"):
                array = np.asarray(img.convert("L"))
            elif img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                array = np.asarray(img, dtype=np.float32)
                array = apply_window(array, *percentile_window(array))
            else:
                array = np.asarray(pil_to_rgb(img))
    except BadRecord:
        raise
    except Exception as e:
        raise BadRecord("unreadable_image", record_id, f"image {name}: {type(e).__name__}: {e}") from e
    return array


def check_size(height: int, width: int, *, record_id: str, name: str) -> None:
    """BadRecord('zero_size_image' / 'oversize_image') before decoding an image of the given size."""
    if height <= 0 or width <= 0:
        raise BadRecord("zero_size_image", record_id, f"image {name} is {width}x{height}")
    if height * width > MAX_IMAGE_PIXELS or max(height, width) > MAX_IMAGE_SIDE:
        raise BadRecord("oversize_image", record_id, f"image {name} is {width}x{height} (limit {MAX_IMAGE_PIXELS} "
                                                     f"pixels, {MAX_IMAGE_SIDE} per side)")


# --------------------------------------------------------------------------------------------- dispatch


def image_kind(path) -> str:
    """'nifti', 'dicom' or 'raster' from the file name, else from the DICOM 'DICM' magic at byte 128."""
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return "raster"
    return "dicom" if head[128:132] == b"DICM" else "raster"


def read_image(path, *, record_id: str, frames=None, slices=None, axis=2, volume: int = 0) -> list[np.ndarray]:
    """One file -> list of uint8 images: DICOM `frames` (default [0]), NIfTI `slices` along `axis` (default the
    middle slice) of time point `volume`, or the single PNG/JPEG image."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise BadRecord("bad_reference", record_id, f"image file {path} does not exist")
    kind = image_kind(path)
    if kind == "nifti":
        vol = load_volume(path, record_id=record_id, volume=volume)
        try:
            middle = vol.num_slices(plane_axis(axis)) // 2
        except ValueError as e:
            raise BadRecord("bad_reference", record_id, f"volume {path}: {e}") from e
        slices = [middle] if slices is None else slices
        return [s for _, s in volume_slices(vol, record_id=record_id, axis=axis, slices=slices, name=str(path))]
    if kind == "dicom":
        return read_dicom(path, record_id=record_id, frames=[0] if frames is None else frames)
    return [read_raster(path, record_id=record_id)]


def _check_indices(indices, n: int, what: str, record_id: str, source) -> None:
    """Raise BadRecord('bad_reference') when a requested frame / slice index is outside [0, n)."""
    if indices is None:
        return
    bad = [i for i in indices if not (isinstance(i, (int, np.integer)) and 0 <= i < n)]
    if bad:
        where = "<bytes>" if isinstance(source, (bytes, bytearray)) else source
        raise BadRecord("bad_reference", record_id, f"{where}: {what} index {bad[0]!r} out of range [0, {n})")
