"""Benchmark readers on small fixtures written in each benchmark's exact released format (generated images): the
items read, exactly, and every kind of bad row counted with its row named (docs/evaluation.md "Benchmark
formats")."""

import base64
import csv
import io
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipelines import tfds_builder
from unimedvl_jax.data_config import data_config
from unimedvl_jax.eval.read_report import BadRow, ReadReport
from unimedvl_jax.eval.readers import (
    READERS,
    question_family,
    read_benchmark,
    read_gmai,
    read_manifest,
    read_omnimedvqa,
    read_paired,
    read_pathvqa,
    read_slake,
    read_vqa_rad,
)


def image_bytes(seed: int, fmt: str = "PNG", size=(12, 10)) -> bytes:
    """A small random RGB image encoded as PNG / JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write(path: pathlib.Path, data) -> pathlib.Path:
    """Write bytes, or JSON for anything else, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def summary(items):
    """(id, question, answer, answer type, categories) of each item, in order."""
    return [(i.item_id, i.question, i.answer, i.answer_type, dict(i.categories)) for i in items]


# ------------------------------------------------------------------------------------------------- VQA-RAD


@pytest.fixture
def vqa_rad_json(tmp_path):
    """The public release: 'VQA_RAD Dataset Public.json' + 'VQA_RAD Image Folder/' (JPEGs), 4 good and 5 bad rows."""
    root = tmp_path / "vqa_rad"
    for name, seed in (("synpic100.jpg", 1), ("synpic200.jpg", 2)):
        write(root / "VQA_RAD Image Folder" / name, image_bytes(seed, "JPEG"))
    write(root / "VQA_RAD Image Folder" / "synpic300.jpg", b"not a jpeg at all")

    def row(qid, phrase, image, question, answer, answer_type, **extra):
        return {"qid": qid, "phrase_type": phrase, "qid_linked_id": f"link-{qid}", "image_case_url": "https://x",
                "image_name": image, "image_organ": "HEAD", "evaluation": "not evaluated", "question": question,
                "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
                "question_type": "PRES", "answer": answer, "answer_type": answer_type, **extra}

    write(root / "VQA_RAD Dataset Public.json", [
        row(0, "freeform", "synpic100.jpg", "Are regions of the brain infarcted?", "Yes", "CLOSED"),
        row(1, "test_freeform", "synpic100.jpg", "What is the mass?", "meningioma", "OPEN", question_type="ABN"),
        row(2, "test_para", "synpic200.jpg", "How many lesions are there?", 2, "OPEN ", image_organ="CHEST"),
        row(3, "test_freeform", "synpic999.jpg", "Is this an MRI?", "No", "CLOSED"),        # missing image
        row(2, "test_freeform", "synpic200.jpg", "Is the lesion solid?", "yes", "CLOSED"),  # duplicate qid
        row(5, "test_para", "synpic200.jpg", "Is it left?", "left", "MAYBE"),             # bad answer_type
        row(6, "test_para", "synpic200.jpg", "", "yes", "CLOSED"),                        # empty question
        row(7, "test_para", "synpic300.jpg", "Is it normal?", "no", "CLOSED"),            # unreadable image
        row(8, "para", "synpic200.jpg", "Is the heart enlarged?", "No", "closed"),
    ])
    return root


def test_vqa_rad_public_json(vqa_rad_json):
    report = ReadReport()
    items = read_vqa_rad(vqa_rad_json, report=report)
    assert summary(items) == [
        ("0", "Are regions of the brain infarcted?", "Yes", "closed",
         {"question_type": "PRES", "image_organ": "HEAD", "phrase_type": "freeform"}),
        ("1", "What is the mass?", "meningioma", "open",
         {"question_type": "ABN", "image_organ": "HEAD", "phrase_type": "test_freeform"}),
        ("2", "How many lesions are there?", "2", "open",
         {"question_type": "PRES", "image_organ": "CHEST", "phrase_type": "test_para"}),
        ("8", "Is the heart enlarged?", "No", "closed",
         {"question_type": "PRES", "image_organ": "HEAD", "phrase_type": "para"}),
    ]
    folder = vqa_rad_json / "VQA_RAD Image Folder"
    assert items[0].images == items[1].images == ((folder / "synpic100.jpg").read_bytes(),)
    assert items[2].images == ((folder / "synpic200.jpg").read_bytes(),)
    assert all(i.benchmark == "vqa-rad" and i.options == () for i in items)
    assert dict(report.bad) == {"missing_image": 1, "duplicate_id": 1, "bad_value": 1, "missing_field": 1,
                                "unreadable_image": 1}
    assert report.items == 4 and report.total_bad == 5
    assert "VQA_RAD Dataset Public.json[3] (qid 3)" in report.examples["missing_image"][0]
    assert "qid 2" in report.examples["duplicate_id"][0] and "[2]" in report.examples["duplicate_id"][0]
    assert "'MAYBE'" in report.examples["bad_value"][0]
    assert report.as_dict()["bad_rows"] == 5 and "skipped 5 bad rows" in report.summary()


def test_vqa_rad_public_json_split_and_file_path(vqa_rad_json):
    report = ReadReport()
    test = read_vqa_rad(vqa_rad_json / "VQA_RAD Dataset Public.json", split="test", report=report)
    assert [i.item_id for i in test] == ["1", "2"]
    assert dict(report.filtered) == {"split=train": 2}
    train = read_vqa_rad(vqa_rad_json, split="train")
    assert [i.item_id for i in train] == ["0", "8"]
    with pytest.raises(ValueError, match="split 'val' not in"):
        read_vqa_rad(vqa_rad_json, split="val")


def test_vqa_rad_strict_raises_naming_the_row(vqa_rad_json):
    with pytest.raises(BadRow, match=r"\[3\] \(qid 3\): missing_image: image file .*synpic999.jpg does not exist"):
        read_vqa_rad(vqa_rad_json, report=ReadReport(strict=True))


def test_vqa_rad_needs_its_image_folder(tmp_path, vqa_rad_json):
    json_only = write(tmp_path / "elsewhere" / "VQA_RAD Dataset Public.json",
                      json.loads((vqa_rad_json / "VQA_RAD Dataset Public.json").read_text()))
    with pytest.raises(FileNotFoundError, match="no image folder next to"):
        read_vqa_rad(json_only)
    items = read_vqa_rad(json_only, image_dir=vqa_rad_json / "VQA_RAD Image Folder")
    assert [i.item_id for i in items] == ["0", "1", "2", "8"]


def hf_image_table(rows, **extra_columns) -> pa.Table:
    """An HF `datasets` parquet table: image struct {bytes, path}, question, answer (+ extra columns)."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table({"image": pa.array([r[0] for r in rows], type=image_type),
                     "question": [r[1] for r in rows], "answer": [r[2] for r in rows], **extra_columns})


@pytest.fixture
def vqa_rad_parquet(tmp_path):
    """The HF export (flaviagiammarino/vqa-rad layout): data/{train,test}-00000-of-00001-<hash>.parquet."""
    data = tmp_path / "vqa-rad" / "data"
    data.mkdir(parents=True)
    write(data / "side.png", image_bytes(7))
    pq.write_table(hf_image_table([
        ({"bytes": image_bytes(3), "path": "a.jpg"}, "is there a pneumothorax?", "yes"),
        ({"bytes": image_bytes(4, "JPEG"), "path": None}, "where is the lesion?", "right lower lobe"),
        ({"bytes": b"garbage", "path": "c.jpg"}, "is this a ct?", "no"),                    # unreadable image
        ({"bytes": None, "path": "gone.png"}, "is the aorta dilated?", "no"),               # missing image file
        ({"bytes": None, "path": "side.png"}, "what organ is this?", "Liver"),              # image read by path
        ({"bytes": image_bytes(5), "path": None}, "is it big?", None),                      # no answer
    ]), data / "test-00000-of-00001-e5bc3d208bb4deeb.parquet")
    pq.write_table(hf_image_table([({"bytes": image_bytes(6), "path": None}, "is the heart big?", "No")]),
                   data / "train-00000-of-00001-eb8844602202be60.parquet")
    return tmp_path / "vqa-rad"


def test_vqa_rad_parquet(vqa_rad_parquet):
    report = ReadReport()
    items = read_vqa_rad(vqa_rad_parquet, split="test", report=report)
    assert summary(items) == [("test-0", "is there a pneumothorax?", "yes", "closed", {}),
                              ("test-1", "where is the lesion?", "right lower lobe", "open", {}),
                              ("test-4", "what organ is this?", "Liver", "open", {})]
    assert items[0].images == (image_bytes(3),) and items[1].images == (image_bytes(4, "JPEG"),)
    assert items[2].images == ((vqa_rad_parquet / "data" / "side.png").read_bytes(),)
    assert dict(report.bad) == {"unreadable_image": 1, "missing_image": 1, "missing_field": 1}
    assert dict(report.filtered) == {"split=train": 1}
    assert "test-00000-of-00001-e5bc3d208bb4deeb.parquet row 2" in report.examples["unreadable_image"][0]
    every = read_vqa_rad(vqa_rad_parquet)
    assert [i.item_id for i in every] == ["test-0", "test-1", "test-4", "train-0"]
    assert every[-1].answer_type == "closed"
    only_train = read_vqa_rad(next((vqa_rad_parquet / "data").glob("train-*.parquet")))
    assert [i.item_id for i in only_train] == ["train-0"]


def test_vqa_rad_folder_with_both_formats_is_ambiguous(vqa_rad_json, vqa_rad_parquet):
    for f in (vqa_rad_parquet / "data").glob("*.parquet"):
        (vqa_rad_json / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="holds both"):
        read_vqa_rad(vqa_rad_json)


# ------------------------------------------------------------------------------------------------- PathVQA


def test_pathvqa_parquet(tmp_path):
    data = tmp_path / "path-vqa" / "data"
    data.mkdir(parents=True)
    rows = [({"bytes": image_bytes(10, "JPEG"), "path": None}, "does this image show necrosis?", "Yes"),
            ({"bytes": image_bytes(11, "JPEG"), "path": None}, "what is present?", "fibrin")]
    for shard in range(2):  # a split in two shards: ids count on over the shards
        pq.write_table(hf_image_table(rows, organ=["liver", None]), data / f"test-0000{shard}-of-00002-x.parquet")
    pq.write_table(hf_image_table(rows[:1], organ=["lung"]), data / "validation-00000-of-00001-y.parquet")
    report = ReadReport()
    items = read_pathvqa(tmp_path / "path-vqa", split="test", report=report)
    assert summary(items) == [
        ("test-0", "does this image show necrosis?", "Yes", "closed", {"organ": "liver"}),
        ("test-1", "what is present?", "fibrin", "open", {}),
        ("test-2", "does this image show necrosis?", "Yes", "closed", {"organ": "liver"}),
        ("test-3", "what is present?", "fibrin", "open", {}),
    ]
    assert items[0].images == (image_bytes(10, "JPEG"),) and items[0].benchmark == "pathvqa"
    assert dict(report.filtered) == {"split=validation": 1} and report.total_bad == 0
    with pytest.raises(ValueError, match=r"no parquet file of split 'train' \(found \['test', 'validation'\]"):
        read_pathvqa(tmp_path / "path-vqa", split="train")
    bad = tmp_path / "bad" / "test-00000-of-00001.parquet"
    bad.parent.mkdir()
    pq.write_table(pa.table({"img": [b"x"], "question": ["q"], "answer": ["a"]}), bad)
    with pytest.raises(ValueError, match=r"missing columns \['image'\]"):
        read_pathvqa(bad)


# --------------------------------------------------------------------------------------------------- SLAKE


@pytest.fixture
def slake(tmp_path):
    """Slake1.0/: train.json, validate.json, test.json and imgs/xmlabN/source.jpg."""
    root = tmp_path / "Slake1.0"
    write(root / "imgs" / "xmlab0" / "source.jpg", image_bytes(20, "JPEG"))
    write(root / "imgs" / "xmlab1" / "source.jpg", image_bytes(21, "JPEG"))

    def row(qid, img, question, answer, answer_type, q_lang="en", **extra):
        return {"img_id": int(img[5:].split("/")[0]), "img_name": img, "question": question, "answer": answer,
                "q_lang": q_lang, "location": "Abdomen", "modality": "CT", "answer_type": answer_type,
                "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid, **extra}

    write(root / "test.json", [
        row(11934, "xmlab0/source.jpg", "Does the picture contain liver?", "Yes", "CLOSED"),
        row(11935, "xmlab0/source.jpg", "What modality is used to take this image?", "CT", "OPEN",
            content_type="Modality"),
        row(11936, "xmlab0/source.jpg", "图中有肝脏吗?", "是", "CLOSED", q_lang="zh"),
        row(11937, "xmlab9/source.jpg", "Is this a CT?", "Yes", "CLOSED"),                  # missing image
        row(11935, "xmlab1/source.jpg", "Where is the liver?", "Left", "OPEN"),            # duplicate qid
        row(11938, "xmlab1/source.jpg", "Which organ is abnormal?", "The ?", "OPEN"),      # normalises to ""
        row(11939, "xmlab1/source.jpg", "How many kidneys?", "2", "OPEN", location="Pelvic Cavity"),
        ["not", "an", "object"],                                                            # not a row
    ])
    write(root / "validate.json", [row(5000, "xmlab1/source.jpg", "Is this MRI?", "No", "CLOSED")])
    write(root / "train.json", [row(1, "xmlab1/source.jpg", "Is this MRI?", "No", "CLOSED")])
    return root


def test_slake_english_test_split(slake):
    report = ReadReport()
    items = read_slake(slake, report=report)
    cats = {"location": "Abdomen", "modality": "CT", "content_type": "Organ", "base_type": "vqa"}
    assert summary(items) == [
        ("11934", "Does the picture contain liver?", "Yes", "closed", cats),
        ("11935", "What modality is used to take this image?", "CT", "open", {**cats, "content_type": "Modality"}),
        ("11939", "How many kidneys?", "2", "open", {**cats, "location": "Pelvic Cavity"}),
    ]
    assert items[0].images == ((slake / "imgs" / "xmlab0" / "source.jpg").read_bytes(),)
    assert dict(report.filtered) == {"q_lang=zh": 1}
    assert dict(report.bad) == {"missing_image": 1, "duplicate_id": 1, "empty_answer": 1, "missing_field": 1}
    assert "test.json[7]" in report.examples["missing_field"][0]


def test_slake_languages_splits_and_files(slake):
    both = read_slake(slake, q_lang=None)
    assert [i.item_id for i in both] == ["11934", "11935", "11936", "11939"]
    assert both[2].question == "图中有肝脏吗?" and both[2].answer == "是"
    assert [i.item_id for i in read_slake(slake, split="validation")] == ["5000"]
    assert [i.item_id for i in read_slake(slake, split=None)] == ["1", "5000", "11934", "11935", "11939"]
    assert [i.item_id for i in read_slake(slake / "validate.json", split="validation")] == ["5000"]
    with pytest.raises(ValueError, match="is not the 'test' file of SLAKE"):
        read_slake(slake / "validate.json")
    (slake / "validate.json").rename(slake / "validation.json")  # the HF copy (BoKelvin/SLAKE) spells it so
    assert [i.item_id for i in read_slake(slake, split="validation")] == ["5000"]


# ---------------------------------------------------------------------------------------------- OmniMedVQA


@pytest.fixture
def omnimedvqa(tmp_path):
    """OmniMedVQA/: QA_information/Open-access/{ACRIMA,Chest CT Scan}.json and Images/..."""
    root = tmp_path / "OmniMedVQA"
    write(root / "Images" / "ACRIMA" / "Im001_g.png", image_bytes(30))
    write(root / "Images" / "Chest CT Scan" / "scan1.png", image_bytes(31))
    qa = root / "QA_information" / "Open-access"

    def row(qid, image, gt, options, question="What is the diagnosis?", **extra):
        return {"dataset": image.split("/")[1], "question_id": qid, "question_type": "Disease Diagnosis",
                "question": question, "gt_answer": gt, "image_path": image,
                **{f"option_{k}": v for k, v in options.items()}, "modality_type": "Fundus Photography", **extra}

    write(qa / "ACRIMA.json", [
        row("ACRIMA_0000", "Images/ACRIMA/Im001_g.png", "Glaucoma",
            {"A": "Normal", "B": "Glaucoma", "C": "Cataract", "D": "Diabetic retinopathy"}),
        row("ACRIMA_0001", "Images/ACRIMA/Im001_g.png", "No, It's normal.",
            {"A": "Glaucoma", "B": "No, It's normal.", "C": "Cataract"}),                      # option_D missing
        row("ACRIMA_0002", "Images/ACRIMA/Im001_g.png", "Macular hole",
            {"A": "Glaucoma", "B": "Normal", "C": "Cataract", "D": "Myopia"}),                  # gt matches none
        row("ACRIMA_0003", "Images/ACRIMA/Im001_g.png", "glaucoma.",
            {"A": "Normal", "B": "Glaucoma"}),                                                  # after normalisation
        row("ACRIMA_0004", "Images/ACRIMA/missing.png", "Normal", {"A": "Normal", "B": "Glaucoma"}),
    ])
    ct = row("Chest CT Scan_0000", "Images/Chest CT Scan/scan1.png", "CT", {"A": "MR", "B": "CT", "C": "X-Ray"},
             question="What modality is shown?", question_type="Modality Recognition")
    ct["modality"] = ct.pop("modality_type")  # the one file that spells the key 'modality'
    ct["modality"] = "CT(Computed Tomography)"
    write(qa / "Chest CT Scan.json", [ct])
    return root


def test_omnimedvqa(omnimedvqa):
    report = ReadReport()
    items = read_omnimedvqa(omnimedvqa, report=report)
    fundus = {"question_type": "Disease Diagnosis", "dataset": "ACRIMA", "modality": "Fundus Photography"}
    assert [(i.item_id, i.answer, i.options, dict(i.categories)) for i in items] == [
        ("ACRIMA_0000", "B", (("A", "Normal"), ("B", "Glaucoma"), ("C", "Cataract"), ("D", "Diabetic retinopathy")),
         fundus),
        ("ACRIMA_0001", "B", (("A", "Glaucoma"), ("B", "No, It's normal."), ("C", "Cataract")), fundus),
        ("ACRIMA_0003", "B", (("A", "Normal"), ("B", "Glaucoma")), fundus),
        ("Chest CT Scan_0000", "B", (("A", "MR"), ("B", "CT"), ("C", "X-Ray")),
         {"question_type": "Modality Recognition", "dataset": "Chest CT Scan", "modality": "CT(Computed Tomography)"}),
    ]
    assert all(i.answer_type == "choice" and i.benchmark == "omnimedvqa" for i in items)
    assert items[0].images == ((omnimedvqa / "Images" / "ACRIMA" / "Im001_g.png").read_bytes(),)
    assert dict(report.bad) == {"no_matching_option": 1, "missing_image": 1}
    message = report.examples["no_matching_option"][0]
    assert "QA_information/Open-access/ACRIMA.json[2] (question_id ACRIMA_0002)" in message
    assert "'Macular hole' equals none of the options" in message
    assert dict(report.notes) == {"gt_answer matched an option only after normalisation": 1,
                                  "modality spelled 'modality' (not 'modality_type')": 1}
    again = read_omnimedvqa(omnimedvqa / "QA_information" / "Open-access")  # the QA folder itself works too
    assert [i.item_id for i in again] == [i.item_id for i in items]


# ------------------------------------------------------------------------------------------------ GMAI-MMBench


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def gmai_tsv(tmp_path):
    """A VLMEvalKit GMAI-MMBench VAL TSV written as pandas does (tab-separated, quoted where needed)."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "E", "answer", "image", "category",
              "clinical vqa task", "department", "perceptual granularity"]
    img1, img2, img3 = image_bytes(40), image_bytes(41, "JPEG"), image_bytes(42)
    rows = [
        [1, "What modality is this?", "", "CT", "MRI", "X-ray", "Ultrasound", "", "B", b64(img1), "MRI",
         "Modality Recognition", "Radiology", "image level"],
        [2, "Which\tstructure is \"marked\"?", "", "Liver", "Spleen", "Kidney", "Heart", "Lung", "E",
         str([b64(img2), b64(img3)]), "Lung", "Anatomical Structure Recognition", "Thoracic", "mask level"],
        [3, "Is there a lesion?", "Patient is 45 years old.", "Yes", "No", "", "", "", "A", "1", "Yes",
         "Lesion Detection", "", "image level"],                                    # image shared with index 1
        [4, "Broken image?", "", "a", "b", "", "", "", "A", "@" * 100, "a", "x", "y", "z"],   # not base64
        [5, "Dangling reference?", "", "a", "b", "", "", "", "A", "99", "a", "x", "y", "z"],  # no row 99
        [6, "Bad letter?", "", "a", "b", "", "", "", "F", b64(img1), "a", "x", "y", "z"],      # F is no option
        [1, "Duplicate index?", "", "a", "b", "", "", "", "A", b64(img1), "a", "x", "y", "z"],
        [7, "", "", "a", "b", "", "", "", "A", b64(img1), "a", "x", "y", "z"],                 # empty question
        [8, "Not an image?", "", "a", "b", "", "", "", "A", b64(b"just some text, not an image" * 3), "a", "x",
         "y", "z"],
    ]
    path = tmp_path / "GMAI-MMBench_VAL.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path, (img1, img2, img3)


def test_gmai_tsv(gmai_tsv):
    path, (img1, img2, img3) = gmai_tsv
    report = ReadReport()
    items = read_gmai(path, report=report)
    assert [(i.item_id, i.question, i.answer, i.options, dict(i.categories)) for i in items] == [
        ("1", "What modality is this?", "B", (("A", "CT"), ("B", "MRI"), ("C", "X-ray"), ("D", "Ultrasound")),
         {"category": "MRI", "clinical vqa task": "Modality Recognition", "department": "Radiology",
          "perceptual granularity": "image level"}),
        ("2", "Which\tstructure is \"marked\"?", "E",
         (("A", "Liver"), ("B", "Spleen"), ("C", "Kidney"), ("D", "Heart"), ("E", "Lung")),
         {"category": "Lung", "clinical vqa task": "Anatomical Structure Recognition", "department": "Thoracic",
          "perceptual granularity": "mask level"}),
        ("3", "Patient is 45 years old.\nIs there a lesion?", "A", (("A", "Yes"), ("B", "No")),
         {"category": "Yes", "clinical vqa task": "Lesion Detection", "perceptual granularity": "image level"}),
    ]
    assert [i.images for i in items] == [(img1,), (img2, img3), (img1,)]
    assert all(i.answer_type == "choice" and i.benchmark == "gmai" for i in items)
    assert dict(report.bad) == {"bad_base64": 1, "bad_image_reference": 1, "bad_value": 1, "duplicate_id": 1,
                                "missing_field": 1, "unreadable_image": 1}
    assert "GMAI-MMBench_VAL.tsv line 5 (index 4)" in report.examples["bad_base64"][0]
    assert "gold letter 'F'" in report.examples["bad_value"][0]
    assert "line 2 (index 1)" in report.examples["duplicate_id"][0]


def test_gmai_test_file_without_answers(tmp_path):
    path = tmp_path / "GMAI-MMBench_TEST.tsv"
    path.write_text("index\tquestion\tA\tB\timage\n1\tq\ta\tb\txx\n")
    with pytest.raises(ValueError, match=r"missing columns \['answer'\] \(the TEST file withholds answers"):
        read_gmai(path)


# --------------------------------------------------------------------------------------------- our own records


@pytest.fixture
def own_manifest(tmp_path):
    """A data_pipelines JSONL manifest: understanding records (the unimed-mini question families), a generation
    record, a train-split record and a line whose image is missing."""
    write(tmp_path / "img" / "mr.png", image_bytes(50))
    write(tmp_path / "img" / "ct.png", image_bytes(51))
    base = {"license": "CC0-1.0", "source": "mini", "split": "test"}
    lines = [
        {**base, "id": "mr-1", "task": "understanding", "modality": "MRI",
         "segments": [{"image": "img/mr.png"}, {"question": "What imaging modality is this?"}, {"answer": "MRI"},
                      {"question": "Is this a CT scan?"}, {"answer": "no"},
                      {"question": "Which part of the volume is this axial slice from?"},
                      {"answer": "the upper third"}]},
        {**base, "id": "ct-1", "task": "understanding", "modality": "CT", "source": "other",
         "segments": [{"image": "img/ct.png"}, {"question": "Describe this image."},
                      {"answer": "An axial CT slice of the abdomen."}, {"question": "Is the liver enlarged?"},
                      {"answer": "Yes"}, {"question": "Where is the lesion?"}, {"answer": "segment 4"}]},
        {**base, "id": "gen-1", "task": "generation", "modality": "CT",
         "segments": [{"text": "Generate a CT."}, {"image": "img/ct.png"}]},
        {**base, "id": "train-1", "task": "understanding", "modality": "CT", "split": "train",
         "segments": [{"image": "img/ct.png"}, {"question": "Is this a CT scan?"}, {"answer": "yes"}]},
        {**base, "id": "gone", "task": "understanding", "modality": "CT",
         "segments": [{"image": "img/gone.png"}, {"question": "Is this a CT scan?"}, {"answer": "yes"}]},
    ]
    path = tmp_path / "own.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


EXPECTED_OWN = [
    ("mr-1#0", "What imaging modality is this?", "MRI", "closed",
     {"modality": "MRI", "source": "mini", "question": "modality_name"}),
    ("mr-1#1", "Is this a CT scan?", "no", "closed",
     {"modality": "MRI", "source": "mini", "question": "modality_yes_no"}),
    ("mr-1#2", "Which part of the volume is this axial slice from?", "the upper third", "closed",
     {"modality": "MRI", "source": "mini", "question": "position"}),
    ("ct-1#0", "Describe this image.", "An axial CT slice of the abdomen.", "open",
     {"modality": "CT", "source": "other", "question": "caption"}),
    ("ct-1#1", "Is the liver enlarged?", "Yes", "closed", {"modality": "CT", "source": "other", "question": "other"}),
    ("ct-1#2", "Where is the lesion?", "segment 4", "open", {"modality": "CT", "source": "other", "question": "other"}),
]


def test_manifest_jsonl(own_manifest):
    report = ReadReport()
    items = read_manifest(own_manifest, report=report)
    assert summary(items) == EXPECTED_OWN
    png = np.asarray(Image.open(io.BytesIO(items[0].images[0])))
    assert png.shape == (10, 12, 3)  # re-encoded as PNG by the manifest reader, pixels unchanged
    np.testing.assert_array_equal(png, np.asarray(Image.open(own_manifest.parent / "img" / "mr.png")))
    assert dict(report.filtered) == {"split=train": 1, "task=generation": 1}
    assert dict(report.bad) == {"bad_record": 1} and "gone" in report.examples["bad_record"][0]
    assert [i.item_id for i in read_manifest(own_manifest, split="train")] == ["train-1#0"]
    with pytest.raises(ValueError, match=r"split 'validation' not in \('train', 'val', 'test'\)"):
        read_manifest(own_manifest, split="validation")
    with pytest.raises(FileNotFoundError, match="neither a JSONL manifest nor a built dataset folder"):
        read_manifest(own_manifest.parent)


def test_manifest_built_dataset_and_data_config(own_manifest, tmp_path):
    builder, _ = tfds_builder.build(tfds_builder.ManifestSource(own_manifest), tmp_path / "data")
    by_config = read_manifest(data_config(data_dir=str(tmp_path / "data"), dataset=builder.builder_config.name))
    by_folder = read_manifest(str(builder.data_dir))
    assert sorted(summary(by_config)) == sorted(summary(by_folder)) == sorted(EXPECTED_OWN)  # TFDS shuffles


def test_question_family():
    assert question_family("Is this an axial, coronal or sagittal image?") == "plane"
    assert question_family("Is this an MRI scan?") == "modality_yes_no"
    assert question_family("Write a short caption for this medical image.") == "caption"
    assert question_family("Is there a fracture?") == "other"


# ---------------------------------------------------------------------------------------- paired image tasks


def test_paired_manifest(tmp_path):
    for name, seed in (("lr.png", 60), ("hr.png", 61), ("t2.png", 62), ("flair.png", 63)):
        write(tmp_path / "pairs" / name, image_bytes(seed))
    lines = [
        {"id": "sr-1", "input": "pairs/lr.png", "instruction": "Increase the resolution by 4x.",
         "target": "pairs/hr.png", "task": "sr4x", "modality": "MRI"},
        {"id": "t2f-1", "input": "pairs/t2.png", "instruction": "Convert T2 to FLAIR.", "target": "pairs/flair.png",
         "task": "t2_to_flair", "slice": 12},
        {"id": "sr-2", "input": "pairs/lr.png", "instruction": "Upscale.", "target": "pairs/none.png"},
        {"id": "sr-1", "input": "pairs/lr.png", "instruction": "Again.", "target": "pairs/hr.png"},
        {"id": "sr-3", "input": "pairs/lr.png", "target": "pairs/hr.png"},
        {"id": "sr-4", "input": "pairs/lr.png", "instruction": "x", "target": "pairs/hr.png", "meta": {"a": 1}},
    ]
    text = "# pairs\n" + "\n".join(json.dumps(line) for line in lines) + "\n\n{broken json\n"
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    report = ReadReport()
    items = read_paired(path, report=report)
    assert [(i.item_id, i.instruction, dict(i.categories)) for i in items] == [
        ("sr-1", "Increase the resolution by 4x.", {"task": "sr4x", "modality": "MRI"}),
        ("t2f-1", "Convert T2 to FLAIR.", {"task": "t2_to_flair", "slice": "12"}),
    ]
    assert items[0].input_image == (tmp_path / "pairs" / "lr.png").read_bytes()
    assert items[1].target_image == (tmp_path / "pairs" / "flair.png").read_bytes()
    assert dict(report.bad) == {"missing_image": 1, "duplicate_id": 1, "missing_field": 1, "bad_value": 2}
    assert "pairs.jsonl:4 (id sr-2) target" in report.examples["missing_image"][0]
    assert "pairs.jsonl:9" in " ".join(report.examples["bad_value"])


# ------------------------------------------------------------------------------------------------- dispatch


def test_read_benchmark_dispatch(slake, tmp_path):
    assert sorted(READERS) == ["gmai", "manifest", "omnimedvqa", "pathvqa", "slake", "vqa-rad"]
    assert [i.item_id for i in read_benchmark("slake", slake, q_lang=None, split="test")] == \
        ["11934", "11935", "11936", "11939"]
    with pytest.raises(ValueError, match="unknown benchmark 'mmmu'"):
        read_benchmark("mmmu", slake)
    with pytest.raises(ValueError, match=r"benchmark 'gmai' does not take options \['split'\]"):
        read_benchmark("gmai", slake, split="test")


def test_a_benchmark_with_no_usable_item_raises(tmp_path):
    root = tmp_path / "Slake1.0"
    (root / "imgs").mkdir(parents=True)
    write(root / "test.json", [{"qid": 1, "img_name": "xmlab0/source.jpg", "question": "q", "answer": "a",
                                "q_lang": "en", "answer_type": "OPEN"}])
    with pytest.raises(ValueError, match=r"no usable slake items .*missing_image: 1"):
        read_slake(root)
