"""Record schema: byte round trips of the three task families and every bad-record kind naming the record id."""

import dataclasses
import json
import struct

import numpy as np
import pytest

from data_pipelines.schema import BadRecord, Record, Segment, encode_png


def _png(h=8, w=10, channels=None, value=7):
    shape = (h, w) if channels is None else (h, w, channels)
    return encode_png(np.full(shape, value, np.uint8))


def _record(task="understanding", segments=None, images=None, **overrides) -> Record:
    fields = dict(id="rec-1", task=task, modality="CT", split="train", source="unit-test", source_scan="scan-1",
                  license="CC0-1.0", body_region="chest", meta={"kind": "vqa", "n": [1, 2]})
    fields.update(overrides)
    return Record(segments=segments or [Segment("image", "input", image=0), Segment("text", "context", text="Q?"),
                                        Segment("text", "answer", text="A.")],
                  images=[_png()] if images is None else images, **fields)


ROUND_TRIP = {
    "understanding-multi-turn": _record(segments=[
        Segment("image", "input", image=0), Segment("text", "context", text="Which modality?"),
        Segment("text", "answer", text="CT"), Segment("text", "context", text="Which region? ünïcode ✓"),
        Segment("text", "answer", text="chest"), Segment("image", "input", image=1),
        Segment("text", "context", text="And this one?"), Segment("text", "answer", text="the same")],
        images=[_png(), _png(5, 6, 3, 200)]),
    "generation": _record(task="generation", segments=[Segment("text", "context", text="An axial CT slice."),
                                                       Segment("image", "target", image=0)], body_region=None),
    "interleaved": _record(task="interleaved", segments=[
        Segment("image", "input", image=0), Segment("text", "context", text="Upscale 2x."),
        Segment("image", "target", image=1)], images=[_png(4, 5), _png(8, 10)]),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_round_trip(name):
    record = ROUND_TRIP[name].validate()
    data = record.to_bytes()
    back = Record.from_bytes(data)
    assert back == record
    assert back.to_bytes() == data
    assert [s.kind for s in back.segments] == [s.kind for s in record.segments]


def _header_bytes(header: dict, payload: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<I", len(blob)) + blob + payload


def _corrupt_cases():
    good = ROUND_TRIP["interleaved"]
    header = dataclasses.asdict(good)
    header.pop("images")
    header["image_lengths"] = [len(b) for b in good.images]
    no_license = {k: v for k, v in header.items() if k != "license"}
    no_segments = {k: v for k, v in header.items() if k != "segments"}
    return {
        "garbage": ("corrupt_bytes", b"\x05\x00", "rec-given"),
        "bad-json": ("corrupt_bytes", struct.pack("<I", 5) + b"{nope", "rec-given"),
        "truncated": ("corrupt_bytes", good.to_bytes()[:-3], good.id),
        "missing-license": ("missing_field", _header_bytes(no_license, b"".join(good.images)), good.id),
        "missing-segments": ("missing_field", _header_bytes(no_segments, b"".join(good.images)), good.id),
    }


@pytest.mark.parametrize("name", sorted(_corrupt_cases()))
def test_from_bytes_errors(name):
    reason, data, record_id = _corrupt_cases()[name]
    with pytest.raises(BadRecord) as info:
        Record.from_bytes(data, record_id="rec-given")
    assert info.value.reason == reason
    assert record_id in str(info.value) and info.value.record_id == record_id


VALIDATE_CASES = {
    "missing-field": ("missing_field", dict(license="")),
    "unknown-task": ("missing_field", dict(task="segmentation")),
    "empty-text": ("empty_text", dict(segments=[Segment("image", "input", image=0),
                                                Segment("text", "context", text="  ")])),
    "unreadable-image": ("unreadable_image", dict(images=[b"definitely not an image"])),
    "zero-size-image": ("zero_size_image", dict(images=[b""])),
    "oversize-side": ("oversize_image", dict(images=[encode_png(np.zeros((1, 8193), np.uint8))])),
    "oversize-pixels": ("oversize_image", dict(images=[encode_png(np.zeros((4473, 4473), np.uint8))])),
    "bad-reference": ("bad_reference", dict(segments=[Segment("image", "input", image=3),
                                                      Segment("text", "answer", text="x")])),
}


@pytest.mark.parametrize("name", sorted(VALIDATE_CASES))
def test_validate_errors_name_the_record(name):
    reason, overrides = VALIDATE_CASES[name]
    record = _record(id=f"id-{name}", **overrides)
    with pytest.raises(BadRecord) as info:
        record.validate()
    assert info.value.reason == reason
    assert f"id-{name}" in str(info.value) and info.value.record_id == f"id-{name}"


MANIFEST_LINE_REASONS = {"undecodable_line", "invalid_json", "duplicate_id"}  # test_bad_input.py, test_manifest.py


def test_every_reason_is_covered():
    covered = {r for r, _, _ in _corrupt_cases().values()} | {r for r, _ in VALIDATE_CASES.values()}
    assert covered | MANIFEST_LINE_REASONS == set(BadRecord.REASONS)
