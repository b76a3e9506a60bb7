"""unimed-mini: a small embedded dataset built only from real scans that installed registry packages ship.

Sources (all read from the local install, nothing is downloaded):
  * pydicom 3 test files and pydicom-data 1.0.0 (`pydicom.data.get_testdata_file(name, download=False)`): chest and
    leg radiographs, head / neck / body / perfusion CT, shoulder / abdomen / head MR, ultrasound stills, an adult
    echocardiogram and a 120-frame epicardial cine, a whole-body bone scan.
  * scikit-image data: colour fundus photograph, fundus microaneurysm crop, IHC of colonic glands, phase image of a
    cell.
  * mahotas demo data: fluorescence image of cell nuclei. stardist data: H&E histology tile (TCIA) and a
    fluorescence nuclei image (2018 Data Science Bowl).
  * nilearn MNI152 ICBM 2009a T1 template with its grey / white-matter probability maps (3-D, sliced on 3 axes).
  * nibabel test data: a normalised anatomical brain MRI, an FSL EPI (fMRI) volume, an AFNI brain volume in
    Talairach space and a time-of-flight MR angiography MIP (DICOM).
  * matplotlib sample data: a 16-bit raw MRI image (s1045.ima.gz).

The same image re-encoded in another transfer syntax (CT_small / MR_small / US1 / OBXXXX1A / ... variants, identical
Study/Series UIDs) is one source and appears once. Every 2-D image, volume slice and cine frame is an image unit
(downscaled to `max_side`). Each unit gives one multi-turn VQA record whose answers come from DICOM tags or source
metadata (modality, body region, view, plane, weighting, photometric interpretation, colour, findings named in the
source); single-image scans also get a caption, a text->image prompt and all paired tasks (2x / 4x super-resolution,
denoising, CT window change), while units of volumes and cines rotate through those so the dataset stays small. MNI
T1 slices pair with the grey / white-matter map of the same slice (T1 -> tissue map translation). Splits are by
source scan, stratified by modality (sources/stratified_splits.py): slices of one volume and frames of one cine never
straddle splits. Everything is deterministic: the per-record random numbers are seeded by the record id.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import pathlib
import re
from collections.abc import Callable, Iterator

import nibabel
import nilearn
import numpy as np
import pydicom
import skimage.data
from PIL import Image
from pydicom.data import get_testdata_file

from data_pipelines import dicom
from data_pipelines.schema import Record, Segment, encode_png
from data_pipelines.sources import medical_text
from data_pipelines.sources.stratified_splits import stratified_splits

NAME = "unimed-mini"
# Splits are stratified by modality (sources/stratified_splits.py): every modality with enough source scans gets
# test and val scans, drawn in the order of a salted hash. The salt is the first of unimed-mini-v0.. for which the
# two big scans (MNI volumes, epicardial US cine) land in train and a volume sliced on all three axes
# (nibabel/anatomical) lands in test, so the plane question is asked on a brain the model never saw.
SALT = "unimed-mini-v0"
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
MAX_SIDE = 256
MANY_UNITS = 12            # scans with more image units than this rotate tasks instead of doing all of them
MIN_SR_SIDE = 16           # super-resolution needs the low-resolution input to keep at least this many pixels

# Licenses as verified in the installed packages (file named in each string).
PYDICOM_LICENSE = ("pydicom test file: pydicom is MIT (pydicom dist-info LICENSE); pydicom/data/test_files/README.txt "
                   "on these files: 'I believe there is no restriction on using any of these files in this manner'")
PYDICOM_DATA_LICENSE = "MIT (pydicom-data dist-info LICENSE and METADATA 'License: MIT')"
SKIMAGE_LICENSES = {
    "retina.jpg": "CC0-1.0 (skimage.data.retina docstring: Wikimedia 'Fundus photograph of normal left eye', "
                  "CC0 1.0 Universal)",
    "microaneurysms.png": "CC0 (skimage.data.microaneurysms docstring: 'No copyright restrictions. CC0 given by owner "
                          "(Andreas Maier)'; crop of HRF image 07_dr.JPG)",
    "ihc.png": "no known copyright restrictions (skimage.data.immunohistochemistry docstring; image from CMMI)",
    "cell.png": "CC0 (skimage.data.cell docstring: 'This image is CC0, dedicated to the public domain')",
}
MNI_LICENSE = ("ICBM152 2009a template (Fonov 2011, Collins 1999): nilearn/datasets/description/icbm152_2009.rst "
               "says 'License: unknown'; the MNI/McGill notice for the sibling asym 09a T1 quoted in nibabel's COPYING "
               "permits use, copy, modification and distribution with the copyright notice")
NIBABEL_LICENSE = ("MIT (nibabel dist-info COPYING: 'The nibabel package, including all examples ... is covered by the "
                   "MIT license'; this test file is not listed separately)")
MAHOTAS_LICENSE = ("MIT (mahotas dist-info METADATA 'License: MIT'; mahotas/demos/__init__.py names nuclear.png the "
                   "'nuclear example image' and gives no separate notice)")
STARDIST_LICENSES = {
    "histo.jpg": "BSD-3-Clause (stardist dist-info licenses/LICENSE.txt); stardist/data/__init__.py "
                 "test_image_he_2d: 'H&E stained RGB example image from the Cancer Imaging Archive'",
    "img2d.tif": "BSD-3-Clause (stardist dist-info licenses/LICENSE.txt); stardist/data/__init__.py "
                 "test_image_nuclei_2d: 'Fluorescence microscopy image ... from the 2018 kaggle DSB challenge' "
                 "(Caicedo et al. 2019)",
}

MATPLOTLIB_LICENSE = ("Matplotlib License (PSF-style, matplotlib dist-info LICENSE); mpl-data/sample_data/README.txt "
                      "only says the files are 'sample data needed for some of matplotlib's examples and docs' and "
                      "names no other terms for s1045.ima.gz")

CT_WINDOWS = {  # name -> (center, width) in HU
    "brain": (40, 80), "subdural": (75, 215), "bone": (600, 2800), "soft-tissue": (50, 400), "lung": (-600, 1500),
}
CT_WINDOW_PAIRS = {"head": (("brain", "bone"), ("brain", "subdural"), ("bone", "brain")),
                   "body": (("soft-tissue", "lung"), ("soft-tissue", "bone"), ("lung", "soft-tissue"))}


# --------------------------------------------------------------------------------------------- data model


@dataclasses.dataclass
class Unit:
    """One image of a scan (a 2-D image, a volume slice or a cine frame) with its ground-truth facts."""

    key: str                                   # unique within the scan: 'image', 'frame-012', 't1-axial-093'
    pixels: np.ndarray                         # uint8 (H, W) or (H, W, 3), at most max_side
    facts: dict                                # answerable facts: modality_name, region, view, plane, ...
    description: str                           # noun phrase for captions and prompts
    source: str                                # package + file the pixels came from
    hu: np.ndarray | None = None               # CT Hounsfield values at the same size (window-change tasks)
    ct_family: str | None = None               # 'head' / 'body': which CT window pairs apply
    pairs: list = dataclasses.field(default_factory=list)   # co-registered target units (T1 -> tissue maps)


@dataclasses.dataclass(frozen=True)
class Scan:
    """A source scan: provenance, license, modality and how to read its image units."""

    key: str                                   # source_scan; splits never cut a scan
    license: str
    modality: str
    body_region: str | None
    read: Callable[[int], list[Unit]]          # max_side -> units
    qa: tuple = ()                             # extra (question, answer) pairs from source metadata


# --------------------------------------------------------------------------------------------- helpers


def _package_file(package: str, module_file: str, path: pathlib.Path) -> str:
    """Provenance string: '<distribution> <version>: <path relative to site-packages>'."""
    site = pathlib.Path(module_file).parent.parent
    return f"{package} {importlib.metadata.version(package)}: {path.relative_to(site)}"


def _seed(text: str) -> int:
    """64-bit seed derived from a string."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (W, H) with PIL: Lanczos when shrinking, bicubic when enlarging; keeps dtype (uint8 or float32)."""
    h, w = array.shape[:2]
    shrink = size[0] <= w and size[1] <= h
    method = Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC
    if array.dtype == np.uint8:
        return np.asarray(Image.fromarray(array).resize(size, method))
    return np.asarray(Image.fromarray(array.astype(np.float32)).resize(size, method))


def fit_max_side(array: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so that the longer side is at most max_side (aspect preserved); smaller images are unchanged."""
    h, w = array.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return array
    return _resize(array, (max(1, round(w * scale)), max(1, round(h * scale))))


def _plane_from_orientation(iop) -> str | None:
    """Anatomical plane from ImageOrientationPatient: the dominant axis of the slice normal ('oblique (closest to
    ...)' when the normal is more than ~25 degrees off every patient axis)."""
    if iop is None or len(iop) != 6:
        return None
    normal = np.abs(np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float)))
    closest = dicom.PLANES[int(np.argmax(normal))]
    return closest if normal.max() >= 0.9 * np.linalg.norm(normal) else f"oblique (closest to {closest})"


def _mr_weighting(ds) -> str | None:
    """T1 / T2 weighting from ImageType or ProtocolName tokens, else from TR/TE (long TR and TE -> T2, short -> T1)."""
    text = " ".join([*map(str, ds.get("ImageType", [])), str(ds.get("ProtocolName", ""))]).upper()
    tokens = set(re.split(r"[^A-Z0-9]+", text))
    for weighting in ("T1", "T2"):
        if {weighting, f"{weighting}W"} & tokens:
            return f"{weighting}-weighted"
    tr, te = ds.get("RepetitionTime"), ds.get("EchoTime")
    if tr is not None and te is not None:
        if float(tr) >= 2000 and float(te) >= 80:
            return "T2-weighted"
        if float(tr) <= 800 and float(te) <= 30:
            return "T1-weighted"
    return None


def _color_fact(pixels: np.ndarray) -> str:
    """'colour' when an RGB image has differing channels, else 'grayscale'."""
    if pixels.ndim == 3 and not (np.array_equal(pixels[..., 0], pixels[..., 1])
                                 and np.array_equal(pixels[..., 1], pixels[..., 2])):
        return "colour"
    return "grayscale"


def _position(index: int, n: int, plane: str) -> str:
    """Which third of the volume a slice lies in, in anatomical words."""
    words = {"axial": ("inferior", "middle", "superior"), "coronal": ("posterior", "middle", "anterior"),
             "sagittal": ("left", "middle", "right")}[plane]   # RAS: x grows towards the right
    return words[min(2, 3 * index // n)]


# --------------------------------------------------------------------------------------------- readers


def _dicom_units(max_side: int, *, path: pathlib.Path, source: str, description: str, facts: dict,
                 ct_family: str | None, drop: tuple = ()) -> list[Unit]:
    """Units of one DICOM file: tag-derived facts (except those in `drop`), each frame windowed and downscaled."""
    image = dicom.load_dicom(path, record_id=source)
    ds = image.dataset
    n = len(image.frames)
    tag_facts = {"photometric": str(ds.get("PhotometricInterpretation", "")) or None,
                 "plane": _plane_from_orientation(dicom.tag_value(ds, "ImageOrientationPatient"))}
    if ds.get("Modality") == "MR":
        tag_facts["weighting"] = _mr_weighting(ds)
    if ds.get("ViewPosition"):
        tag_facts["view"] = str(ds.ViewPosition)
    if dicom.tag_value(ds, "ContrastBolusAgent"):
        tag_facts["contrast"] = "yes"
    tag_facts = {k: v for k, v in tag_facts.items() if k not in drop}
    units = []
    for i, pixels in enumerate(image.to_uint8()):
        pixels = fit_max_side(pixels, max_side)
        unit_facts = {**facts, **{k: v for k, v in tag_facts.items() if v}, "color": _color_fact(pixels)}
        if n > 1:
            unit_facts["frame"] = (i, n)
        hu = fit_max_side(image.frames[i], max_side) if ct_family else None   # same size as pixels
        units.append(Unit(f"frame-{i:03d}" if n > 1 else "image", pixels, unit_facts, description, source,
                          hu=hu, ct_family=ct_family))
    return units


def _raster_units(max_side: int, *, path: pathlib.Path, source: str, description: str, facts: dict,
                  tiles: int) -> list[Unit]:
    """Units of one PNG/JPEG: the downscaled image, or a tiles x tiles grid of crops for large microscopy images."""
    pixels = dicom.read_raster(path, record_id=source)
    crops = [("image", pixels)]
    if tiles > 1:
        h, w = pixels.shape[0] // tiles, pixels.shape[1] // tiles
        crops = [(f"tile-{r}{c}", pixels[r * h:(r + 1) * h, c * w:(c + 1) * w]) for r in range(tiles)
                 for c in range(tiles)]
    return [Unit(key, fit_max_side(crop, max_side), {**facts, "color": _color_fact(crop)}, description, source)
            for key, crop in crops]


def _raw_units(max_side: int, *, path: pathlib.Path, source: str, description: str, facts: dict,
               shape: tuple[int, int], dtype: str) -> list[Unit]:
    """Units of a headerless raw image (gzip-compressed): percentile-windowed to uint8 and downscaled."""
    values = np.frombuffer(gzip.decompress(path.read_bytes()), dtype=dtype)
    if values.size != shape[0] * shape[1]:
        raise ValueError(f"{path}: {values.size} samples, expected {shape[0]}x{shape[1]}")
    values = values.reshape(shape).astype(np.float32)
    pixels = fit_max_side(dicom.apply_window(values, *dicom.percentile_window(values)), max_side)
    return [Unit("image", pixels, {**facts, "color": "grayscale"}, description, source)]


@dataclasses.dataclass(frozen=True)
class VolumeMap:
    """One NIfTI volume of a volume scan: file, short name, description and facts of its slices."""

    path: pathlib.Path
    source: str
    name: str                                   # 't1', 'gm', 'wm', 'epi', ...
    description: str                            # e.g. 'T1-weighted brain MRI slice'
    facts: dict
    pair_with: tuple = ()                       # names of other maps to pair with (T1 -> tissue maps)


def _volume_units(max_side: int, *, maps: tuple[VolumeMap, ...], axes: tuple[int, ...],
                  min_content: float = 0.02) -> list[Unit]:
    """Slices of co-registered volumes along the given axes; near-empty slices (< min_content foreground) dropped."""
    volumes = {m.name: dicom.load_volume(m.path, record_id=m.source) for m in maps}
    windows = {name: dicom.percentile_window(v.data) for name, v in volumes.items()}
    units = []
    for m in maps:
        vol = volumes[m.name]
        foreground = vol.data > 0.05 * float(vol.data.max())
        for axis in axes:
            plane, n = dicom.PLANES[axis], vol.num_slices(axis)
            fraction = np.moveaxis(foreground, axis, 0).reshape(n, -1).mean(axis=1)
            for i in np.flatnonzero(fraction >= min_content):
                i = int(i)
                pixels = fit_max_side(dicom.apply_window(vol.slice(axis, i), *windows[m.name]), max_side)
                pairs = [Unit(f"{other.name}-{plane}-{i:03d}", fit_max_side(dicom.apply_window(
                    volumes[other.name].slice(axis, i), *windows[other.name]), max_side), {}, other.description,
                    other.source) for other in maps if other.name in m.pair_with]
                facts = {**m.facts, "plane": plane, "slice": (i, n), "position": _position(i, n, plane),
                         "color": "grayscale"}
                units.append(Unit(f"{m.name}-{plane}-{i:03d}", pixels, facts, f"{plane} {m.description}", m.source,
                                  pairs=pairs))
    return units


# --------------------------------------------------------------------------------------------- catalog


def _module_dir(module: str) -> pathlib.Path | None:
    """Directory of an installed top-level package, found without importing it (None when it is not installed)."""
    spec = importlib.util.find_spec(module)
    return pathlib.Path(spec.origin).parent if spec is not None and spec.origin else None


def _file_scan(key: str, package: str, module_file: str, path: pathlib.Path, license_: str, modality: str,
               region: str | None, read, qa: tuple, **read_kwargs) -> Scan:
    """Scan entry for one image file of an installed package; `read` is _dicom_units or _raster_units."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: unimed-mini source file missing from the installed {package}")
    source = _package_file(package, module_file, path)
    return Scan(key, license_, modality, region, functools.partial(read, path=path, source=source, **read_kwargs), qa)


def _dicom_scan(name: str, modality: str, region: str | None, description: str, *, facts: dict,
                ct_family: str | None = None, qa: tuple = (), drop: tuple = ()) -> Scan | None:
    """Scan entry for a DICOM test file shipped by pydicom or pydicom-data (None when it is not installed)."""
    found = get_testdata_file(name, download=False)
    if found is None:
        return None
    path = pathlib.Path(found)
    in_pydicom = pathlib.Path(pydicom.__file__).parent in path.parents
    package, license_ = ("pydicom", PYDICOM_LICENSE) if in_pydicom else ("pydicom-data", PYDICOM_DATA_LICENSE)
    module_file = pydicom.__file__ if in_pydicom else str(path.parent.parent / "__init__.py")
    return _file_scan(f"{package}/{path.stem}", package, module_file, path, license_, modality, region, _dicom_units,
                      qa, description=description, facts=facts, ct_family=ct_family, drop=drop)


def _package_scan(package: str, module: str, relative: str, license_: str, modality: str, region: str | None,
                  description: str, *, facts: dict, dicom_file: bool = False,
                  raw: tuple | None = None, tiles: int = 1, qa: tuple = (), drop: tuple = ()) -> Scan | None:
    """Scan entry for a DICOM, raw ((shape, dtype)) or raster file inside an installed package (None when the package
    is not installed)."""
    root = _module_dir(module)
    if root is None:
        return None
    path = root / relative
    key = f"{package}/{path.name.split('.')[0]}"
    if dicom_file:
        return _file_scan(key, package, str(root / "__init__.py"), path, license_, modality, region,
                          _dicom_units, qa, description=description, facts=facts, ct_family=None, drop=drop)
    if raw is not None:
        return _file_scan(key, package, str(root / "__init__.py"), path, license_, modality, region, _raw_units, qa,
                          description=description, facts=facts, shape=raw[0], dtype=raw[1])
    return _file_scan(key, package, str(root / "__init__.py"), path, license_, modality, region, _raster_units, qa,
                      description=description, facts=facts, tiles=tiles)


def _skimage_scan(file: str, modality: str, region: str | None, description: str, *, facts: dict,
                  tiles: int = 1, qa: tuple = ()) -> Scan:
    """Scan entry for an image bundled in skimage/data."""
    path = pathlib.Path(skimage.data.__file__).parent / file
    return _file_scan(f"scikit-image/{path.stem}", "scikit-image", skimage.__file__, path, SKIMAGE_LICENSES[file],
                      modality, region, _raster_units, qa, description=description, facts=facts, tiles=tiles)


def _volume_map(package_module, relative: str, name: str, description: str, facts: dict,
                pair_with: tuple = ()) -> VolumeMap:
    """VolumeMap for a NIfTI file inside an installed package."""
    path = pathlib.Path(package_module.__file__).parent / relative
    source = _package_file(package_module.__name__, package_module.__file__, path)
    return VolumeMap(path, source, name, description, facts, pair_with)


def _volume_scan(key: str, license_: str, region: str, maps: tuple[VolumeMap, ...], axes=(0, 1, 2),
                 qa: tuple = ()) -> Scan:
    """Scan entry for one or more co-registered volumes."""
    return Scan(key, license_, "MRI", region, functools.partial(_volume_units, maps=maps, axes=axes), qa)


def scans() -> list[Scan]:
    """The catalog of unimed-mini source scans available in this environment (fixed order)."""
    mr, ct, us = ({"modality_name": "MRI"}, {"modality_name": "CT"}, {"modality_name": "ultrasound"})
    mni_maps = (
        _volume_map(nilearn, "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "t1",
                    "T1-weighted brain MRI slice (MNI152 template)", {**mr, "region": "brain",
                                                                       "weighting": "T1-weighted"},
                    pair_with=("gm", "wm")),
        _volume_map(nilearn, "datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz", "gm",
                    "grey-matter probability map of the brain (MNI152 template)",
                    {**mr, "region": "brain", "derived_map": "grey-matter probability map"}),
        _volume_map(nilearn, "datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz", "wm",
                    "white-matter probability map of the brain (MNI152 template)",
                    {**mr, "region": "brain", "derived_map": "white-matter probability map"}),
    )
    catalog = [
        _dicom_scan("CT_small.dcm", "CT", None, "axial contrast-enhanced CT slice", facts=ct, ct_family="body"),
        _dicom_scan("693_UNCR.dcm", "CT", "head", "axial non-contrast head CT slice (CQ500)",
                    facts={**ct, "region": "head"}, ct_family="head"),
        _dicom_scan("explicit_VR-UN.dcm", "CT", "pancreas", "axial abdominal CT slice from a pancreas study",
                    facts={**ct, "region": "pancreas"}, ct_family="body"),
        _dicom_scan("bad_sequence.dcm", "CT", "neck", "axial CT slice of the neck",     # BodyPartExamined NECK
                    facts={**ct, "region": "neck"}, ct_family="body"),
        _dicom_scan("J2K_pixelrep_mismatch.dcm", "CT", "head", "axial head CT slice",    # BodyPartExamined HEAD
                    facts={**ct, "region": "head"}, ct_family="head"),
        _dicom_scan("eCT_Supplemental.dcm", "CT", "brain", "CT perfusion map of regional cerebral blood flow",
                    facts={**ct, "region": "brain"},
                    qa=(("What quantity does this CT perfusion map show?", "regional cerebral blood flow (rCBF)"),)),
        _dicom_scan("MR_small.dcm", "MRI", None, "spin-echo MRI slice", facts=mr),
        _dicom_scan("emri_small.dcm", "MRI", "head", "T1-weighted head MRI frame", facts={**mr, "region": "head"}),
        _dicom_scan("MR2_UNCR.dcm", "MRI", "shoulder", "T1-weighted spin-echo MRI of the shoulder",
                    facts={**mr, "region": "shoulder"}),
        _dicom_scan("MR-SIEMENS-DICOM-WithOverlays.dcm", "MRI", "abdomen",
                    "contrast-enhanced fat-suppressed T1-weighted MRI of the liver", facts={**mr, "region": "abdomen"}),
        _dicom_scan("RG1_UNCR.dcm", "CXR", "chest", "posteroanterior chest radiograph",
                    facts={"modality_name": "X-ray radiograph", "region": "chest"}),
        _dicom_scan("RG3_UNCR.dcm", "XR", "extremity", "anteroposterior radiograph of the lower leg",
                    facts={"modality_name": "X-ray radiograph", "region": "extremity"},
                    qa=(("What lesion does this radiograph show?", "non-ossifying fibroma of the distal tibia"),)),
        _dicom_scan("US1_UNCR.dcm", "US", None, "small-parts ultrasound image", facts={**us, "exam": "small parts"}),
        _dicom_scan("color3d_jpeg_baseline.dcm", "US", "heart", "epicardial cardiac ultrasound cine frame",
                    facts={**us, "exam": "epicardial echocardiography", "region": "heart"}),
        _dicom_scan("ExplVR_BigEnd.dcm", "US", "heart", "epicardial cardiac ultrasound image",
                    facts={**us, "exam": "epicardial echocardiography", "region": "heart"}),
        _dicom_scan("color-pl.dcm", "US", "heart", "transesophageal echocardiogram",
                    facts={**us, "exam": "transesophageal echocardiography", "region": "heart"}),
        _dicom_scan("OBXXXX1A.dcm", "US", None, "obstetric ultrasound image", facts={**us, "exam": "obstetric"}),
        _dicom_scan("gdcm-US-ALOKA-16.dcm", "US", "abdomen", "abdominal ultrasound image",
                    facts={**us, "exam": "abdominal", "region": "abdomen"}),
        _dicom_scan("JPGLosslessP14SV1_1s_1f_8b.dcm", "US", "heart", "adult echocardiography image",
                    facts={**us, "exam": "echocardiography", "region": "heart"}),   # ImageType CARDIOLOGY, 'Adult Echo'
        _dicom_scan("JPEG2000_UNC.dcm", "NM", "whole body", "whole-body bone scintigraphy image",
                    facts={"modality_name": "nuclear medicine", "region": "whole body"},
                    qa=(("What kind of nuclear medicine study is this?", "whole-body bone scan"),)),
        _skimage_scan("retina.jpg", "CFP", "eye", "colour fundus photograph of a normal left eye",
                      facts={"modality_name": "colour fundus photography", "region": "eye"},
                      qa=(("Which eye is shown?", "left"), ("Does this fundus look normal?", "yes"))),
        _skimage_scan("microaneurysms.png", "CFP", "eye",
                      "green-channel fundus photograph crop with microaneurysms",
                      facts={"modality_name": "colour fundus photography (green channel)", "region": "eye"},
                      qa=(("What lesions are visible in this retina crop?", "microaneurysms"),)),
        _skimage_scan("ihc.png", "HIS", "colon", "immunohistochemistry image of colonic glands", tiles=2,
                      facts={"modality_name": "immunohistochemistry (histology)", "region": "colon"},
                      qa=(("Which stains are used?", "DAB immunostaining for FHL2 with hematoxylin counterstain"),
                          ("Which tissue structures are shown?", "colonic glands"))),
        _skimage_scan("cell.png", "MIC", None, "quantitative phase microscopy image of a single cell in saline",
                      facts={"modality_name": "quantitative phase microscopy"},
                      qa=(("How many cells are shown?", "one"),)),
        _package_scan("mahotas", "mahotas", "demos/data/nuclear.png", MAHOTAS_LICENSE, "MIC", None,
                      "fluorescence microscopy image of cell nuclei",
                      facts={"modality_name": "fluorescence microscopy"}),
        _package_scan("stardist", "stardist", "data/images/img2d.tif", STARDIST_LICENSES["img2d.tif"], "MIC", None,
                      "fluorescence microscopy image of cell nuclei (2018 Data Science Bowl)",
                      facts={"modality_name": "fluorescence microscopy"}),
        _package_scan("stardist", "stardist", "data/images/histo.jpg", STARDIST_LICENSES["histo.jpg"], "HIS", None,
                      "H&E-stained histology image", facts={"modality_name": "H&E-stained histology"},
                      qa=(("Which stain is used?", "hematoxylin and eosin (H&E)"),)),
        # A maximum-intensity projection: the slice plane of its ImageOrientationPatient is not the image's plane.
        _package_scan("nibabel", "nibabel", "nicom/tests/data/slicethickness_empty_string.dcm", NIBABEL_LICENSE, "MRI",
                      None, "time-of-flight MR angiography maximum-intensity projection", facts=mr, dicom_file=True,
                      drop=("plane",), qa=(("What kind of MRI image is this?",
                                            "a time-of-flight MR angiogram, maximum-intensity projection"),)),
        _volume_scan("nilearn/MNI152-ICBM2009a-sym", MNI_LICENSE, "brain", mni_maps),
        _volume_scan("nibabel/anatomical", NIBABEL_LICENSE, "brain", (
            _volume_map(nibabel, "tests/data/anatomical.nii", "anat",
                        "low-resolution spatially normalised brain MRI slice", {**mr, "region": "brain"}),)),
        _volume_scan("nibabel/example4d", NIBABEL_LICENSE, "brain", (
            _volume_map(nibabel, "tests/data/example4d.nii.gz", "epi", "echo-planar functional MRI (fMRI) slice",
                        {**mr, "region": "brain"}),), axes=(2,),
            qa=(("What kind of MRI acquisition is this?", "echo-planar functional MRI"),)),
        _volume_scan("nibabel/scaled+tlrc", NIBABEL_LICENSE, "brain", (
            _volume_map(nibabel, "tests/data/scaled+tlrc.HEAD", "afni",
                        "low-resolution brain MRI slice in Talairach space (AFNI dataset)",
                        {**mr, "region": "brain"}),), axes=(2,)),
        # 256x256 big-endian 16-bit samples (all < 256); matplotlib's gallery (mri_demo) shows it as an MRI image and
        # documents neither the body region nor the plane, so neither is a fact here.
        _package_scan("matplotlib", "matplotlib", "mpl-data/sample_data/s1045.ima.gz", MATPLOTLIB_LICENSE, "MRI",
                      None, "MRI image", facts=mr, raw=((256, 256), ">u2")),
    ]
    return [scan for scan in catalog if scan is not None]


# --------------------------------------------------------------------------------------------- records

ALL_KINDS = ("vqa", "caption", "t2i", "sr2", "sr4", "denoise")        # every unit of a small scan gets these
ROTATION = ("caption", "t2i", "sr2", "sr4", "denoise", "special")     # units of volumes / cines get one of these
NOISE_SIGMAS = (8.0, 12.0, 16.0, 24.0)


def _special_kinds(unit: Unit) -> list[str]:
    """Paired-transform kinds a unit supports: CT window changes and T1 -> tissue-map translations."""
    kinds = [f"window-{a}-to-{b}" for a, b in CT_WINDOW_PAIRS[unit.ct_family]] if unit.hu is not None else []
    return kinds + [f"translate-to-{pair.key.split('-')[0]}" for pair in unit.pairs]


def unit_kinds(unit: Unit, index: int, many: bool) -> list[str]:
    """Task kinds for one unit: all of them for small scans, VQA + one rotating kind for volumes and cines."""
    special = _special_kinds(unit)
    if not many:
        kinds = ["vqa", *ALL_KINDS[1:], *special]
    else:
        kind = ROTATION[index % len(ROTATION)]
        if kind == "special":
            kind = special[(index // len(ROTATION)) % len(special)] if special else "caption"
        kinds = ["vqa", kind]
    short = min(unit.pixels.shape[:2])
    return [k for k in kinds if not (k.startswith("sr") and short // int(k[2:]) < MIN_SR_SIDE)]


class _RecordMaker:
    """Turns the units of one scan into records of every task kind."""

    def __init__(self, scan: Scan, split: str):
        self.scan, self.split = scan, split

    def record_id(self, unit: Unit, kind: str) -> str:
        """Stable id: unimed-mini/<scan>/<unit>/<kind>."""
        return f"{NAME}/{self.scan.key}/{unit.key}/{kind}"

    def record(self, unit: Unit, kind: str, task: str, segments: list[Segment], images: list[tuple[str, np.ndarray]],
               sources: list[str], **meta) -> Record:
        """Assemble one record; images are (image key, uint8 pixels) in the order segments reference them."""
        return Record(
            id=self.record_id(unit, kind), task=task, segments=segments, images=[encode_png(a) for _, a in images],
            modality=self.scan.modality, split=self.split, source="; ".join(dict.fromkeys(sources)),
            source_scan=self.scan.key, license=self.scan.license, body_region=self.scan.body_region,
            meta={"dataset": NAME, "kind": kind, "image_keys": [f"{self.scan.key}/{k}" for k, _ in images], **meta})

    def make(self, unit: Unit, kind: str, many: bool) -> Record:
        """One record of the given kind for a unit; random choices are seeded by the record id."""
        rng = np.random.default_rng(_seed(self.record_id(unit, kind)))
        image_in = Segment("image", "input", image=0)
        if kind == "vqa":
            turns = medical_text.qa_turns(unit.facts, self.scan.modality, self.scan.qa, rng,
                                          num_turns=int(rng.integers(2, 4)) if many else None)
            segments = [image_in] + [Segment("text", role, text=t) for q, a in turns
                                     for role, t in (("context", q), ("answer", a))]
            return self.record(unit, kind, "understanding", segments, [(unit.key, unit.pixels)], [unit.source])
        if kind == "caption":
            segments = [image_in, Segment("text", "context", text=str(rng.choice(medical_text.CAPTION_PROMPTS))),
                        Segment("text", "answer", text=medical_text.caption(unit.description, unit.facts))]
            return self.record(unit, kind, "understanding", segments, [(unit.key, unit.pixels)], [unit.source])
        if kind == "t2i":
            segments = [Segment("text", "context", text=medical_text.generation_prompt(unit.description, unit.facts,
                                                                                      rng)),
                        Segment("image", "target", image=0)]
            return self.record(unit, kind, "generation", segments, [(unit.key, unit.pixels)], [unit.source])
        if kind.startswith("sr"):
            factor, (h, w) = int(kind[2:]), unit.pixels.shape[:2]
            low = _resize(_resize(unit.pixels, (max(1, w // factor), max(1, h // factor))), (w, h))
            text = medical_text.instruction("sr", rng, desc=unit.description, factor=factor)
            return self._edit(unit, kind, (f"{unit.key}@{kind}", low), text, (unit.key, unit.pixels), factor=factor)
        if kind == "denoise":
            sigma = float(rng.choice(NOISE_SIGMAS))
            noisy = np.clip(np.rint(unit.pixels + rng.normal(0.0, sigma, unit.pixels.shape)), 0, 255).astype(np.uint8)
            text = medical_text.instruction("denoise", rng, desc=unit.description)
            return self._edit(unit, kind, (f"{unit.key}@{kind}", noisy), text, (unit.key, unit.pixels),
                              noise_sigma=sigma)
        if kind.startswith("window-"):
            src, dst = kind[len("window-"):].split("-to-")
            (sc, sw), (dc, dw) = CT_WINDOWS[src], CT_WINDOWS[dst]
            text = medical_text.instruction("window", rng, src=src, dst=dst, src_c=sc, src_w=sw, dst_c=dc, dst_w=dw)
            return self._edit(unit, kind, (f"{unit.key}@{src}", dicom.apply_window(unit.hu, sc, sw)), text,
                              (f"{unit.key}@{dst}", dicom.apply_window(unit.hu, dc, dw)),
                              windows={"input": [sc, sw], "target": [dc, dw]})
        if kind.startswith("translate-to-"):
            pair = next(p for p in unit.pairs if p.key.split("-")[0] == kind[len("translate-to-"):])
            text = medical_text.instruction("translate", rng, desc=unit.description, target=pair.description)
            return self._edit(unit, kind, (unit.key, unit.pixels), text, (pair.key, pair.pixels),
                              sources=[unit.source, pair.source])
        raise ValueError(f"unknown task kind {kind!r} for {self.record_id(unit, kind)}")

    def _edit(self, unit: Unit, kind: str, source_image: tuple, text: str, target_image: tuple, *,
              sources: list[str] | None = None, **meta) -> Record:
        """Interleaved record: input image + instruction -> target image."""
        segments = [Segment("image", "input", image=0), Segment("text", "context", text=text),
                    Segment("image", "target", image=1)]
        return self.record(unit, kind, "interleaved", segments, [source_image, target_image],
                           sources or [unit.source], **meta)


def scan_splits(catalog: list[Scan], salt: str = SALT) -> dict[str, str]:
    """{scan key: split}, stratified by modality (sources/stratified_splits.py)."""
    keys = [scan.key for scan in catalog]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate unimed-mini scan keys: {sorted(k for k in keys if keys.count(k) > 1)}")
    return stratified_splits({scan.key: scan.modality for scan in catalog}, salt=salt, fractions=SPLIT_FRACTIONS)


def generate(*, split: str | None = None, max_side: int = MAX_SIDE, salt: str = SALT) -> Iterator[Record]:
    """Yield the unimed-mini records (all splits, or only `split`) in a fixed order."""
    catalog = scans()
    splits = scan_splits(catalog, salt)
    for scan in catalog:
        scan_split = splits[scan.key]
        if split is not None and scan_split != split:
            continue
        units = scan.read(max_side)
        many = len(units) > MANY_UNITS
        maker = _RecordMaker(scan, scan_split)
        for index, unit in enumerate(units):
            for kind in unit_kinds(unit, index, many):
                yield maker.make(unit, kind, many)
