"""Benchmark readers: the released files of VQA-RAD, SLAKE, PathVQA, OmniMedVQA, GMAI-MMBench and our own records
-> EvalItems; image-to-image JSONL manifests -> PairedItems. Unusable rows are skipped and counted by reason in a
ReadReport naming the file and row (or raised, with ReadReport(strict=True)); a reader that ends with no item
raises (docs/evaluation.md "Benchmark formats")."""

from __future__ import annotations

import ast
import csv
import inspect
import json
import logging
import os
import pathlib
import re
from collections.abc import Iterator

import pyarrow.parquet as pq

from data_pipelines.loader import open_split
from data_pipelines.manifest import Manifest
from data_pipelines.pipeline import record_bytes
from data_pipelines.schema import SPLITS, BadRecord, Record
from data_pipelines.sources import medical_text
from data_pipelines.tfds_builder import data_source
from unimedvl_jax.eval.answer_text import YES_NO, normalize_answer
from unimedvl_jax.eval.items import EvalItem, PairedItem
from unimedvl_jax.eval.read_report import BadRow, ReadReport
from unimedvl_jax.eval.row_images import ImageFiles, check_image, decode_base64_image

log = logging.getLogger(__name__)

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGE_DIRS = ("VQA_RAD Image Folder", "images")
SLAKE_FILES = {"train": ("train.json",), "validation": ("validation.json", "validate.json"), "test": ("test.json",)}
OMNIMEDVQA_QA_DIR = ("QA_information", "Open-access")
GMAI_CORE = ("index", "question", "hint", "answer", "image", "image_path")  # every other non-letter column: category
VLMEVALKIT_IMAGE_REFERENCE_CHARS = 64  # an image cell this short holds the index of the row that has the image
PARQUET_QA_COLUMNS = ("image", "question", "answer")
_OPTION_KEY = re.compile(r"^option_([A-Z])$")


class _Reading:
    """State of one reader call: the report, the items so far, the ids seen and the image files read."""

    def __init__(self, benchmark: str, source, report: ReadReport | None):
        self.benchmark, self.source = benchmark, str(source)
        self.report = report if report is not None else ReadReport()
        self.report.source = self.report.source or self.source
        self.items: list = []
        self.seen: dict[str, str] = {}
        self.files = ImageFiles()

    def check_new_id(self, item_id: str, where: str) -> None:
        """BadRow('duplicate_id') naming the row that used the id first (checked before reading images)."""
        if item_id in self.seen:
            raise BadRow("duplicate_id", where, f"id {item_id!r} was already used by {self.seen[item_id]}")

    def add(self, where: str, *, item_id: str, images: tuple, question: str, answer: str, answer_type: str,
            options: tuple = (), categories: dict | None = None) -> None:
        """Validate and keep one EvalItem (checks id uniqueness, empty question / answer, the item schema)."""
        if not question.strip():
            raise BadRow("missing_field", where, "the question is empty")
        if answer_type != "choice" and not normalize_answer(answer):
            raise BadRow("empty_answer", where, f"answer {answer!r} normalises to nothing")
        try:
            item = EvalItem(self.benchmark, item_id, images, question.strip(), answer.strip(), answer_type,
                            options, categories or {})
        except ValueError as e:
            raise BadRow("bad_value", where, str(e)) from e
        self.check_new_id(item_id, where)
        self.seen[item_id] = where
        self.items.append(item)

    def finish(self) -> list:
        """The items read; raises when there are none (the report says why)."""
        self.report.items = len(self.items)
        if not self.items:
            raise ValueError(f"no usable {self.benchmark} items in {self.source}: {self.report.summary()}")
        (log.warning if self.report.total_bad else log.info)("%s: %s", self.benchmark, self.report.summary())
        return self.items


def _field(row: dict, key: str, where: str) -> str:
    """A required scalar field as stripped text; BadRow('missing_field') if absent, null or empty."""
    value = row.get(key)
    if value is None or isinstance(value, (dict, list)) or not str(value).strip():
        raise BadRow("missing_field", where, f"field {key!r} is missing or empty")
    return str(value).strip()


def _optional(row: dict, keys: tuple[str, ...]) -> dict[str, str]:
    """The present, non-empty scalar fields among `keys` as stripped text (category columns)."""
    return {k: str(row[k]).strip() for k in keys
            if row.get(k) is not None and not isinstance(row[k], (dict, list)) and str(row[k]).strip()}


def _answer_type(row: dict, where: str) -> str:
    """'closed' / 'open' from an OPEN / CLOSED answer_type field (case and spaces ignored)."""
    value = _field(row, "answer_type", where).upper()
    if value not in ("OPEN", "CLOSED"):
        raise BadRow("bad_value", where, f"answer_type {row['answer_type']!r} is not OPEN / CLOSED")
    return value.lower()


def _load_json_list(path: pathlib.Path) -> list:
    """A JSON file holding a list of rows; ValueError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a UTF-8 JSON file ({e})") from e
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of question rows, got {type(rows).__name__}")
    return rows


def _rows(reading: _Reading, rows, where_of) -> Iterator[tuple[str, dict]]:
    """(where, row) of every JSON object row; non-object rows are counted as bad."""
    for i, row in enumerate(rows):
        where = where_of(i)
        if isinstance(row, dict):
            yield where, row
        else:
            reading.report.bad_row(BadRow("missing_field", where, f"row is a {type(row).__name__}, not an object"))


def _check_split(split: str | None, allowed: tuple[str, ...], benchmark: str) -> None:
    """ValueError for a split name the benchmark does not have."""
    if split is not None and split not in allowed:
        raise ValueError(f"{benchmark}: split {split!r} not in {allowed} (or None for all)")


def _closed_if_yes_no(answer: str) -> str:
    """'closed' for yes / no answers, else 'open' (the convention of the HF exports, which carry no answer type)."""
    return "closed" if normalize_answer(answer) in YES_NO else "open"


# --------------------------------------------------------------------------------------------------- VQA-RAD


def read_vqa_rad(path, *, split: str | None = None, image_dir=None, report: ReadReport | None = None) -> list[EvalItem]:
    """VQA-RAD: the public release ("VQA_RAD Dataset Public.json" + "VQA_RAD Image Folder") or the HF parquet
    export; `path` = the JSON file, its folder, a parquet file or a folder of them; split None (all), 'train' or
    'test' (JSON: phrase_type test_freeform / test_para; parquet: the file-name prefix)."""
    path = pathlib.Path(path)
    _check_split(split, ("train", "test"), "vqa-rad")
    if path.is_file():
        if path.suffix == ".json":
            return _read_vqa_rad_json(path, split, image_dir, report)
        if path.suffix == ".parquet":
            return _read_qa_parquet("vqa-rad", path, split, report)
        raise ValueError(f"{path}: VQA-RAD is a .json file (the public release) or .parquet files (the HF export)")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such VQA-RAD file or folder")
    has_json, parquet = (path / VQA_RAD_JSON).is_file(), sorted(path.rglob("*.parquet"))
    if has_json and parquet:
        raise ValueError(f"{path} holds both {VQA_RAD_JSON!r} and parquet files; pass the one to read")
    if has_json:
        return _read_vqa_rad_json(path / VQA_RAD_JSON, split, image_dir, report)
    if parquet:
        return _read_qa_parquet("vqa-rad", path, split, report)
    raise FileNotFoundError(f"{path}: neither {VQA_RAD_JSON!r} nor any *.parquet file")


def _read_vqa_rad_json(path: pathlib.Path, split, image_dir, report) -> list[EvalItem]:
    """The public VQA-RAD JSON list with its image folder."""
    if image_dir is None:
        found = [path.parent / d for d in VQA_RAD_IMAGE_DIRS if (path.parent / d).is_dir()]
        if not found:
            raise FileNotFoundError(f"no image folder next to {path} (looked for {VQA_RAD_IMAGE_DIRS}); pass "
                                    f"image_dir=")
        image_dir = found[0]
    image_dir = pathlib.Path(image_dir)
    reading = _Reading("vqa-rad", path, report)
    for where, row in _rows(reading, _load_json_list(path), lambda i: f"{path.name}[{i}]"):
        try:
            qid = _field(row, "qid", where)
            where = f"{where} (qid {qid})"
            if split is not None:
                row_split = "test" if _field(row, "phrase_type", where).startswith("test") else "train"
                if row_split != split:
                    reading.report.filter(f"split={row_split}")
                    continue
            answer_type = _answer_type(row, where)
            image = reading.files.read(image_dir / _field(row, "image_name", where), where)
            reading.add(where, item_id=qid, images=(image,), question=_field(row, "question", where),
                        answer=_field(row, "answer", where), answer_type=answer_type,
                        categories=_optional(row, ("question_type", "image_organ", "phrase_type")))
        except BadRow as e:
            reading.report.bad_row(e)
    return reading.finish()


# ------------------------------------------------------------------------------------------ HF parquet exports


def _hf_split(path: pathlib.Path) -> str:
    """The split of an HF parquet file from its name: 'test-00000-of-00001-ab12.parquet' / 'test.parquet' -> 'test'."""
    return path.name.split("-", 1)[0].removesuffix(".parquet")


def _parquet_image(cell, parquet: pathlib.Path, files: ImageFiles, where: str) -> bytes:
    """Image bytes of an HF image cell ({bytes, path} struct, or raw bytes); a null `bytes` reads `path`."""
    if isinstance(cell, (bytes, bytearray)):
        return check_image(bytes(cell), where)
    if not isinstance(cell, dict):
        raise BadRow("missing_field", where, f"image cell is {type(cell).__name__}, not an HF image struct")
    if cell.get("bytes"):
        return check_image(bytes(cell["bytes"]), where)
    if cell.get("path"):
        relative = parquet.parent / cell["path"]
        return files.read(relative if relative.is_file() else pathlib.Path(cell["path"]), where)
    raise BadRow("missing_field", where, "image cell has neither bytes nor a path")


def _read_qa_parquet(benchmark: str, path: pathlib.Path, split: str | None, report) -> list[EvalItem]:
    """HF parquet exports with image / question / answer columns (VQA-RAD, PathVQA); ids '<split>-<row>' counted
    over the split's files in name order; closed = yes / no answers; other scalar columns become categories."""
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.parquet file")
    by_split: dict[str, list[pathlib.Path]] = {}
    for f in files:
        by_split.setdefault(_hf_split(f), []).append(f)
    if split is not None and split not in by_split:
        raise ValueError(f"{path}: no parquet file of split {split!r} (found {sorted(by_split)}; HF files are named "
                         f"<split>-00000-of-00001-<hash>.parquet)")
    reading = _Reading(benchmark, path, report)
    for name, split_files in sorted(by_split.items()):
        if split is not None and name != split:
            reading.report.filter(f"split={name}", sum(pq.ParquetFile(f).metadata.num_rows for f in split_files))
            continue
        row_index = 0
        for f in split_files:
            parquet = pq.ParquetFile(f)
            columns = parquet.schema_arrow.names
            missing = [c for c in PARQUET_QA_COLUMNS if c not in columns]
            if missing:
                raise ValueError(f"{f}: missing columns {missing} (has {columns}); expected the HF export's "
                                 f"{PARQUET_QA_COLUMNS}")
            extra = [c for c in columns if c not in PARQUET_QA_COLUMNS]
            k = 0
            for batch in parquet.iter_batches(batch_size=64):
                for row in batch.to_pylist():
                    where, item_id = f"{f.name} row {k}", f"{name}-{row_index}"
                    k, row_index = k + 1, row_index + 1
                    try:
                        answer = _field(row, "answer", where)
                        categories = {}
                        for c in extra:
                            if isinstance(row[c], (dict, list, bytes)):
                                reading.report.note(f"column {c!r} is not scalar (not a category)", where)
                            elif row[c] is not None and str(row[c]).strip():
                                categories[c] = str(row[c]).strip()
                        image = _parquet_image(row["image"], f, reading.files, where)
                        reading.add(where, item_id=item_id, images=(image,), question=_field(row, "question", where),
                                    answer=answer, answer_type=_closed_if_yes_no(answer), categories=categories)
                    except BadRow as e:
                        reading.report.bad_row(e)
    return reading.finish()


def read_pathvqa(path, *, split: str | None = None, report: ReadReport | None = None) -> list[EvalItem]:
    """PathVQA, HF parquet export (image / question / answer; closed = yes / no answers); `path` = a parquet file
    or a folder of them; split None (all), 'train', 'validation' or 'test' (the file-name prefix)."""
    _check_split(split, ("train", "validation", "test"), "pathvqa")
    return _read_qa_parquet("pathvqa", pathlib.Path(path), split, report)


# ----------------------------------------------------------------------------------------------------- SLAKE


def read_slake(path, *, split: str | None = "test", q_lang: str | None = "en",
               report: ReadReport | None = None) -> list[EvalItem]:
    """SLAKE 1.0: train / validation (or validate) / test JSON + imgs/; `path` = the dataset folder or one JSON
    file (split must then be None or that file's split); q_lang 'en' (default), 'zh' or None (both)."""
    path = pathlib.Path(path)
    _check_split(split, tuple(SLAKE_FILES), "slake")
    if path.is_file():
        file_split = next((s for s, names in SLAKE_FILES.items() if path.name in names), None)
        if split is not None and split != file_split:
            raise ValueError(f"{path} is not the {split!r} file of SLAKE (expected {SLAKE_FILES[split]}); pass "
                             f"split=None to read it as given")
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = [], path
        for s in [split] if split is not None else list(SLAKE_FILES):
            found = [path / n for n in SLAKE_FILES[s] if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: no SLAKE {s} file (looked for {SLAKE_FILES[s]})")
            files.append(found[0])
    else:
        raise FileNotFoundError(f"{path}: no such SLAKE folder or file")
    if not (root / "imgs").is_dir():
        raise FileNotFoundError(f"{root}: no imgs/ folder next to the SLAKE JSON files")
    reading = _Reading("slake", path, report)
    for file in files:
        for where, row in _rows(reading, _load_json_list(file), lambda i, file=file: f"{file.name}[{i}]"):
            try:
                qid = _field(row, "qid", where)
                where = f"{where} (qid {qid})"
                lang = _field(row, "q_lang", where)
                if q_lang is not None and lang != q_lang:
                    reading.report.filter(f"q_lang={lang}")
                    continue
                answer_type = _answer_type(row, where)
                image = reading.files.read(root / "imgs" / _field(row, "img_name", where), where)
                reading.add(where, item_id=qid, images=(image,), question=_field(row, "question", where),
                            answer=_field(row, "answer", where), answer_type=answer_type,
                            categories=_optional(row, ("modality", "location", "content_type", "base_type")))
            except BadRow as e:
                reading.report.bad_row(e)
    return reading.finish()


# ------------------------------------------------------------------------------------------------ OmniMedVQA


def read_omnimedvqa(path, *, report: ReadReport | None = None) -> list[EvalItem]:
    """OmniMedVQA open-access part: QA_information/Open-access/*.json under the dataset root (`path` = the root or
    that folder); the gold answer is the letter of the option whose text equals gt_answer."""
    path = pathlib.Path(path)
    if (path.joinpath(*OMNIMEDVQA_QA_DIR)).is_dir():
        root = path
    elif path.is_dir() and path.parts[-2:] == OMNIMEDVQA_QA_DIR:
        root = path.parent.parent
    else:
        raise FileNotFoundError(f"{path}: no {'/'.join(OMNIMEDVQA_QA_DIR)} folder (pass the OmniMedVQA root)")
    qa_dir = root.joinpath(*OMNIMEDVQA_QA_DIR)
    files = sorted(qa_dir.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{qa_dir}: no *.json question files")
    reading = _Reading("omnimedvqa", root, report)
    for file in files:
        rel = f"{'/'.join(OMNIMEDVQA_QA_DIR)}/{file.name}"
        for where, row in _rows(reading, _load_json_list(file), lambda i, rel=rel: f"{rel}[{i}]"):
            try:
                qid = _field(row, "question_id", where)
                where = f"{where} (question_id {qid})"
                options = tuple((m.group(1), str(row[k]).strip()) for k in sorted(row)
                                if (m := _OPTION_KEY.match(k)) and row[k] is not None and str(row[k]).strip())
                if not options:
                    raise BadRow("missing_field", where, "no option_A..option_D field")
                letter = _gold_letter(_field(row, "gt_answer", where), options, where, reading.report)
                categories = _optional(row, ("question_type", "dataset"))
                if row.get("modality_type") is None and row.get("modality") is not None:
                    reading.report.note("modality spelled 'modality' (not 'modality_type')", where)
                modality = _optional(row, ("modality_type",)).get("modality_type") \
                    or _optional(row, ("modality",)).get("modality")
                if modality is None:
                    reading.report.note("no modality_type / modality field", where)
                else:
                    categories["modality"] = modality
                image = reading.files.read(root / _field(row, "image_path", where), where)
                reading.add(where, item_id=qid, images=(image,), question=_field(row, "question", where),
                            answer=letter, answer_type="choice", options=options, categories=categories)
            except BadRow as e:
                reading.report.bad_row(e)
    return reading.finish()


def _gold_letter(gt_answer: str, options: tuple, where: str, report: ReadReport) -> str:
    """The letter of the one option whose text equals gt_answer (exactly, else after normalize_answer)."""
    exact = [letter for letter, text in options if text == gt_answer]
    if len(exact) == 1:
        return exact[0]
    normalized = [letter for letter, text in options if normalize_answer(text) == normalize_answer(gt_answer)]
    if len(exact) > 1 or len(normalized) > 1:
        raise BadRow("no_matching_option", where, f"gt_answer {gt_answer!r} equals several options "
                                                  f"{exact or normalized} of {list(options)}")
    if not normalized:
        raise BadRow("no_matching_option", where, f"gt_answer {gt_answer!r} equals none of the options "
                                                  f"{list(options)}")
    report.note("gt_answer matched an option only after normalisation", where)
    return normalized[0]


# ------------------------------------------------------------------------------------------------ GMAI-MMBench


def _read_tsv(path: pathlib.Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(line number, row)]) of a VLMEvalKit TSV (pandas-written: tab-separated, '"'-quoted cells)."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # base64 image cells are megabytes long
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = list(reader.fieldnames or [])
        return header, [(reader.line_num, row) for row in reader]


def _image_cells(cell: str, where: str) -> list[str]:
    """The image cell's base64 strings: one string, or a Python-literal list of them (VLMEvalKit multi-image)."""
    cell = cell.strip()
    if cell.startswith("[") and cell.endswith("]"):
        try:
            cells = ast.literal_eval(cell)
        except (ValueError, SyntaxError) as e:
            raise BadRow("bad_base64", where, f"image list cell is not a list literal ({e})") from e
        if not cells or not all(isinstance(c, str) for c in cells):
            raise BadRow("bad_base64", where, "image list cell is empty or holds non-strings")
        return cells
    return [cell]


def read_gmai(path, *, report: ReadReport | None = None) -> list[EvalItem]:
    """GMAI-MMBench as VLMEvalKit's TSV (the VAL file; TEST withholds answers): index, question, options A, B, ...
    (empty cells = no option), answer (letter), image (base64, a list literal of them, or a <= 64-character index
    of the row holding the image), optional hint (prepended to the question as LLaVA's MMBench evaluation does);
    every other column is kept as a category."""
    path = pathlib.Path(path)
    if path.is_dir():
        tsvs = sorted(path.glob("*.tsv"))
        if len(tsvs) != 1:
            raise FileNotFoundError(f"{path}: expected exactly one *.tsv file, found {[t.name for t in tsvs]}")
        path = tsvs[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GMAI-MMBench TSV")
    header, rows = _read_tsv(path)
    columns = {c.lower(): c for c in header}
    missing = [c for c in ("index", "question", "answer", "image") if c not in columns]
    if missing:
        hint = " (the TEST file withholds answers; use the VAL file)" if missing == ["answer"] else ""
        raise ValueError(f"{path}: missing columns {missing}{hint}; header {header}")
    letters = [c for c in header if len(c) == 1 and "A" <= c <= "Z"]
    category_columns = [c for c in header if c.lower() not in GMAI_CORE and c not in letters]
    cell = lambda row, name: (row.get(columns[name]) or "").strip() if name in columns else ""
    image_of_index = {cell(row, "index"): cell(row, "image") for _, row in rows}
    reading = _Reading("gmai", path, report)
    shared = _SharedImages(image_of_index)
    for line, row in rows:
        where = f"{path.name} line {line}"
        try:
            if None in row:
                raise BadRow("bad_value", where, f"row has {len(header) + len(row[None])} cells, the header "
                                                 f"{len(header)}")
            fields = {name: cell(row, name) for name in GMAI_CORE}
            index = _field(fields, "index", where)
            where = f"{where} (index {index})"
            reading.check_new_id(index, where)
            question = _field(fields, "question", where)
            if fields["hint"]:
                question = f"{fields['hint']}\n{question}"
            options = tuple((c, row[c].strip()) for c in letters if row.get(c) and row[c].strip())
            answer = _field(fields, "answer", where).upper()
            images = []
            for k, image_cell in enumerate(_image_cells(_field(fields, "image", where), where)):
                if len(image_cell) <= VLMEVALKIT_IMAGE_REFERENCE_CHARS:
                    images.extend(shared.get(image_cell.strip(), where))
                else:
                    images.append(decode_base64_image(image_cell, f"{where} image {k}"))
            categories = {c: row[c].strip() for c in category_columns if row.get(c) and row[c].strip()}
            reading.add(where, item_id=index, images=tuple(images), question=question, answer=answer,
                        answer_type="choice", options=options, categories=categories)
        except BadRow as e:
            reading.report.bad_row(e)
    return reading.finish()


class _SharedImages:
    """VLMEvalKit's image sharing: a short image cell holds the index of the row whose cell has the base64 image(s);
    each shared image is decoded once."""

    def __init__(self, image_of_index: dict[str, str]):
        self.image_of_index, self.decoded = image_of_index, {}

    def get(self, index: str, where: str) -> tuple[bytes, ...]:
        """The decoded image(s) of the row `index`; BadRow('bad_image_reference') if it holds none."""
        target = self.image_of_index.get(index, "")
        if len(target) <= VLMEVALKIT_IMAGE_REFERENCE_CHARS:
            raise BadRow("bad_image_reference", where, f"image cell {index!r} names no row holding an image")
        if index not in self.decoded:
            self.decoded[index] = tuple(decode_base64_image(c, f"{where} image of index {index}")
                                        for c in _image_cells(target, where))
        return self.decoded[index]


# ------------------------------------------------------------------------------------------- our own records


def _question_patterns() -> list[tuple[str, re.Pattern]]:
    """(family, pattern on the normalised question) for the question families of data_pipelines' records."""
    out = []
    for family, phrasings in medical_text.QUESTIONS.items():
        for phrasing in phrasings:
            text = re.escape(normalize_answer(re.sub(r"\{\w+\}", " placeholderword ", phrasing)))
            out.append((family, re.compile(text.replace("placeholderword", r"\w+") + "$")))
    for phrase in medical_text.MODALITY_PHRASES.values():
        out.append(("modality_yes_no", re.compile(re.escape(normalize_answer(f"Is this {phrase}?")) + "$")))
    for prompt in medical_text.CAPTION_PROMPTS:
        out.append(("caption", re.compile(re.escape(normalize_answer(prompt)) + "$")))
    return out


QUESTION_PATTERNS = _question_patterns()
CLOSED_FAMILIES = frozenset(medical_text.QUESTIONS) | {"modality_yes_no"}


def question_family(question: str) -> str:
    """The question family of data_pipelines/sources/medical_text.py a question belongs to ('modality_name',
    'plane', 'modality_yes_no', 'caption', ...) or 'other'."""
    normalized = normalize_answer(question)
    return next((family for family, pattern in QUESTION_PATTERNS if pattern.match(normalized)), "other")


def _record_source(path_or_data_cfg, split: str):
    """(records iterator factory, description) of a JSONL manifest, a built dataset folder or a data config."""
    if isinstance(path_or_data_cfg, (str, os.PathLike)):
        path = pathlib.Path(path_or_data_cfg)
        if path.is_file():
            return "jsonl", path
        if (path / "dataset_info.json").is_file():
            return "built", data_source(path, split)
        raise FileNotFoundError(f"{path}: neither a JSONL manifest nor a built dataset folder (one holding "
                                f"dataset_info.json: <data_dir>/unimed_records/<dataset>/<version>)")
    if hasattr(path_or_data_cfg, "data_dir") and hasattr(path_or_data_cfg, "dataset"):
        return "built", open_split(path_or_data_cfg, split)
    raise TypeError(f"read_manifest expects a JSONL manifest path, a built dataset folder or a data config with "
                    f"data_dir / dataset, got {type(path_or_data_cfg).__name__}")


class _BadRecordsToReport:
    """Stands in for data_pipelines' BadRecordCounter (Manifest calls .add(BadRecord)): each bad manifest line
    becomes a 'bad_record' row of the report."""

    def __init__(self, report: ReadReport, where: str):
        self.report, self.where = report, where

    def add(self, error: BadRecord) -> None:
        """Count one bad manifest line."""
        self.report.bad_row(BadRow("bad_record", self.where, str(error)))


def _manifest_records(path_or_data_cfg, split: str, reading: _Reading) -> Iterator[Record]:
    """Decodable records of the split; undecodable ones become 'bad_record' rows of the report, records of other
    splits are counted as filtered."""
    kind, source = _record_source(path_or_data_cfg, split)
    if kind == "jsonl":
        manifest, counter = Manifest(source), _BadRecordsToReport(reading.report, source.name)
        for other, n in manifest.split_counts(counter).items():
            if other != split:
                reading.report.filter(f"split={other}", n)
        yield from manifest.records(split, counter, count_structural=False)
        return
    for i in range(len(source)):
        try:
            yield Record.from_bytes(record_bytes(source[i]), record_id=f"{reading.source}[{i}]")
        except BadRecord as e:
            reading.report.bad_row(BadRow("bad_record", f"{reading.source}[{i}]", str(e)))


def read_manifest(path_or_data_cfg, *, split: str = "test", report: ReadReport | None = None) -> list[EvalItem]:
    """Our own understanding records (a JSONL manifest of data_pipelines/manifest.py, a built dataset folder, or a
    data config naming data_dir / dataset): every (question, answer) pair after the record's image(s) becomes an
    item '<record id>#<pair index>'; closed = the closed-form question families of medical_text.QUESTIONS, the
    yes / no modality question, or any yes / no answer; open otherwise; categories modality, source, question
    (the family)."""
    if split not in SPLITS:
        raise ValueError(f"manifest: split {split!r} not in {SPLITS}")
    source = path_or_data_cfg if isinstance(path_or_data_cfg, (str, os.PathLike)) else \
        f"{getattr(path_or_data_cfg, 'data_dir', '?')}/{getattr(path_or_data_cfg, 'dataset', '?')}"
    reading = _Reading("manifest", f"{source} [{split}]", report)
    for record in _manifest_records(path_or_data_cfg, split, reading):
        if record.task != "understanding":
            reading.report.filter(f"task={record.task}")
            continue
        images, pair, segments = [], 0, record.segments
        for i, seg in enumerate(segments):
            if seg.kind == "image":
                images.append(record.images[seg.image])
                continue
            nxt = segments[i + 1] if i + 1 < len(segments) else None
            if seg.role == "answer":
                if i == 0 or segments[i - 1].kind != "text" or segments[i - 1].role != "context":
                    reading.report.note("answer text without a question before it", record.id)
                continue
            if nxt is None or nxt.kind != "text" or nxt.role != "answer":
                reading.report.note("question text without an answer after it", record.id)
                continue
            where = f"record {record.id!r} pair {pair}"
            item_id, pair = f"{record.id}#{pair}", pair + 1
            if not images:
                reading.report.filter("no image before the question")
                continue
            family = question_family(seg.text)
            closed = family in CLOSED_FAMILIES or normalize_answer(nxt.text) in YES_NO
            try:
                reading.add(where, item_id=item_id, images=tuple(images), question=seg.text, answer=nxt.text,
                            answer_type="closed" if closed else "open",
                            categories={"modality": record.modality, "source": record.source, "question": family})
            except BadRow as e:
                reading.report.bad_row(e)
    return reading.finish()


def read_paired(path, *, report: ReadReport | None = None) -> list[PairedItem]:
    """Image-to-image pairs from a JSONL manifest: one object per line {"id", "input", "instruction", "target"} plus
    optional "task", "modality" or other scalar fields (kept as categories); image paths are relative to the
    manifest's folder (absolute paths work); blank lines and lines starting with '#' are ignored."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such paired-task manifest")
    reading = _Reading("paired", path, report)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path.name}:{lineno}"
            try:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRow("bad_value", where, f"invalid JSON ({e})") from e
                if not isinstance(entry, dict):
                    raise BadRow("bad_value", where, f"line is a JSON {type(entry).__name__}, not an object")
                item_id = _field(entry, "id", where)
                where = f"{where} (id {item_id})"
                core = {k: _field(entry, k, where) for k in ("input", "instruction", "target")}
                categories = {}
                for key, value in entry.items():
                    if key in ("id", "input", "instruction", "target"):
                        continue
                    if isinstance(value, (dict, list)) or value is None:
                        raise BadRow("bad_value", where, f"field {key!r} must be a string or number (a category)")
                    categories[key] = str(value)
                reading.check_new_id(item_id, where)
                images = [reading.files.read(path.parent / core[k], f"{where} {k}") for k in ("input", "target")]
                reading.seen[item_id] = where
                reading.items.append(PairedItem(item_id, images[0], core["instruction"], images[1], categories))
            except BadRow as e:
                reading.report.bad_row(e)
    return reading.finish()


READERS = {
    "vqa-rad": read_vqa_rad,
    "slake": read_slake,
    "pathvqa": read_pathvqa,
    "omnimedvqa": read_omnimedvqa,
    "gmai": read_gmai,
    "manifest": read_manifest,
}


def read_benchmark(name: str, path, **options) -> list[EvalItem]:
    """READERS[name](path, **options), with errors naming unknown benchmarks and options."""
    if name not in READERS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(READERS)}")
    reader = READERS[name]
    accepted = [p for p in inspect.signature(reader).parameters if p not in ("path", "path_or_data_cfg")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"benchmark {name!r} does not take options {unknown}; it takes {accepted}")
    return reader(path, **options)
