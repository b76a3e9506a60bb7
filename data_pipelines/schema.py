"""Record schema of UniMed-5M-style data: understanding, generation and interleaved samples.

A record is a sequence of segments (text or image references) plus the images themselves (PNG bytes), with
modality / body region / provenance / license metadata. Serialised as: 4-byte little-endian header length,
a JSON header, then the PNG blobs back to back (lengths in the header). No pickle.

Segment roles:
  text  'context'  prompt / question / instruction (no loss)      'answer'  answer / caption / report (CE loss)
  image 'input'    conditioning image                             'target'  image to generate (flow-matching loss)

An optional explicit plan (`Record.plan`, a PlanSpec) lists the sample's items in order instead of deriving them
from the task (docs/unimedvl_format.md "Explicit item plans"): each item names the segment(s) it uses, how it is
used ('text', 'vit', 'vae') and whether it may be CFG-dropped; a 'vae' item of a 'target' segment is the noised
generation target, of an 'input' segment a clean condition; a 'text' item of an 'answer' segment carries CE.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct

import numpy as np
from PIL import Image

from unimedvl_jax.errors import UserError

TASKS = ("understanding", "generation", "interleaved")
TEXT_ROLES = ("context", "answer")
IMAGE_ROLES = ("input", "target")
SPLITS = ("train", "val", "test")
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 20_000_000  # docs/preprocessing.md §6.1: images over 20 MP are rejected
ITEM_USES = ("text", "vit", "vae")
TRANSFORM_KEYS = ("max_size", "min_size", "stride", "max_pixels")


class BadRecord(UserError):
    """A record that cannot be used; `reason` is one of the counted bad-record kinds, `line` the manifest line it
    came from (None when it did not come from a manifest line)."""

    REASONS = ("corrupt_bytes", "missing_field", "empty_text", "unreadable_image", "zero_size_image",
               "oversize_image", "bad_reference", "undecodable_line", "invalid_json", "duplicate_id")

    def __init__(self, reason: str, record_id: str, detail: str, *, line: int | None = None):
        assert reason in self.REASONS, reason
        super().__init__(f"bad record {record_id!r} ({reason}): {detail}")
        self.reason, self.record_id, self.detail, self.line = reason, record_id, detail, line

    @classmethod
    def at(cls, reason: str, record_id: str, file: str, line: int, detail: str) -> "BadRecord":
        """A BadRecord from line `line` of `file`, its detail prefixed with 'file:line'."""
        return cls(reason, record_id, f"{file}:{line}: {detail}", line=line)


@dataclasses.dataclass
class Segment:
    """One element of a record's sequence: text with a role, or a reference to record.images[image]."""

    kind: str                 # 'text' | 'image'
    role: str                 # TEXT_ROLES or IMAGE_ROLES
    text: str | None = None
    image: int | None = None


@dataclasses.dataclass
class ItemSpec:
    """One item of an explicit plan: `segments` (one, or several of which one is chosen uniformly from the plan's
    rng), used as 'text', 'vit' or 'vae'; `cfg`: the item may be CFG-dropped (the official `enable_cfg`)."""

    segments: list[int]
    use: str
    cfg: bool = False


@dataclasses.dataclass
class PlanSpec:
    """An explicit per-item plan; `vit_transform` / `vae_transform` (ImageTransform fields, TRANSFORM_KEYS) replace
    the planner's transforms for this record when set."""

    items: list[ItemSpec]
    vit_transform: dict | None = None
    vae_transform: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "PlanSpec":
        """Inverse of dataclasses.asdict."""
        return cls([ItemSpec(**item) for item in d["items"]], d.get("vit_transform"), d.get("vae_transform"))

    def check(self, segments: list["Segment"], record_id: str) -> None:
        """Raise BadRecord('bad_reference' / 'missing_field') for an item that does not fit `segments`."""
        if not self.items:
            raise BadRecord("missing_field", record_id, "explicit plan has no items")
        used = set()
        for k, item in enumerate(self.items):
            if item.use not in ITEM_USES:
                raise BadRecord("missing_field", record_id, f"plan item {k}: use {item.use!r} not in {ITEM_USES}")
            if not item.segments or not all(isinstance(i, int) and 0 <= i < len(segments) for i in item.segments):
                raise BadRecord("bad_reference", record_id, f"plan item {k} references segments {item.segments} of "
                                                            f"{len(segments)}")
            for i in item.segments:
                seg = segments[i]
                if (seg.kind == "text") != (item.use == "text"):
                    raise BadRecord("missing_field", record_id, f"plan item {k} uses {seg.kind} segment {i} as "
                                                                f"{item.use!r}")
                if item.cfg and item.use == "vae" and seg.role == "target":
                    raise BadRecord("missing_field", record_id, f"plan item {k}: a generation target cannot be "
                                                                f"CFG-dropped")
            used.update(item.segments)
        if used != set(range(len(segments))):
            raise BadRecord("bad_reference", record_id, f"segments {sorted(set(range(len(segments))) - used)} are "
                                                        f"not used by the explicit plan")
        for name in ("vit_transform", "vae_transform"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, dict) or not {"max_size", "min_size", "stride"}
                                      <= set(value) <= set(TRANSFORM_KEYS)):
                raise BadRecord("missing_field", record_id, f"plan {name} {value!r} must hold max_size, min_size, "
                                                            f"stride and optionally max_pixels")


@dataclasses.dataclass
class Record:
    """One training/eval sample with its images and metadata."""

    id: str
    task: str
    segments: list[Segment]
    images: list[bytes]       # PNG-encoded, 8-bit grayscale or RGB
    modality: str             # e.g. 'CT', 'MRI', 'CXR', 'US', 'HIS', 'CFP', 'NM', 'IHC'
    split: str
    source: str               # dataset / file the record came from (provenance)
    source_scan: str          # scan/volume/cine the image(s) came from; splits never cut a scan
    license: str
    body_region: str | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    plan: PlanSpec | None = None  # explicit item plan (module docstring); None = derived from the task

    def to_bytes(self) -> bytes:
        """Serialise (JSON header + PNG blobs); a record without an explicit plan has no 'plan' key."""
        header = dataclasses.asdict(self)
        header.pop("images")
        if self.plan is None:
            header.pop("plan")
        header["image_lengths"] = [len(b) for b in self.images]
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        return struct.pack("<I", len(blob)) + blob + b"".join(self.images)

    @classmethod
    def from_bytes(cls, data: bytes, *, record_id: str = "<unknown>") -> "Record":
        """Parse bytes written by to_bytes; raises BadRecord('corrupt_bytes' / 'missing_field')."""
        try:
            (n,) = struct.unpack("<I", data[:4])
            header = json.loads(data[4:4 + n])
            lengths = header.pop("image_lengths")
        except (struct.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise BadRecord("corrupt_bytes", record_id, f"cannot parse record bytes ({e})") from e
        record_id = header.get("id", record_id)
        offset, images = 4 + n, []
        for length in lengths:
            images.append(bytes(data[offset:offset + length]))
            offset += length
        if offset != len(data):
            raise BadRecord("corrupt_bytes", record_id, f"image payload is {len(data) - 4 - n} bytes, header says "
                                                        f"{sum(lengths)}")
        try:
            header["segments"] = [Segment(**s) for s in header["segments"]]
            if header.get("plan") is not None:
                header["plan"] = PlanSpec.from_dict(header["plan"])
            return cls(images=images, **header)
        except (TypeError, KeyError) as e:
            raise BadRecord("missing_field", record_id, str(e)) from e

    def validate(self) -> "Record":
        """Check fields, segment references and images; raise BadRecord naming the first problem."""
        for name in ("id", "task", "modality", "split", "source", "source_scan", "license"):
            if not getattr(self, name):
                raise BadRecord("missing_field", self.id or "<no id>", f"field {name!r} is empty")
        if self.task not in TASKS:
            raise BadRecord("missing_field", self.id, f"task {self.task!r} not in {TASKS}")
        if not self.segments:
            raise BadRecord("missing_field", self.id, "no segments")
        for i, seg in enumerate(self.segments):
            if seg.kind == "text":
                if seg.role not in TEXT_ROLES:
                    raise BadRecord("missing_field", self.id, f"segment {i}: text role {seg.role!r}")
                if not seg.text or not seg.text.strip():
                    raise BadRecord("empty_text", self.id, f"segment {i} has empty text")
            elif seg.kind == "image":
                if seg.role not in IMAGE_ROLES:
                    raise BadRecord("missing_field", self.id, f"segment {i}: image role {seg.role!r}")
                if seg.image is None or not 0 <= seg.image < len(self.images):
                    raise BadRecord("bad_reference", self.id, f"segment {i} references image {seg.image} of "
                                                              f"{len(self.images)}")
            else:
                raise BadRecord("missing_field", self.id, f"segment {i}: kind {seg.kind!r}")
        if self.plan is not None:
            self.plan.check(self.segments, self.id)
        for i, data in enumerate(self.images):
            decode_image(data, record_id=self.id, index=i)
        return self


def decode_image(data: bytes, *, record_id: str, index: int = 0):
    """PNG/JPEG bytes -> PIL RGB image; raises BadRecord for unreadable, zero-size or oversize images."""
    if not data:
        raise BadRecord("zero_size_image", record_id, f"image {index} has no bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w == 0 or h == 0:
                raise BadRecord("zero_size_image", record_id, f"image {index} is {w}x{h}")
            if w * h > MAX_IMAGE_PIXELS or max(w, h) > MAX_IMAGE_SIDE:
                raise BadRecord("oversize_image", record_id, f"image {index} is {w}x{h} (> {MAX_IMAGE_PIXELS} px)")
            img.load()
            return pil_to_rgb(img)
    except BadRecord:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadRecord("unreadable_image", record_id, f"image {index}: {type(e).__name__}: {e}") from e


def pil_to_rgb(img):
    """docs/preprocessing.md §6.1 pil_img2rgb: RGBA / transparency composited on white; everything else converted to
    RGB."""
    if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info) or img.mode == "LA":
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def encode_png(array) -> bytes:
    """uint8 (H, W) or (H, W, 3) array -> PNG bytes."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {array.dtype}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
