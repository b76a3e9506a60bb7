"""Load a model for inference from any checkpoint users have: a training workdir, a params checkpoint or an
official-layout directory, together with its tokenizer and the image transforms it was trained with.

Resolution of `checkpoint` (first match wins):
  * official layout  (<dir>/llm_config.json): imported with interop/checkpoint_import.py; tokenizer files in <dir>;
                     transforms = the UniMedVL image generator's (docs/inference.md §5.5).
  * training workdir (<dir>/final/config.json): the final params checkpoint; tokenizer <dir>/tokenizer; transforms
                     and the generation size from <dir>/config.json (the run's data section).
  * params checkpoint (<dir>/config.json + params/ or ema/): as above with the parent directory as the workdir
                     (so `<workdir>/final` works too); without a run config the docs/inference.md §5.5 transforms
                     are used.
`tokenizer` overrides the tokenizer location in every case.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from data_pipelines import dicom
from data_pipelines.schema import BadRecord
from data_pipelines.transforms import ImageTransform
from unimedvl_jax.errors import UserError, read_json
from unimedvl_jax.inference.interleave import GEN_VAE_TRANSFORM, GEN_VIT_TRANSFORM
from unimedvl_jax.interop.checkpoint_import import import_official
from unimedvl_jax.interop.params_checkpoint import load_params_checkpoint
from unimedvl_jax.tokenizers import load_tokenizer


@dataclasses.dataclass
class InferenceModel:
    """A model with everything inference needs: config, tokenizer, ViT / VAE transforms, default image size."""

    model: object
    cfg: object
    tokenizer: object
    vit_transform: ImageTransform
    vae_transform: ImageTransform
    image_size: tuple[int, int]
    source: str


def _run_transforms(run_config: pathlib.Path):
    """(vit, vae transform, generation size) from a training run's config.json, or None when there is none."""
    if not run_config.is_file():
        return None
    run = read_json(run_config, what="training run config (JSON)")
    data = run.get("data") if isinstance(run, dict) else None
    if not data:
        return None
    try:
        return (ImageTransform.from_config(data["vit_transform"]), ImageTransform.from_config(data["vae_transform"]),
                tuple(int(s) for s in data["vae_image_size"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{run_config}: the data section lacks or mistypes the image transforms "
                        f"({type(e).__name__}: {e})") from e


def _official_transforms():
    return GEN_VIT_TRANSFORM, GEN_VAE_TRANSFORM, (1024, 1024)


def load_for_inference(checkpoint, *, tokenizer=None, weights: str = "ema") -> InferenceModel:
    """Model + tokenizer + transforms for a workdir, params checkpoint or official directory (module docstring)."""
    path = pathlib.Path(os.fspath(checkpoint)).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    if (path / "llm_config.json").is_file():
        model, cfg, _ = import_official(path)
        vit, vae, size = _official_transforms()
        tok = load_tokenizer(tokenizer or path)
        return InferenceModel(model, cfg, tok, vit, vae, size, f"official directory {path}")
    if (path / "final" / "config.json").is_file():
        workdir, params_dir = path, path / "final"
    elif (path / "config.json").is_file() and ((path / "params").is_dir() or (path / "ema").is_dir()):
        workdir, params_dir = path.parent, path
    else:
        hint = " (training not finished: no final/ yet)" if (path / "checkpoints").is_dir() else ""
        raise FileNotFoundError(f"--checkpoint {path}: not a training workdir (final/config.json), a params "
                                f"checkpoint (config.json + params/ or ema/) or an official directory "
                                f"(llm_config.json){hint}")
    model, cfg = load_params_checkpoint(params_dir, weights=weights)
    vit, vae, size = _run_transforms(workdir / "config.json") or _official_transforms()
    tok_path = tokenizer or workdir / "tokenizer"
    if not tokenizer and not pathlib.Path(tok_path).exists():
        raise FileNotFoundError(f"{tok_path}: no tokenizer next to {params_dir}; pass --tokenizer")
    return InferenceModel(model, cfg, load_tokenizer(tok_path), vit, vae, size, f"params checkpoint {params_dir}")


def read_input_image(path, *, slice_index: int | None = None, axis: str = "axial", frame: int = 0) -> np.ndarray:
    """uint8 (H, W, 3) image from a PNG / JPEG / DICOM (frame) / NIfTI (slice, default the middle one) file."""
    path = pathlib.Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        images = dicom.read_image(path, record_id=str(path), frames=[frame],
                                  slices=None if slice_index is None else [slice_index], axis=axis)
    except BadRecord as e:  # unreadable, zero-size or oversize, a frame / slice out of range
        raise UserError(f"--image: {e.detail}") from e
    image = images[0]
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
