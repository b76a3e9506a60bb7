"""Readers of the official UniMedVL training formats: one JSONL line (or one T2I parquet row) of a loader family ->
one schema.Record with an explicit item plan (schema.PlanSpec) laying the sample out as that loader does.

Families (the YAML's top-level loader keys) and their plans are described in docs/unimedvl_format.md. Every
rejected line, row or image raises / returns a schema.BadRecord naming the file and the line (row), counted by the
caller; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import warnings

from PIL import Image

from data_pipelines.schema import BadRecord, ItemSpec, PlanSpec, Record, Segment

SFT = "SftJSONLIterableDataset_Ver1"
TEXT_ONLY = "SftJSONLIterableDataset_TextOnly"
RECONSTRUCTION_V1 = "SftJSONLIterableDataset_with_VisualReconstruction_Ver1"
RECONSTRUCTION_V2 = "SftJSONLIterableDataset_with_VisualReconstruction_Ver2"
EDITING = "MedicalImageEditingIterableDataset_ver1"
COUNTERFACTUAL = "CounterfactualMedicalIterableDataset_ver1"
T2I_JSONL = "T2IIterableDataset_Ver1"
T2I_PARQUET = "t2i_pretrain"
JSONL_LOADERS = (SFT, TEXT_ONLY, RECONSTRUCTION_V1, RECONSTRUCTION_V2, EDITING, COUNTERFACTUAL, T2I_JSONL)
LOADERS = JSONL_LOADERS + (T2I_PARQUET,)

PLACEHOLDER = "<image>"
RECONSTRUCTION_SUFFIX = "Please also reconstruct the image at the end"
MAX_PIXELS = 20_000_000  # above: rejected
MAX_SIDE = 4096          # a side >= this: rejected
UNSPECIFIED = "unspecified"  # modality / license of a dataset whose dataset_info entry does not give them


@dataclasses.dataclass(frozen=True)
class Where:
    """Where a line or row comes from, and what its records carry (group, dataset, provenance)."""

    loader: str
    group: str
    dataset: str
    file: str
    line: int                 # 1-based line of the JSONL file, or 1-based row of the parquet file
    data_dir: str = ""
    modality: str = UNSPECIFIED
    license: str = UNSPECIFIED
    repeat: int = 0           # k-th repetition of a parquet file within num_used_data (0 = first)

    @property
    def record_id(self) -> str:
        """'group/dataset/file:line' (plus '#rK' for a repeated parquet file)."""
        rep = f"#r{self.repeat}" if self.repeat else ""
        return f"{self.group}/{self.dataset}/{pathlib.Path(self.file).name}{rep}:{self.line}"

    def fail(self, reason: str, detail: str) -> BadRecord:
        """A BadRecord of this line."""
        return BadRecord.at(reason, self.record_id, self.file, self.line, detail)


def check_image_bytes(data: bytes, where: Where, what: str) -> bytes:
    """`data` when it is an image PIL verifies, of at most MAX_PIXELS pixels and sides below MAX_SIDE; else raise."""
    if not data:
        raise where.fail("zero_size_image", f"{what} has no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                img.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise where.fail("oversize_image", f"{what}: {e}") from e
    except Exception as e:  # PIL raises many types for corrupt data
        raise where.fail("unreadable_image", f"{what}: PIL verify failed ({type(e).__name__}: {e})") from e
    if w == 0 or h == 0:
        raise where.fail("zero_size_image", f"{what} is {w}x{h}")
    if w * h > MAX_PIXELS or max(w, h) >= MAX_SIDE:
        raise where.fail("oversize_image", f"{what} is {w}x{h} (limits: {MAX_PIXELS} pixels, sides < {MAX_SIDE})")
    return data


def load_image(ref, where: Where, what: str) -> bytes:
    """The checked bytes of the image `ref` ({"path": ...}) under data_dir (a leading '/' re-rooted there)."""
    if not isinstance(ref, dict) or not isinstance(ref.get("path"), str) or not ref["path"]:
        raise where.fail("missing_field", f"{what} must be an object with a non-empty string 'path', got {ref!r}")
    path = pathlib.Path(where.data_dir) / ref["path"].lstrip("/")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise where.fail("bad_reference", f"{what}: cannot read {path} ({type(e).__name__})") from e
    return check_image_bytes(data, where, f"{what} ({path})")


class _Sample:
    """Accumulates one record's segments, images and plan items in sequence order."""

    def __init__(self, where: Where):
        self.where = where
        self.segments: list[Segment] = []
        self.images: list[bytes] = []
        self.items: list[ItemSpec] = []
        self.paths: list[str] = []
        self._loaded: dict[tuple, int] = {}
        self._image_segments: dict[tuple[int, str], int] = {}

    def text(self, text: str, role: str, *, cfg: bool = False) -> None:
        """A text item ('answer' = CE); an empty (whitespace) text adds nothing."""
        self.text_one_of([text], role, cfg=cfg)

    def text_one_of(self, texts: list[str], role: str, *, cfg: bool = False) -> None:
        """One text item using one of `texts` (chosen from the plan's rng); empty texts are left out."""
        indices = []
        for text in texts:
            if text.strip():
                indices.append(len(self.segments))
                self.segments.append(Segment("text", role, text=text))
        if indices:
            self.items.append(ItemSpec(indices, "text", cfg))

    def image(self, key: tuple, data: bytes, path: str) -> int:
        """Index of the image `key` (its bytes stored once)."""
        if key not in self._loaded:
            self._loaded[key] = len(self.images)
            self.images.append(data)
            self.paths.append(path)
        return self._loaded[key]

    def load(self, refs: list, index: int, field: str) -> int:
        """Index of image refs[index] of `field`, loading and checking it the first time."""
        if index >= len(refs):
            raise self.where.fail("bad_reference", f"{PLACEHOLDER} number {index + 1} of a turn has no {field}"
                                                   f"[{index}] ({len(refs)} given)")
        key = (field, index)
        if key in self._loaded:
            return self._loaded[key]
        ref = refs[index]
        return self.image(key, load_image(ref, self.where, f"{field}[{index}]"), ref["path"])

    def use(self, image: int, role: str, use: str, *, cfg: bool = False) -> None:
        """An image item: `use` 'vit' or 'vae' of image `image` in `role` ('target' = noised VAE target)."""
        seg = self._image_segments.get((image, role))
        if seg is None:
            seg = self._image_segments[(image, role)] = len(self.segments)
            self.segments.append(Segment("image", role, image=image))
        self.items.append(ItemSpec([seg], use, cfg))

    def record(self, task: str, transforms: dict) -> Record:
        """The validated Record; a sample without a loss-bearing item is a BadRecord."""
        w = self.where
        if not any((it.use == "text" and self.segments[it.segments[0]].role == "answer")
                   or (it.use == "vae" and self.segments[it.segments[0]].role == "target") for it in self.items):
            raise w.fail("missing_field", "no loss-bearing item (no gpt answer and no target image)")
        record = Record(id=w.record_id, task=task, segments=self.segments, images=self.images, modality=w.modality,
                        split="train", source=w.dataset, source_scan=self.paths[0] if self.paths else w.record_id,
                        license=w.license,
                        meta={"loader": w.loader, "group": w.group, "dataset": w.dataset, "file": w.file,
                              "line": w.line, "image_paths": list(self.paths)},
                        plan=PlanSpec(self.items, transforms.get("vit"), transforms.get("vae")))
        try:
            return record.validate()
        except BadRecord as e:
            raise w.fail(e.reason, e.detail) from e


def _turns(entry: dict, where: Where) -> list[tuple[str, str]]:
    """(role, value) of the 'message' turns whose role is human or gpt, in order."""
    messages = entry.get("message")
    if not isinstance(messages, list):
        raise where.fail("missing_field", "'message' must be a list of {from, value} objects")
    turns = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("from"), str):
            raise where.fail("missing_field", f"message[{k}] must be an object with a string 'from'")
        if m["from"] in ("human", "gpt"):
            if not isinstance(m.get("value"), str):
                raise where.fail("missing_field", f"message[{k}].value must be a string")
            turns.append((m["from"], m["value"]))
    return turns


def _image_refs(entry: dict, field: str, where: Where, *, required: bool) -> list:
    """The image list of `field`: a list, a single object, or a JSON string of either."""
    value = entry.get(field)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise where.fail("invalid_json", f"{field} is a string but not JSON ({e})") from e
    if value is None or value == []:
        if required:
            raise where.fail("missing_field", f"required field {field!r} is missing or empty")
        return []
    refs = [value] if isinstance(value, dict) else value
    if not isinstance(refs, list):
        raise where.fail("missing_field", f"{field} must be a list of {{\"path\": ...}} objects")
    return refs


def _with_suffix(pieces: list[str]) -> list[str]:
    """Human-turn pieces with the reconstruction request: appended to a turn without a placeholder, else space-joined
    to the last non-empty piece (a turn of placeholders only gets none)."""
    if len(pieces) == 1:
        return [pieces[0] + RECONSTRUCTION_SUFFIX]
    for k in range(len(pieces) - 1, -1, -1):
        if pieces[k].strip():
            return pieces[:k] + [pieces[k].strip() + " " + RECONSTRUCTION_SUFFIX] + pieces[k + 1:]
    return pieces


def _conversation(entry: dict, where: Where, transforms: dict, *, loader: str) -> Record:
    """SFT Ver1 and the two visual-reconstruction variants."""
    if "input_img" not in entry:
        raise where.fail("missing_field", "required field 'input_img' is missing")
    s = _Sample(where)
    refs = _image_refs(entry, "input_img", where, required=False)
    reconstruct = loader in (RECONSTRUCTION_V1, RECONSTRUCTION_V2)
    for role, value in _turns(entry, where):
        if role == "gpt":
            s.text(value, "answer")  # answers keep their spaces
            continue
        pieces = value.split(PLACEHOLDER)
        if reconstruct:
            pieces = _with_suffix(pieces)
        for idx, piece in enumerate(pieces):
            s.text(piece.strip(), "context")
            if idx < len(pieces) - 1:  # the index restarts in every turn (docs/unimedvl_format.md)
                image = s.load(refs, idx, "input_img")
                if loader == RECONSTRUCTION_V2:
                    s.use(image, "input", "vae")
                s.use(image, "input", "vit", cfg=loader == SFT)
    if reconstruct:
        for idx in range(len(refs)):
            s.use(s.load(refs, idx, "input_img"), "target", "vae")
    return s.record("interleaved" if reconstruct else "understanding", transforms)


def _text_only(entry: dict, where: Where, transforms: dict) -> Record:
    """Placeholders removed, whitespace collapsed; human = context, gpt = CE."""
    s = _Sample(where)
    for role, value in _turns(entry, where):
        s.text(" ".join(value.replace(PLACEHOLDER, "").split()), "answer" if role == "gpt" else "context")
    return s.record("understanding", transforms)


def _edit_like(entry: dict, where: Where, transforms: dict, *, counterfactual: bool) -> Record:
    """Editing: input VAE, input ViT, instruction, answer, output target. Counterfactual: input VAE, input ViT,
    instruction pieces, output target, explanation."""
    inputs = _image_refs(entry, "input_img", where, required=True)
    outputs = _image_refs(entry, "output_img", where, required=True)
    messages = entry.get("message")
    if not isinstance(messages, list) or len(messages) < 2:
        raise where.fail("missing_field", "'message' must be a list of at least 2 turns")
    turns = _turns(entry, where)
    last = {role: value for role, value in turns}
    for role in ("human", "gpt"):
        if role not in last:
            raise where.fail("missing_field", f"'message' has no {role} turn")
    s = _Sample(where)
    source = s.load(inputs, 0, "input_img")
    target = s.load(outputs, 0, "output_img")
    s.use(source, "input", "vae")
    s.use(source, "input", "vit")
    if counterfactual:
        for piece in last["human"].split(PLACEHOLDER):
            s.text(piece.strip(), "context")
        s.use(target, "target", "vae")
        s.text(last["gpt"], "answer")
    else:
        s.text(last["human"].strip(), "context")  # a literal <image> stays in the text
        s.text(last["gpt"], "answer")
        s.use(target, "target", "vae")
    return s.record("interleaved", transforms)


def _t2i_jsonl(entry: dict, where: Where, transforms: dict) -> tuple[Record, list[BadRecord]]:
    """Every turn in order (human prompts CFG-droppable), then every image that loads as a VAE target; images that
    fail are returned as BadRecords (the row is rejected only when none loads)."""
    field = "output_img" if entry.get("output_img") else "input_img"
    refs = _image_refs(entry, field, where, required=True)
    s = _Sample(where)
    turns = _turns(entry, where)
    images, dropped = [], []
    for k in range(len(refs)):
        try:
            images.append(s.load(refs, k, field))
        except BadRecord as e:
            dropped.append(e)
    if not images:
        raise dropped[0]
    for role, value in turns:
        if role == "gpt":
            s.text(value, "answer")
        else:
            s.text(value.strip(), "context", cfg=True)
    for image in images:
        s.use(image, "target", "vae")
    return s.record("generation", transforms), dropped


def read_jsonl_line(raw: bytes, where: Where, transforms: dict | None = None) -> tuple[Record, list[BadRecord]]:
    """One JSONL line of loader `where.loader` -> (Record, images dropped from it); raises BadRecord for a line
    that cannot be used. `transforms`: optional {'vit': ..., 'vae': ...} ImageTransform fields for the plan."""
    transforms = transforms or {}
    try:
        entry = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise where.fail("undecodable_line", f"not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise where.fail("invalid_json", f"invalid JSON ({e})") from e
    if not isinstance(entry, dict):
        raise where.fail("missing_field", "line is not a JSON object")
    loader = where.loader
    if loader == T2I_JSONL:
        return _t2i_jsonl(entry, where, transforms)
    if loader == TEXT_ONLY:
        return _text_only(entry, where, transforms), []
    if loader in (EDITING, COUNTERFACTUAL):
        return _edit_like(entry, where, transforms, counterfactual=loader == COUNTERFACTUAL), []
    if loader in (SFT, RECONSTRUCTION_V1, RECONSTRUCTION_V2):
        return _conversation(entry, where, transforms, loader=loader), []
    raise ValueError(f"{loader!r} is not a JSONL loader of {JSONL_LOADERS}")


def read_parquet_row(image, captions, where: Where, transforms: dict | None = None) -> Record:
    """One t2i_pretrain parquet row (raw encoded image bytes, captions as a JSON object of texts) -> Record: one
    caption (chosen from the plan's rng, CFG-droppable) then the image as VAE target."""
    if isinstance(captions, (bytes, str)):
        try:
            captions = json.loads(captions)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise where.fail("invalid_json", f"column 'captions' is not JSON ({e})") from e
    if not isinstance(captions, dict):
        raise where.fail("missing_field", "column 'captions' must be a JSON object of caption texts")
    texts = [v for v in captions.values() if isinstance(v, str) and v.strip()]
    if not texts:
        raise where.fail("empty_text", "column 'captions' holds no non-empty caption")
    if not isinstance(image, (bytes, bytearray)):
        raise where.fail("missing_field", f"column 'image' must hold the encoded image bytes, got "
                                          f"{type(image).__name__}")
    s = _Sample(where)
    s.text_one_of([t.strip() for t in texts], "context", cfg=True)
    index = s.image(("image", 0), check_image_bytes(bytes(image), where, "column 'image'"),
                    f"{where.file}:{where.line}")
    s.use(index, "target", "vae")
    return s.record("generation", transforms or {})
