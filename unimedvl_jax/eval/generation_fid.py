"""Text-to-image FID per modality: generate one image per prompt of `<data>/prompts.jsonl`, then compare each
modality's generated images with the reference images of `<data>/<modality>/` (docs/evaluation.md "Running an
evaluation").

Data layout (`--data DIR`):

    DIR/prompts.jsonl       one object per line: {"modality": "CT", "prompt": "...", "id": "ct-0001"}; "id" is
                            optional (default: the line number); blank lines and lines starting with '#' are ignored
    DIR/<modality>/         reference images of that modality (any size; eval/fid.py's IMAGE_EXTENSIONS, searched
                            recursively), at least 2 per modality

Generated images go to `<out>/generated/<modality>/<id>.png`, one result line per image to
`<out>/generated.process<k>.jsonl` (so an interrupted run continues). Prompt i of the full list is generated with
seed + i, whatever the process count. FID itself (eval/fid.py: InceptionV3 pool3 features, Fréchet distance)
is computed on process 0 once every image exists.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from unimedvl_jax.eval.fid import IMAGE_EXTENSIONS, fid_from_features, image_paths, read_image
from unimedvl_jax.eval.image_to_image import check_file_names, safe_name
from unimedvl_jax.eval.sharded_loop import LoopStats, run_items
from unimedvl_jax.inference.interleave import text_to_image
from unimedvl_jax.inference.loading import InferenceModel

PROMPTS_FILE = "prompts.jsonl"
GENERATED = "generated"  # result-file stem and image folder under <out>
MIN_IMAGES = 2  # a covariance needs two samples


@dataclasses.dataclass(frozen=True)
class FidPrompt:
    """One image to generate: its id, modality and prompt."""

    item_id: str
    modality: str
    prompt: str


@dataclasses.dataclass(frozen=True)
class FidData:
    """The prompts of a FID evaluation and the reference image files per modality (every subfolder)."""

    root: pathlib.Path
    prompts: list[FidPrompt]
    references: dict[str, list[pathlib.Path]]


def read_fid_data(path) -> FidData:
    """The prompts and reference folders of DIR (module docstring); errors name the file and line or folder."""
    root = pathlib.Path(path)
    prompts_file = root / PROMPTS_FILE
    if not prompts_file.is_file():
        raise FileNotFoundError(f"{prompts_file}: no such file (a FID --data folder holds {PROMPTS_FILE} and one "
                                "folder of reference images per modality)")
    prompts, seen = [], {}
    for n, line in enumerate(prompts_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{prompts_file}:{n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from e
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object with modality and prompt")
        for key in ("modality", "prompt"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string")
        unknown = sorted(set(entry) - {"id", "modality", "prompt"})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown} (expected id, modality, prompt)")
        item_id = str(entry.get("id", n))
        if item_id in seen:
            raise ValueError(f"{where}: id {item_id!r} already used at line {seen[item_id]}")
        seen[item_id] = n
        prompts.append(FidPrompt(item_id, entry["modality"], entry["prompt"]))
    if not prompts:
        raise ValueError(f"{prompts_file}: no prompts")
    references = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            references[folder.name] = image_paths(folder)
        except ValueError:  # a folder without images: no reference set (an error below if prompts need it)
            references[folder.name] = []
    for modality in sorted({p.modality for p in prompts}):
        folder = root / modality
        if modality not in references:
            raise FileNotFoundError(f"{folder}: no reference folder for the prompts of modality {modality!r}")
        if len(references[modality]) < MIN_IMAGES:
            raise ValueError(f"{folder}: {len(references[modality])} reference image(s) ({', '.join(IMAGE_EXTENSIONS)}"
                             f"); FID needs at least {MIN_IMAGES}")
    return FidData(root, prompts, references)


@dataclasses.dataclass(frozen=True)
class GenerationWork:
    """The work function of a FID run: one text-to-image generation per prompt, saved as a PNG →
    {item_id, modality, image (path relative to <out>)}."""

    loaded: InferenceModel
    out_dir: pathlib.Path
    image_size: tuple[int, int]
    seeds: Mapping[str, int]
    sampler: Mapping

    def __call__(self, batch: list[FidPrompt]) -> list[dict]:
        records = []
        for p in batch:
            result = text_to_image(self.loaded.model, self.loaded.tokenizer, p.prompt, image_shape=self.image_size,
                                   seed=self.seeds[p.item_id], **self.sampler)
            rel = pathlib.Path(GENERATED) / safe_name(p.modality) / f"{safe_name(p.item_id)}.png"
            (self.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(result.image).save(self.out_dir / rel)
            records.append({"item_id": p.item_id, "modality": p.modality, "image": rel.as_posix()})
        return records


def evaluate_fid(loaded: InferenceModel, prompts: Sequence[FidPrompt], out_dir, *, image_size: tuple[int, int],
                 seed: int = 0, sampler: Mapping | None = None, all_prompts: Sequence[FidPrompt] | None = None,
                 on_batch: Callable[[list], None] | None = None, progress: bool = True) -> LoopStats:
    """Generate this process's unfinished share of `prompts` (prompt i of `all_prompts`, default `prompts`, with
    seed + i) into `<out>/generated/`, one result line each in `<out>/generated.process<k>.jsonl`."""
    every = list(prompts if all_prompts is None else all_prompts)
    seeds = {p.item_id: seed + i for i, p in enumerate(every)}
    check_file_names(seeds, "FID prompts")
    check_file_names({p.modality for p in every}, "FID modalities")
    work = GenerationWork(loaded, pathlib.Path(out_dir), tuple(image_size), seeds, dict(sampler or {}))
    return run_items(prompts, work, out_dir, GENERATED, batch_size=1, label="generating", known_ids=set(seeds),
                     on_batch=on_batch, progress=progress)


def summarize_fid(features: Callable[[list[np.ndarray]], np.ndarray], data: FidData,
                  prompts: Sequence[FidPrompt], results: Mapping[str, dict], out_dir) -> dict:
    """FID per modality of the generated images of `prompts` (from `results`) against the modality's reference
    images, and the mean over modalities. features(images) maps a list of uint8 RGB images to (N, D) features
    (eval/fid.py's inception_features in the command line); the distance is eval/fid.py's fid_from_features.
    Prompts without a generated image are counted; a modality with fewer than 2 generated images gets no FID
    (counted, left out of the mean)."""
    out = pathlib.Path(out_dir)
    generated = collections.defaultdict(list)
    missing = []
    for p in prompts:
        if p.item_id in results:
            generated[p.modality].append(out / results[p.item_id]["image"])
        else:
            missing.append(p.item_id)
    by_modality = {}
    for modality in sorted({p.modality for p in prompts}):
        refs, gens = data.references[modality], generated.get(modality, [])
        fid = None
        if len(gens) >= MIN_IMAGES:
            try:
                fid = fid_from_features(features([read_image(p) for p in gens]),
                                        features([read_image(p) for p in refs]))
            except ValueError as e:
                raise ValueError(f"FID of modality {modality!r}: {e}") from e
        by_modality[modality] = {"generated": len(gens), "reference": len(refs), "fid": fid}
    fids = [s["fid"] for s in by_modality.values() if s["fid"] is not None]
    return {"by_modality": by_modality, "average_fid": math.fsum(fids) / len(fids) if fids else None,
            "modalities_without_fid": sorted(m for m, s in by_modality.items() if s["fid"] is None),
            "missing_images": len(missing), "missing_ids": missing[:20],
            "unused_reference_modalities": sorted(set(data.references) - set(by_modality))}
