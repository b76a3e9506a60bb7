"""UniMedVL-format readers: one hand-written line per loader family -> the exact item plan (order, loss, enable_cfg,
ViT / VAE roles, which image where, which text), a two-row parquet file, bad lines and images counted with their
file and line, and the explicit plan surviving serialisation."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import tiny
from data_pipelines import unimedvl_format as fmt
from data_pipelines.bad_records import BadRecordCounter
from data_pipelines.mixture import Dataset, Group, GroupReader, GroupSource, mixture_records
from data_pipelines.sample_plan import CfgDropout, Transforms, record_to_plan
from data_pipelines.schema import BadRecord, ItemSpec, PlanSpec, Record, Segment, decode_image
from data_pipelines.transforms import ImageTransform, patchify_vit
from unimedvl_jax.packed_batch import FULL, NOISE, TEXT
from unimedvl_jax.tokenizers import SentencePieceTokenizer

MODEL = tiny.get_config().model
TRANSFORMS = Transforms(vit=ImageTransform(56, 28, 14), vae=ImageTransform(64, 32, 16))
SUFFIX = " Please also reconstruct the image at the end"
CORPUS = ["Is there an effusion? Small left effusion. Compare with the prior study. Unchanged.",
          "Increase the resolution of this MRI 4x. Here is the image. Axial abdominal CT with contrast.",
          "What if the lesion were gone? Then the liver would look normal. Please also reconstruct the image."]


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer.train(CORPUS * 20, vocab_size=MODEL.llm.vocab_size,
                                        special_ids=dict(MODEL.special_tokens))


@pytest.fixture
def images(tmp_path, writers):
    """Tiny PNGs under tmp_path/data: distinct content per file so that the test can tell them apart."""
    root = tmp_path / "data"
    (root / "cxr").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, shape in (("cxr/a.png", (40, 56)), ("cxr/b.png", (48, 48, 3)), ("lr.png", (32, 32)),
                        ("hr.png", (64, 64, 3))):
        writers.png(root / name, rng.integers(0, 256, shape, dtype=np.uint8))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    writers.png(root / "wide.png", np.zeros((1, 4096), np.uint8))
    return root


def where(loader, root, line=7):
    return fmt.Where(loader, "grp", "ds", str(root / "train.jsonl"), line, str(root))


def read(loader, entry, root):
    record, dropped = fmt.read_jsonl_line(json.dumps(entry).encode(), where(loader, root))
    assert not dropped
    return record


def plan_of(record, tok, *, seed=0, dropout=None, transforms=TRANSFORMS):
    return record_to_plan(record, tok, transforms, MODEL, np.random.default_rng(seed), dropout or CfgDropout())


def describe(record, plan, tok):
    """(kind, text or image path, loss / noised, enable_cfg) per item; text items' token ids are checked."""
    out = []
    for spec, item in zip(record.plan.items, plan.items, strict=True):
        seg = record.segments[item.segment]
        if seg.kind == "text":
            if not item.dropped:
                ids = plan.text_ids[item.start + 1: item.start + item.length - 1]
                assert ids.tolist() == tok.encode(seg.text)
            out.append(("text", seg.text, item.loss, spec.cfg))
        else:
            out.append((item.kind, record.meta["image_paths"][seg.image], item.noised if item.kind == "vae"
                        else False, spec.cfg))
    return out


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


SFT_LINE = {"input_img": [{"path": "/cxr/a.png", "height": 40}, {"path": "cxr/b.png"}],
            "message": [{"from": "system", "value": "ignored"}, human("<image>\nIs there an effusion?"),
                        gpt(" Small left effusion. "), human("Compare <image> with the prior."), gpt("Unchanged.")]}


def test_sft_ver1_restarts_the_image_index_per_turn_and_marks_vit_cfg(images, tok):
    record = read(fmt.SFT, SFT_LINE, images)
    assert record.task == "understanding" and record.id == "grp/ds/train.jsonl:7"
    plan = plan_of(record, tok)
    assert describe(record, plan, tok) == [
        ("vit", "/cxr/a.png", False, True),
        ("text", "Is there an effusion?", False, False),
        ("text", " Small left effusion. ", True, False),  # gpt answers keep their spaces
        ("text", "Compare", False, False),
        ("vit", "/cxr/a.png", False, True),  # input_img[0] again: the index restarts in every turn
        ("text", "with the prior.", False, False),
        ("text", "Unchanged.", True, False)]
    assert len(record.images) == 1  # cxr/b.png has no placeholder: unused, not loaded
    # Pixel-exact: the ViT patches are the transform of the source file.
    source = TRANSFORMS.vit(decode_image((images / "cxr/a.png").read_bytes(), record_id="a"), img_num=2)
    n = plan.vit_patches.shape[0] // 2
    np.testing.assert_array_equal(plan.vit_patches[:n], patchify_vit(source, MODEL.vit.patch_size))
    # With every dropout at 1 only the enable_cfg items (the two ViT images) vanish; rope still moves for them.
    dropped = plan_of(record, tok, dropout=CfgDropout(1.0, 1.0, 1.0))
    assert [i.dropped for i in dropped.items] == [True, False, False, False, True, False, False]
    assert dropped.items[1].rope == 1 and not np.any(dropped.token_kind != TEXT)


def test_text_only_removes_placeholders_and_collapses_whitespace(images, tok):
    entry = {"message": [human("<image> What   is\nthis  MRI?"), gpt("  Magnetic resonance. "), human("<image>")]}
    record = read(fmt.TEXT_ONLY, entry, images)
    assert describe(record, plan_of(record, tok), tok) == [
        ("text", "What is this MRI?", False, False), ("text", "Magnetic resonance.", True, False)]


RECON_LINE = {"input_img": [{"path": "cxr/a.png"}, {"path": "cxr/b.png"}],
              "message": [human("<image>\nDescribe <image>"), gpt("Two scans."), human("Any change?"), gpt("No."),
                          human(" <image> "), gpt("Ok.")]}


@pytest.mark.parametrize("loader", [fmt.RECONSTRUCTION_V1, fmt.RECONSTRUCTION_V2])
def test_visual_reconstruction_suffix_and_targets(loader, images, tok):
    record = read(loader, RECON_LINE, images)
    assert record.task == "interleaved"
    plan = plan_of(record, tok)
    clean = lambda path: [("vae", path, False, False)] if loader == fmt.RECONSTRUCTION_V2 else []  # noqa: E731
    assert describe(record, plan, tok) == [
        *clean("cxr/a.png"), ("vit", "cxr/a.png", False, False),
        ("text", "Describe" + SUFFIX, False, False),  # space-joined to the last non-empty piece
        *clean("cxr/b.png"), ("vit", "cxr/b.png", False, False),
        ("text", "Two scans.", True, False),
        ("text", "Any change?" + SUFFIX.strip(), False, False),  # no placeholder: no space
        ("text", "No.", True, False),
        *clean("cxr/a.png"), ("vit", "cxr/a.png", False, False),  # placeholders only: no suffix
        ("text", "Ok.", True, False),
        ("vae", "cxr/a.png", True, False), ("vae", "cxr/b.png", True, False)]  # every input_img as a target
    # The two targets are noised and share one rope id (noised images do not advance it).
    targets = [i for i in plan.items if i.noised]
    assert targets[0].rope == targets[1].rope
    assert set(plan.split_modes[plan.split_index[[t.start for t in targets]]]) == {NOISE}
    # Nothing is CFG-droppable in these loaders.
    assert not any(i.dropped for i in plan_of(record, tok, dropout=CfgDropout(1.0, 1.0, 1.0)).items)


EDIT_LINE = {"input_img": [{"path": "lr.png"}, {"path": "cxr/a.png"}], "output_img": [{"path": "hr.png"}],
             "message": [human("an earlier turn"), gpt("an earlier answer"),
                         human(" <image> Increase the resolution of this MRI 4x. "), gpt(" Here is the image.")]}


def test_medical_editing_keeps_the_literal_placeholder(images, tok):
    record = read(fmt.EDITING, EDIT_LINE, images)
    plan = plan_of(record, tok)
    assert describe(record, plan, tok) == [
        ("vae", "lr.png", False, False), ("vit", "lr.png", False, False),
        ("text", "<image> Increase the resolution of this MRI 4x.", False, False),  # tokenised as written
        ("text", " Here is the image.", True, False),
        ("vae", "hr.png", True, False)]
    assert plan.split_modes[plan.split_index[plan.items[0].start]] == FULL  # clean condition
    assert not any(i.dropped for i in plan_of(record, tok, dropout=CfgDropout(1.0, 1.0, 1.0)).items)


def test_counterfactual_puts_the_explanation_after_the_target(images, tok):
    entry = dict(EDIT_LINE, message=[human("<image>\nWhat if the lesion were gone? <image>"),
                                     gpt("Then the liver would look normal.")])
    record = read(fmt.COUNTERFACTUAL, entry, images)
    plan = plan_of(record, tok)
    assert describe(record, plan, tok) == [
        ("vae", "lr.png", False, False), ("vit", "lr.png", False, False),
        ("text", "What if the lesion were gone?", False, False),
        ("vae", "hr.png", True, False),
        ("text", "Then the liver would look normal.", True, False)]
    assert plan.items[-1].rope == plan.items[-2].rope  # text after a noised image shares its position


def test_t2i_jsonl_drops_bad_images_one_by_one(images, tok):
    refs = [{"path": "hr.png"}, {"path": "nope.png"}, {"path": "cxr/b.png"}]
    entry = {"output_img": json.dumps(refs), "input_img": [{"path": "lr.png"}],
             "message": [human(" Axial abdominal CT with contrast. "), gpt("Here is the image.")]}
    record, dropped = fmt.read_jsonl_line(json.dumps(entry).encode(), where(fmt.T2I_JSONL, images, line=3))
    assert record.task == "generation"
    assert describe(record, plan_of(record, tok), tok) == [
        ("text", "Axial abdominal CT with contrast.", False, True), ("text", "Here is the image.", True, False),
        ("vae", "hr.png", True, False), ("vae", "cxr/b.png", True, False)]
    assert [(e.reason, e.line) for e in dropped] == [("bad_reference", 3)]
    assert f"{images / 'train.jsonl'}:3" in str(dropped[0]) and "nope.png" in str(dropped[0])
    # With text dropout 1 the human prompt vanishes (rope unchanged), the answer stays.
    plan = plan_of(record, tok, dropout=CfgDropout(1.0, 1.0, 1.0))
    assert [i.dropped for i in plan.items] == [True, False, False, False] and plan.items[1].rope == 0
    # input_img is the fallback when output_img is absent; a row whose images all fail is rejected.
    fallback, _ = fmt.read_jsonl_line(json.dumps({**entry, "output_img": []}).encode(), where(fmt.T2I_JSONL, images))
    assert fallback.meta["image_paths"] == ["lr.png"]
    with pytest.raises(BadRecord, match="nope.png") as info:
        fmt.read_jsonl_line(json.dumps({**entry, "output_img": [refs[1]]}).encode(), where(fmt.T2I_JSONL, images))
    assert info.value.reason == "bad_reference"


def png_bytes(shape, seed):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def parquet_group(tmp_path, rows, **kw):
    path = tmp_path / "t2i" / "part-0.parquet"
    path.parent.mkdir(exist_ok=True)
    pq.write_table(pa.table({"image": [r[0] for r in rows], "captions": [r[1] for r in rows]}), path)
    ds = Dataset("t2i", str(path.parent), None, (str(path),), kw.pop("num_used", 0))
    return Group("t2i_pretrain", fmt.T2I_PARQUET, 1.0, False, (ds,), {}, **kw), path


def test_t2i_parquet_rows_and_a_deterministic_caption_choice(tmp_path, tok):
    captions = {"short": "Axial CT.", "long": "Axial abdominal CT with contrast.", "empty": " "}
    rows = [(png_bytes((32, 48, 3), 0), json.dumps(captions)), (png_bytes((64, 64), 1), json.dumps({"a": "CXR."}))]
    group, path = parquet_group(tmp_path, rows)
    source, reader = GroupSource(group), GroupReader(group)
    assert len(source) == 2
    records = [reader.read(source[i])[0] for i in range(2)]
    assert [r.id for r in records] == ["t2i_pretrain/t2i/part-0.parquet:1", "t2i_pretrain/t2i/part-0.parquet:2"]
    chosen = set()
    for seed in range(12):
        plan = plan_of(records[0], tok, seed=seed)
        kinds = [(i.kind, i.noised) for i in plan.items]
        assert kinds == [("text", False), ("vae", True)]
        chosen.add(records[0].segments[plan.items[0].segment].text)
        again = plan_of(records[0], tok, seed=seed)
        assert np.array_equal(again.text_ids, plan.text_ids)  # same rng, same caption
    assert chosen == {"Axial CT.", "Axial abdominal CT with contrast."}
    assert records[0].plan.items[0].cfg and len(records[0].plan.items[0].segments) == 2
    assert describe(records[1], plan_of(records[1], tok), tok) == [
        ("text", "CXR.", False, True), ("vae", f"{path}:2", True, False)]


def test_parquet_num_used_data_counts_files_and_repeats_them(tmp_path):
    group, _ = parquet_group(tmp_path, [(png_bytes((16, 16), 0), '{"a": "x"}')] * 3, num_used=2)
    source, reader = GroupSource(group), GroupReader(group)
    ids = [reader.read(source[i])[0].id for i in range(len(source))]
    assert ids == ["t2i_pretrain/t2i/part-0.parquet:1", "t2i_pretrain/t2i/part-0.parquet:2",
                   "t2i_pretrain/t2i/part-0.parquet:3", "t2i_pretrain/t2i/part-0.parquet#r1:1",
                   "t2i_pretrain/t2i/part-0.parquet#r1:2", "t2i_pretrain/t2i/part-0.parquet#r1:3"]


def test_bad_lines_and_images_are_counted_with_file_and_line(images, tmp_path):
    lines = [
        json.dumps(SFT_LINE),                                                              # 1 good
        "{not json",                                                                       # 2
        json.dumps({**SFT_LINE, "input_img": [{"path": "missing.png"}]}),                  # 3 missing file
        json.dumps({**SFT_LINE, "input_img": [{"path": "broken.png"}]}),                   # 4 PIL verify fails
        json.dumps({**SFT_LINE, "input_img": [{"path": "wide.png"}]}),                     # 5 side >= 4096
        json.dumps({**SFT_LINE, "message": [human("<image> no answer")]}),                 # 6 no loss item
        json.dumps({**SFT_LINE, "message": [human("<image> <image> <image>"), gpt("x")]}),  # 7 placeholder 3: none
        json.dumps({"message": [human("<image> where are the images?"), gpt("gone")]}),    # 8 no input_img
        "",                                                                                # 9 blank: skipped
        json.dumps([1, 2]),                                                                # 10 not an object
        json.dumps({**SFT_LINE, "input_img": [{"file": "a.png"}]}),                        # 11 no 'path'
    ]
    jsonl = images / "train.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    ds = Dataset("ds", str(images), str(jsonl), None, 0)
    group = Group("grp", fmt.SFT, 1.0, False, (ds,), {})
    counter = BadRecordCounter(keep_records=20)
    from data_pipelines.mixture import Mixture

    records = list(mixture_records(Mixture("mix.yaml", (group,), "0"), counter))
    assert [r.id for r in records] == ["grp/ds/train.jsonl:1"]
    assert [(r["reason"], r["line"]) for r in counter.records] == [
        ("invalid_json", 2), ("bad_reference", 3), ("unreadable_image", 4), ("oversize_image", 5),
        ("missing_field", 6), ("bad_reference", 7), ("missing_field", 8), ("missing_field", 10),
        ("missing_field", 11)]
    assert all(r["id"] == f"grp/ds/train.jsonl:{r['line']}" for r in counter.records)
    assert f"{jsonl}:5" in counter.examples["oversize_image"][0]


def test_explicit_plan_round_trips_and_is_checked(images, tok):
    record = read(fmt.RECONSTRUCTION_V2, RECON_LINE, images)
    back = Record.from_bytes(record.to_bytes())
    assert back.plan == record.plan
    assert np.array_equal(plan_of(back, tok, seed=3).text_ids, plan_of(record, tok, seed=3).text_ids)
    # A record without a plan serialises exactly as before (no 'plan' key in its header).
    plain = Record(id="r", task="understanding", segments=[Segment("text", "answer", text="x")], images=[],
                   modality="CT", split="train", source="s", source_scan="s", license="CC0")
    assert b'"plan"' not in plain.to_bytes()
    bad = [PlanSpec([ItemSpec([0], "vit")]), PlanSpec([ItemSpec([5], "text")]), PlanSpec([]),
           PlanSpec([ItemSpec([0], "text")], vae_transform={"max_size": 64})]
    for spec in bad:
        with pytest.raises(BadRecord):
            Record(**{**plain.__dict__, "plan": spec}).validate()


def test_group_transforms_replace_the_planner_transforms(images, tok):
    transforms = {"vit": {"max_size": 28, "min_size": 28, "stride": 14}, "vae": {"max_size": 32, "min_size": 32,
                                                                                  "stride": 16}}
    record, _ = fmt.read_jsonl_line(json.dumps(EDIT_LINE).encode(), where(fmt.EDITING, images), transforms)
    plan = plan_of(record, tok)
    assert [img.shape[:2] for img in plan.vae_images] == [(32, 32), (32, 32)]
    assert plan.vit_patches.shape[0] == 4  # 28 x 28 pixels = 2 x 2 patches
    default = plan_of(read(fmt.EDITING, EDIT_LINE, images), tok)
    assert [img.shape[:2] for img in default.vae_images] == [(32, 32), (64, 64)]
    record.plan.vae_transform = {"max_size": 32, "min_size": 32, "stride": 8}  # not a multiple of 16
    with pytest.raises(ValueError, match="VAE transform stride=8"):
        plan_of(record, tok)
