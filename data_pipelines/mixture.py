"""The UniMedVL mixture YAML as a data config: groups of datasets per loader family, their weights, mandatory flags,
line selection and image transforms, plus the `dataset_info` map (loader -> dataset -> files). Used to build shards
(`unimedvl-build-data --dataset mixture`) and to stream training data straight from the files (`data.mixture`).

Format and semantics: docs/unimedvl_format.md "The mixture YAML". Each group's records come from
`GroupSource` (random access over the selected JSONL lines / parquet rows) read by `GroupReader`.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import pathlib
import random
import threading
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import yaml

from data_pipelines import unimedvl_format as fmt
from data_pipelines.schema import BadRecord, Record
from data_pipelines.transforms import ImageTransform
from unimedvl_jax.errors import UserError

DATASET_INFO = "dataset_info"
GROUP_KEYS = ("dataset_names", "weight", "num_used_data", "is_mandatory", "shuffle_lines", "shuffle_seed",
              "resume_data_status", "image_transform_args", "vit_image_transform_args")
TRANSFORM_ARGS = {"image_stride": "stride", "max_image_size": "max_size", "min_image_size": "min_size",
                  "max_pixels": "max_pixels"}
NORMALIZE_ARGS = ("image_mean", "image_std")  # accepted only with the value 0.5 (our fixed normalisation)
INFO_KEYS = ("data_dir", "jsonl_path", "parquet_info_path", "modality", "license", "num_total_samples")


class _Doc:
    """A parsed YAML / JSON file that names the file, line and key path of whatever is wrong in it."""

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        try:
            text = self.path.read_text()
            self.node = yaml.compose(text)
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"{self.path}: not valid YAML / JSON ({e})") from e
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: not UTF-8 text ({e})") from e

    def _line(self, keys) -> int | None:
        """1-based line of the deepest node of the key path that exists."""
        node, line = self.node, None
        for key in keys:
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if k.value == str(key)), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
            else:
                node = None
            if node is None:
                break
            line = node.start_mark.line + 1
        return line

    def section(self, key: str) -> "_Doc":
        """The mapping under top-level `key` as a _Doc of the same file (its errors name the same file)."""
        part = _Doc.__new__(_Doc)
        part.path, part.data = self.path, self.data[key]
        part.node = next((v for k, v in self.node.value if k.value == key), None)
        return part

    def error(self, keys, message: str) -> UserError:
        """UserError '<file>:<line>: <key.path>: message'."""
        line = self._line(keys)
        where = f"{self.path}:{line}" if line else str(self.path)
        return UserError(f"{where}: {'.'.join(str(k) for k in keys) or '<top level>'}: {message}")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One dataset of a group: where its lines / parquet files are and how many are used (0 = all)."""

    name: str
    data_dir: str
    jsonl_path: str | None
    parquet_files: tuple[str, ...] | None
    num_used: int
    modality: str = fmt.UNSPECIFIED
    license: str = fmt.UNSPECIFIED


@dataclasses.dataclass(frozen=True)
class Group:
    """One mixture group (a loader key, or a `{loader}_{subgroup}`)."""

    name: str
    loader: str
    weight: float
    mandatory: bool
    datasets: tuple[Dataset, ...]
    transforms: dict               # {'vit': ImageTransform fields, 'vae': ...}; absent = the data config's
    shuffle_lines: bool = False
    shuffle_seed: int = 0


def _transform(args, doc: _Doc, keys: list) -> dict:
    """YAML image_transform_args -> ImageTransform fields (checked)."""
    if not isinstance(args, dict):
        raise doc.error(keys, "must be a mapping of image_stride, max_image_size, min_image_size[, max_pixels]")
    unknown = set(args) - set(TRANSFORM_ARGS) - set(NORMALIZE_ARGS)
    if unknown:
        raise doc.error(keys + [sorted(unknown)[0]], f"unknown transform argument (known: "
                                                      f"{sorted(TRANSFORM_ARGS) + list(NORMALIZE_ARGS)})")
    for name in NORMALIZE_ARGS:
        values = args.get(name, 0.5)
        if any(v != 0.5 for v in (values if isinstance(values, list) else [values])):
            raise doc.error(keys + [name], f"{values!r} is not supported: images are always normalised with mean "
                                           f"= std = 0.5 (docs/unimedvl_format.md)")
    missing = [k for k in ("image_stride", "max_image_size", "min_image_size") if k not in args]
    if missing:
        raise doc.error(keys, f"missing {missing}")
    out = {TRANSFORM_ARGS[k]: args[k] for k in TRANSFORM_ARGS if k in args}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out.values()):
        raise doc.error(keys, f"transform sizes must be integers, got {args!r}")
    try:
        ImageTransform.from_config(out)
    except ValueError as e:
        raise doc.error(keys, str(e)) from e
    return out


def _nums(spec: dict, sub, names: list, doc: _Doc, keys: list) -> list[int]:
    """num_used_data of a (sub)group's datasets: a list parallel to the names, a number for all, or a mapping
    (subgroup -> list / number, or dataset name -> number); missing = 0 (all)."""
    value = spec.get("num_used_data")
    here = keys + ["num_used_data"]
    if isinstance(value, dict):
        if sub is not None and sub in value:
            value, here = value[sub], here + [sub]
        else:
            missing = [n for n in names if n not in value]
            if missing:
                raise doc.error(here, f"no entry for {missing[0]!r}")
            value = [value[n] for n in names]
    if value is None:
        value = [0] * len(names)
    elif isinstance(value, int) and not isinstance(value, bool):
        value = [value] * len(names)
    if not isinstance(value, list) or len(value) != len(names):
        raise doc.error(here, f"must be a list parallel to dataset_names ({len(names)} entries), a number or a "
                              f"mapping, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise doc.error(here, f"entries must be integers >= 0 (0 = all), got {value!r}")
    return value


def _info_entry(info: _Doc, loader: str, name: str, doc: _Doc, keys: list, num_used: int) -> Dataset:
    """The Dataset of `name` from dataset_info[loader][name] (paths relative to the dataset_info file)."""
    entry = (info.data or {}).get(loader, {}) if isinstance(info.data, dict) else {}
    entry = entry.get(name) if isinstance(entry, dict) else None
    if not isinstance(entry, dict):
        raise doc.error(keys, f"dataset {name!r} has no entry dataset_info[{loader!r}][{name!r}] in {info.path}")
    ikeys = [loader, name]
    unknown = set(entry) - set(INFO_KEYS)
    if unknown:
        raise info.error(ikeys + [sorted(unknown)[0]], f"unknown key (known: {list(INFO_KEYS)})")
    base = info.path.parent
    resolve = lambda p: str(p if pathlib.Path(p).is_absolute() else base / p)  # noqa: E731
    for key in ("data_dir", "jsonl_path", "parquet_info_path", "modality", "license"):
        if key in entry and not (isinstance(entry[key], str) and entry[key]):
            raise info.error(ikeys + [key], "must be a non-empty string")
    data_dir = resolve(entry.get("data_dir", "."))
    extra = dict(modality=entry.get("modality", fmt.UNSPECIFIED), license=entry.get("license", fmt.UNSPECIFIED))
    if loader != fmt.T2I_PARQUET:
        if "jsonl_path" not in entry:
            raise info.error(ikeys, "needs 'jsonl_path'")
        if loader != fmt.TEXT_ONLY and "data_dir" not in entry:
            raise info.error(ikeys, "needs 'data_dir' (image paths are relative to it)")
        return Dataset(name, data_dir, resolve(entry["jsonl_path"]), None, num_used, **extra)
    if "parquet_info_path" in entry:
        pinfo = _Doc(pathlib.Path(resolve(entry["parquet_info_path"])))
        if not isinstance(pinfo.data, dict) or not pinfo.data:
            raise pinfo.error([], "must map parquet file paths to their info")
        files = [str(p if pathlib.Path(p).is_absolute() else pathlib.Path(data_dir) / p) for p in pinfo.data]
    else:
        files = [str(p) for p in sorted(pathlib.Path(data_dir).glob("*.parquet"))]
        if not files:
            raise info.error(ikeys + ["data_dir"], f"{data_dir} holds no *.parquet file (or give parquet_info_path)")
    return Dataset(name, data_dir, None, tuple(files), num_used, **extra)


def _groups(loader: str, spec, doc: _Doc, info: _Doc) -> list[Group]:
    """The group(s) of one top-level loader key."""
    keys = [loader]
    if not isinstance(spec, dict):
        raise doc.error(keys, "must be a mapping of group settings")
    unknown = set(spec) - set(GROUP_KEYS)
    if unknown:
        raise doc.error(keys + [sorted(unknown)[0]], f"unknown group key (known: {list(GROUP_KEYS)})")
    names = spec.get("dataset_names")
    if isinstance(names, list):
        subs = {None: names}
    elif isinstance(names, dict):
        subs = names
    else:
        raise doc.error(keys + ["dataset_names"], "must be a list of dataset names or a mapping subgroup -> list")
    flags = {}
    for key, kind, default in (("is_mandatory", bool, False), ("shuffle_lines", bool, False),
                               ("shuffle_seed", int, 0), ("resume_data_status", bool, False)):
        flags[key] = spec.get(key, default)
        if not isinstance(flags[key], kind) or (kind is int and isinstance(flags[key], bool)):
            raise doc.error(keys + [key], f"must be a {kind.__name__}, got {flags[key]!r}")
    transforms = {}
    for key, part in (("vit_image_transform_args", "vit"), ("image_transform_args", "vae")):
        if key in spec:
            transforms[part] = _transform(spec[key], doc, keys + [key])
    groups = []
    for sub, sub_names in subs.items():
        where = keys + ["dataset_names"] + ([sub] if sub is not None else [])
        if not isinstance(sub_names, list) or not sub_names or not all(isinstance(n, str) for n in sub_names):
            raise doc.error(where, "must be a non-empty list of dataset names")
        weight, wkeys = spec.get("weight", 1.0), keys + ["weight"]
        if isinstance(weight, dict):
            if sub not in weight:
                raise doc.error(wkeys, f"no weight for subgroup {sub!r}")
            weight, wkeys = weight[sub], wkeys + [sub]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise doc.error(wkeys, f"must be a number >= 0, got {weight!r}")
        nums = _nums(spec, sub, sub_names, doc, keys)
        datasets = tuple(_info_entry(info, loader, n, doc, where + [k], num) for k, (n, num)
                         in enumerate(zip(sub_names, nums)))
        groups.append(Group(loader if sub is None else f"{loader}_{sub}", loader, float(weight),
                            flags["is_mandatory"], datasets, transforms, flags["shuffle_lines"],
                            flags["shuffle_seed"]))
    return groups


@dataclasses.dataclass(frozen=True)
class Mixture:
    """A loaded mixture YAML: its groups in file order, and a digest of the YAML + dataset_info text."""

    path: str
    groups: tuple[Group, ...]
    digest: str

    @classmethod
    def load(cls, path, dataset_info=None) -> "Mixture":
        """Read the YAML at `path`; dataset_info: a YAML / JSON file (else the YAML's `dataset_info` key: a file
        path relative to the YAML, or the mapping itself)."""
        doc = _Doc(pathlib.Path(path))
        if not isinstance(doc.data, dict) or not doc.data:
            raise doc.error([], "must be a mapping of loader keys to groups")
        section = doc.data.get(DATASET_INFO)
        if dataset_info is not None:
            info = _Doc(pathlib.Path(dataset_info))
        elif isinstance(section, str):
            info = _Doc(doc.path.parent / section)
        elif isinstance(section, dict):
            info = doc.section(DATASET_INFO)
        else:
            raise doc.error([DATASET_INFO], "missing: give a dataset_info section or file (or --dataset-info / "
                                            "data.mixture_dataset_info)")
        groups = []
        for loader, spec in doc.data.items():
            if loader == DATASET_INFO:
                continue
            if loader not in fmt.LOADERS:
                raise doc.error([loader], f"unknown loader key (known: {list(fmt.LOADERS)})")
            groups += _groups(loader, spec, doc, info)
        if not groups:
            raise doc.error([], "defines no group")
        if not any(g.weight > 0 or g.mandatory for g in groups):
            raise doc.error([], "every group has weight 0 and none is mandatory: nothing would be drawn")
        h = hashlib.sha256(doc.path.read_bytes())
        h.update(json.dumps(info.data, sort_keys=True, default=str).encode())
        return cls(str(doc.path), tuple(groups), h.hexdigest())

    def group(self, name: str) -> Group:
        """The group called `name`."""
        return next(g for g in self.groups if g.name == name)

    def texts(self) -> Iterator[str]:
        """Every text of every selected line / row (message values, captions), for training a tokenizer."""
        for group in self.groups:
            reader = GroupReader(group)
            source = GroupSource(group)
            for i in range(len(source)):
                yield from reader.texts(source[i])


# --------------------------------------------------------------------------------------------- group data


def _jsonl_lines(path: str) -> list[tuple[int, int]]:
    """(byte offset, 1-based line number) of every non-blank line of a JSONL file."""
    out, offset = [], 0
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    out.append((offset, lineno))
                offset += len(raw)
    except OSError as e:
        raise UserError(f"{path}: cannot read the JSONL file ({type(e).__name__}: {e})") from e
    return out


def _parquet_rows(path: str) -> int:
    """Number of rows of a parquet file."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except OSError as e:
        raise UserError(f"{path}: cannot read the parquet file ({type(e).__name__}: {e})") from e


class GroupSource:
    """Random access over a group's selected lines / rows: element i = (dataset, file, byte offset or row, line
    or 1-based row, repeat). JSONL: the first num_used lines (after the optional shuffle_lines); parquet: num_used
    files (shuffled likewise, repeated as needed), every row of each."""

    def __init__(self, group: Group):
        cols = [[], [], [], [], []]
        for d, ds in enumerate(group.datasets):
            rng = random.Random(group.shuffle_seed)
            if ds.jsonl_path is not None:
                lines = _jsonl_lines(ds.jsonl_path)
                if group.shuffle_lines:
                    rng.shuffle(lines)
                for offset, lineno in lines[:ds.num_used or None]:
                    for col, v in zip(cols, (d, 0, offset, lineno, 0)):
                        col.append(v)
                continue
            files = list(range(len(ds.parquet_files)))
            if group.shuffle_lines:
                rng.shuffle(files)
            picked = [files[k % len(files)] for k in range(ds.num_used)] if ds.num_used else files
            for k, f in enumerate(picked):
                n = _parquet_rows(ds.parquet_files[f])
                for col, v in zip(cols, (d, f, np.arange(n), np.arange(1, n + 1), k // len(files))):
                    col.extend(np.broadcast_to(v, (n,)).tolist())
        self.elements = np.asarray(cols, np.int64).T.reshape(-1, 5)
        self.name = group.name

    def __len__(self):
        return len(self.elements)

    def __getitem__(self, i):
        return tuple(int(v) for v in self.elements[i])


class GroupReader:
    """Reads one GroupSource element into a Record (schema.PlanSpec carrying the group's transforms); picklable,
    it keeps open files per process (one lock serialises their use: grain reads ahead in threads)."""

    def __init__(self, group: Group):
        self.group = group
        self._files: dict = {}
        self._row_group = (None, None, None)
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"group": self.group}

    def __setstate__(self, state):
        self.__init__(state["group"])

    def where(self, element) -> fmt.Where:
        """The Where of an element."""
        d, f, _, line, repeat = element
        ds = self.group.datasets[d]
        file = ds.jsonl_path if ds.jsonl_path is not None else ds.parquet_files[f]
        return fmt.Where(self.group.loader, self.group.name, ds.name, file, line, ds.data_dir, ds.modality,
                         ds.license, repeat)

    def _line(self, path: str, offset: int) -> bytes:
        with self._lock:
            if path not in self._files:
                self._files[path] = open(path, "rb")  # noqa: SIM115 (kept open for the reader's lifetime)
            f = self._files[path]
            f.seek(offset)
            return f.readline()

    def _row(self, path: str, row: int):
        """(image, captions) of one parquet row (the row group is cached)."""
        with self._lock:
            return self._locked_row(path, row)

    def _locked_row(self, path: str, row: int):
        if path not in self._files:
            pf = pq.ParquetFile(path)
            starts = np.cumsum([0] + [pf.metadata.row_group(k).num_rows for k in range(pf.num_row_groups)])
            self._files[path] = (pf, starts)
        pf, starts = self._files[path]
        rg = bisect.bisect_right(starts, row) - 1
        if self._row_group[:2] != (path, rg):
            missing = {"image", "captions"} - set(pf.schema_arrow.names)
            if missing:
                raise UserError(f"{path}: parquet file has no column(s) {sorted(missing)}")
            self._row_group = (path, rg, pf.read_row_group(rg, columns=["image", "captions"]).to_pydict())
        table = self._row_group[2]
        k = row - starts[rg]
        return table["image"][k], table["captions"][k]

    def read(self, element) -> tuple[Record, list[BadRecord]]:
        """(Record, images dropped from it) of an element; raises BadRecord for an unusable line / row."""
        where = self.where(element)
        if self.group.loader == fmt.T2I_PARQUET:
            image, captions = self._row(where.file, element[2])
            return fmt.read_parquet_row(image, captions, where, self.group.transforms), []
        return fmt.read_jsonl_line(self._line(where.file, element[2]), where, self.group.transforms)

    def texts(self, element) -> list[str]:
        """The message values / captions of an element (empty for an unreadable one)."""
        where = self.where(element)
        if self.group.loader == fmt.T2I_PARQUET:
            captions = self._row(where.file, element[2])[1]
            try:
                captions = json.loads(captions) if isinstance(captions, (str, bytes)) else captions
            except json.JSONDecodeError:
                return []
            return [v for v in captions.values() if isinstance(v, str)] if isinstance(captions, dict) else []
        try:
            entry = json.loads(self._line(where.file, element[2]))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return []
        messages = entry.get("message") if isinstance(entry, dict) else None
        return [m["value"] for m in messages or [] if isinstance(m, dict) and isinstance(m.get("value"), str)]


def mixture_records(mixture: Mixture, counter) -> Iterator[Record]:
    """Every valid record of every group, group by group in source order; bad lines / rows and images dropped from
    kept rows are counted in `counter`."""
    for group in mixture.groups:
        source, reader = GroupSource(group), GroupReader(group)
        for i in range(len(source)):
            try:
                record, dropped = reader.read(source[i])
            except BadRecord as e:
                counter.add(e)
                continue
            for e in dropped:
                counter.add(e)
            yield record
