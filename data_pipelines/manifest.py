"""JSONL manifest importer: bring your own public dataset as one JSON object per line referencing image files.

Format (one record per line; blank lines and lines starting with '#' are ignored)::

    {"id": "vqa-1", "task": "understanding", "modality": "CT", "body_region": "chest", "split": "train",
     "source": "VQA-RAD", "license": "CC0",
     "segments": [{"image": "img/1.dcm"}, {"text": "Is there a fracture?"}, {"answer": "no"}]}

Record fields
  id            required, unique within the manifest
  task          required: 'understanding' | 'generation' | 'interleaved'
  modality      required, e.g. 'CT', 'MRI', 'CXR', 'US', 'HIS', 'CFP', 'OCT', 'endoscopy'
  license       required, the license of the source data
  segments      required, non-empty list, in sequence order (see below)
  source        optional provenance (default: the manifest file name)
  source_scan   optional scan / volume id used for splitting (default: the first image path)
  split         optional 'train' | 'val' | 'test' (default: hash of source_scan, 80/10/10, so that slices of one
                volume never straddle splits)
  body_region   optional
  meta          optional JSON object, kept as is

Segments
  {"image": PATH, "role": "input"|"target", ...}   an image file relative to the manifest's directory (absolute paths
      work too): PNG / JPEG / TIFF, DICOM (.dcm or 'DICM' magic) or NIfTI (.nii, .nii.gz, .mgz). Default role:
      'target' in generation records, 'input' otherwise (interleaved targets must say role 'target').
      DICOM options: "frame": i or "frames": [i, ...] (default: frame 0).
      NIfTI options: "axis": 0|1|2|"sagittal"|"coronal"|"axial" (default "axial"), "slice": i or "slices": [i, ...]
      (default: the middle slice), "volume": t for 4-D data (default 0).
      "frames" / "slices" expand into one image segment per entry. Images are stored as 8-bit PNG (DICOM windowed
      with its WindowCenter/Width, else a 0.5-99.5 percentile window; NIfTI with a per-volume percentile window).
  {"text": STRING, "role": "context"|"answer"}     default role 'context'
  {"question": STRING}                              shorthand for a context text
  {"answer": STRING}                                shorthand for an answer text

Bad lines never stop the import: each raises schema.BadRecord naming the manifest line and record id, which the
reader logs and counts by reason (bad_records.BadRecordCounter). Reasons: a line that is not UTF-8 ->
undecodable_line (the file is read as bytes and decoded line by line, so one bad line costs only itself); invalid
JSON -> invalid_json; an id already used by an earlier line -> duplicate_id (the first line with the id is kept); a
missing, mistyped or unknown field, role or task -> missing_field; empty text -> empty_text; a missing image file or
out-of-range frame / slice -> bad_reference; an undecodable image -> unreadable_image; zero-size / oversize images
-> zero_size_image / oversize_image. A line's record id is `<line N>` until its JSON has been read. A UTF-8 byte
order mark at the start of the file is ignored.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

from data_pipelines import dicom
from data_pipelines.bad_records import BadRecordCounter
from data_pipelines.schema import IMAGE_ROLES, SPLITS, TASKS, TEXT_ROLES, BadRecord, Record, Segment, encode_png
from data_pipelines.splits import split_for_scan

REQUIRED = ("id", "task", "modality", "license", "segments")
OPTIONAL = ("source", "source_scan", "split", "body_region", "meta")
IMAGE_OPTIONS = ("role", "frame", "frames", "slice", "slices", "axis", "volume")
SPLIT_SALT = "manifest"


def _fail(reason: str, record_id: str, where: str, detail: str) -> BadRecord:
    """BadRecord whose detail starts with `where`, 'manifest:line' (its line number is the BadRecord's line)."""
    return BadRecord(reason, record_id, f"{where}: {detail}", line=_line_of(where))


def _line_of(where: str) -> int | None:
    """N of 'manifest:N'."""
    number = where.rpartition(":")[2]
    return int(number) if number.isdigit() else None


def _text_segment(seg: dict, rid: str, where: str, i: int) -> dict:
    """Normalise a text segment (or the 'question' / 'answer' shorthand) to {'text', 'role'}."""
    keys = set(seg)
    if keys in ({"question"}, {"answer"}):
        (key,) = keys
        text, role = seg[key], "context" if key == "question" else "answer"
    elif "text" in keys and keys <= {"text", "role"}:
        text, role = seg["text"], seg.get("role", "context")
    else:
        raise _fail("missing_field", rid, where, f"segment {i} has unexpected keys {sorted(keys)}")
    if not isinstance(text, str):
        raise _fail("missing_field", rid, where, f"segment {i} text is {type(text).__name__}, not a string")
    if role not in TEXT_ROLES:
        raise _fail("missing_field", rid, where, f"segment {i} text role {role!r} not in {TEXT_ROLES}")
    if not text.strip():
        raise _fail("empty_text", rid, where, f"segment {i} has empty text")
    return {"text": text, "role": role}


def _image_segment(seg: dict, task: str, rid: str, where: str, i: int) -> dict:
    """Normalise an image segment: role default, option names and types checked (files are read later)."""
    unknown = set(seg) - {"image", *IMAGE_OPTIONS}
    if unknown:
        raise _fail("missing_field", rid, where, f"segment {i} has unknown image options {sorted(unknown)}")
    if not isinstance(seg["image"], str) or not seg["image"]:
        raise _fail("missing_field", rid, where, f"segment {i} image path must be a non-empty string")
    out = dict(seg, role=seg.get("role", "target" if task == "generation" else "input"))
    if out["role"] not in IMAGE_ROLES:
        raise _fail("missing_field", rid, where, f"segment {i} image role {out['role']!r} not in {IMAGE_ROLES}")
    for single, many in (("frame", "frames"), ("slice", "slices")):
        if single in out and many in out:
            raise _fail("missing_field", rid, where, f"segment {i} gives both {single!r} and {many!r}")
        values = out.get(many, [out[single]] if single in out else [])
        if many in out and not (isinstance(values, list) and values):
            raise _fail("missing_field", rid, where, f"segment {i} {many!r} must be a non-empty list")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise _fail("missing_field", rid, where, f"segment {i} {single} indices must be integers")
    try:
        out["axis"] = dicom.plane_axis(out.get("axis", "axial"))
    except ValueError as e:
        raise _fail("missing_field", rid, where, f"segment {i}: {e}") from e
    return out


def parse_line(line: str, lineno: int, manifest: str) -> dict | None:
    """Parse and check one manifest line without reading images; None for blank / comment lines."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    where = f"{manifest}:{lineno}"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise _fail("invalid_json", f"<line {lineno}>", where, f"invalid JSON ({e})") from e
    if not isinstance(entry, dict):
        raise _fail("missing_field", f"<line {lineno}>", where, "line is not a JSON object")
    rid = entry.get("id") if isinstance(entry.get("id"), str) and entry.get("id") else f"<line {lineno}>"
    for key in REQUIRED:
        if key not in entry or entry[key] in (None, "", []):
            raise _fail("missing_field", rid, where, f"required field {key!r} is missing or empty")
    unknown = set(entry) - set(REQUIRED) - set(OPTIONAL)
    if unknown:
        raise _fail("missing_field", rid, where, f"unknown fields {sorted(unknown)}")
    for key in ("id", "task", "modality", "license", "source", "source_scan", "split", "body_region"):
        if key in entry and entry[key] is not None and not isinstance(entry[key], str):
            raise _fail("missing_field", rid, where, f"field {key!r} must be a string")
    if entry["task"] not in TASKS:
        raise _fail("missing_field", rid, where, f"task {entry['task']!r} not in {TASKS}")
    if not isinstance(entry["segments"], list):
        raise _fail("missing_field", rid, where, "field 'segments' must be a list")
    if not isinstance(entry.get("meta", {}), dict):
        raise _fail("missing_field", rid, where, "field 'meta' must be a JSON object")
    segments = []
    for i, seg in enumerate(entry["segments"]):
        if not isinstance(seg, dict):
            raise _fail("missing_field", rid, where, f"segment {i} is not a JSON object")
        segments.append(_image_segment(seg, entry["task"], rid, where, i) if "image" in seg
                        else _text_segment(seg, rid, where, i))
    images = [s["image"] for s in segments if "image" in s]
    source_scan = entry.get("source_scan") or (images[0] if images else entry["id"])
    split = entry.get("split") or split_for_scan(source_scan, salt=SPLIT_SALT)
    if split not in SPLITS:
        raise _fail("missing_field", rid, where, f"split {split!r} not in {SPLITS}")
    return {**entry, "segments": segments, "source_scan": source_scan, "split": split,
            "source": entry.get("source") or pathlib.Path(manifest).name, "lineno": lineno}


def _read_segment_images(seg: dict, base: pathlib.Path, rid: str, where: str) -> list:
    """uint8 images of one image segment (several for 'frames' / 'slices')."""
    path = pathlib.Path(seg["image"])
    path = path if path.is_absolute() else base / path
    try:
        return dicom.read_image(path, record_id=rid, frames=seg.get("frames", [seg.get("frame", 0)]),
                                slices=seg.get("slices", [seg["slice"]] if "slice" in seg else None),
                                axis=seg["axis"], volume=seg.get("volume", 0))
    except BadRecord as e:
        raise _fail(e.reason, rid, where, e.detail) from e


def load_record(entry: dict, base: pathlib.Path, manifest: str) -> Record:
    """Read the images of a parsed entry and build a validated Record."""
    rid, where = entry["id"], f"{manifest}:{entry['lineno']}"
    segments, images = [], []
    for seg in entry["segments"]:
        if "text" in seg:
            segments.append(Segment("text", seg["role"], text=seg["text"]))
            continue
        for pixels in _read_segment_images(seg, base, rid, where):
            segments.append(Segment("image", seg["role"], image=len(images)))
            images.append(encode_png(pixels))
    record = Record(id=rid, task=entry["task"], segments=segments, images=images, modality=entry["modality"],
                    split=entry["split"], source=entry["source"], source_scan=entry["source_scan"],
                    license=entry["license"], body_region=entry.get("body_region"), meta=entry.get("meta", {}))
    try:
        return record.validate()
    except BadRecord as e:
        raise _fail(e.reason, rid, where, e.detail) from e


def _decode_line(raw: bytes, lineno: int, manifest: str) -> str:
    """One manifest line as text (a UTF-8 byte order mark on line 1 dropped); BadRecord('undecodable_line') when
    it is not UTF-8."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail("undecodable_line", _id_of(raw.decode("utf-8", "replace"), lineno), f"{manifest}:{lineno}",
                    f"not UTF-8 text (byte {e.start} of the line is {raw[e.start:e.start + 1]!r})") from e


def _id_of(text: str, lineno: int) -> str:
    """The record id of a line that is JSON but otherwise unusable, else '<line N>'."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError:
        entry = None
    rid = entry.get("id") if isinstance(entry, dict) else None
    return rid if isinstance(rid, str) and rid else f"<line {lineno}>"


class Manifest:
    """A JSONL manifest on disk; iterate its records per split, counting bad lines."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.name = self.path.name

    def entries(self, counter: BadRecordCounter | None = None) -> Iterator[dict]:
        """Parsed entries (no image IO); structurally bad lines (not UTF-8, invalid JSON, fields) and repeated ids
        are counted, not yielded (of lines sharing an id, the first is kept)."""
        seen: dict[str, int] = {}
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    entry = parse_line(_decode_line(raw, lineno, self.name), lineno, self.name)
                    if entry is not None and entry["id"] in seen:
                        raise _fail("duplicate_id", entry["id"], f"{self.name}:{lineno}",
                                    f"id duplicates the id on line {seen[entry['id']]} (that line is kept)")
                except BadRecord as e:
                    if counter is not None:
                        counter.add(e)
                    continue
                if entry is not None:
                    seen[entry["id"]] = lineno
                    yield entry

    def split_counts(self, counter: BadRecordCounter | None = None) -> dict[str, int]:
        """Number of structurally valid lines per split (counts structural errors into `counter`)."""
        counts = {}
        for entry in self.entries(counter):
            counts[entry["split"]] = counts.get(entry["split"], 0) + 1
        return counts

    def records(self, split: str | None = None, counter: BadRecordCounter | None = None, *,
                count_structural: bool = True) -> Iterator[Record]:
        """Valid records (of one split, or all); every bad line is logged and counted in `counter`.

        count_structural=False skips counting structural errors (use it when split_counts already counted them)."""
        counter = counter if counter is not None else BadRecordCounter()
        for entry in self.entries(counter if count_structural else None):
            if split is not None and entry["split"] != split:
                continue
            try:
                yield load_record(entry, self.path.parent, self.name)
            except BadRecord as e:
                counter.add(e)


def read_manifest(path, *, split: str | None = None, counter: BadRecordCounter | None = None) -> Iterator[Record]:
    """Valid records of a JSONL manifest (optionally one split); bad lines are logged and counted in `counter`."""
    return Manifest(path).records(split, counter)
