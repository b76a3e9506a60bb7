"""Import an official UniMedVL/BAGEL checkpoint directory (ema.safetensors + ae.safetensors + JSON configs).

Strict by default: every missing, unexpected or mis-shaped key is listed in ONE error. Tensors are read and
placed one at a time (optionally straight onto a target sharding).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.errors import UserError
from unimedvl_jax.interop.name_map import AE_FILE, EMA_FILE, FROM_OFFICIAL, NameMapEntry, build_name_map
from unimedvl_jax.interop.official_config import model_config_from_official
from unimedvl_jax.interop.safetensors_io import SafetensorsReader
from unimedvl_jax.models.layers import dtype_of
from unimedvl_jax.models.unimedvl import UniMedVL

# Keys the released snapshot may carry beyond the 1223 of docs/model.md §2.1: UniMedVL's optional `vae_model.*` copy of
# the autoencoder inside ema.safetensors (docs/model.md §2.1 UNVERIFIED, docs/quirks.md §9.14). Skipped only with
# allow_optional_extras=True.
OPTIONAL_EXTRA_PREFIXES = {EMA_FILE: ("vae_model.",)}


class CheckpointMismatchError(UserError):
    """The checkpoint's keys or shapes do not match the model config; the message lists every offender."""


@dataclasses.dataclass
class ImportReport:
    """What an import read: tensor counts per file and the optional keys it skipped."""

    loaded: dict
    skipped_optional: list


def _check(entries, readers, allow_optional_extras):
    problems, skipped = [], []
    expected = {}
    for e in entries:
        expected.setdefault(e.file, set()).add(e.key)
        reader = readers[e.file]
        if e.key not in reader.entries:
            problems.append(f"missing   {e.file}:{e.key} expected shape {e.official_shape}")
            continue
        shape, dtype = reader.shape_dtype(e.key)
        if tuple(shape) != tuple(e.official_shape):
            problems.append(f"shape     {e.file}:{e.key} expected {e.official_shape} found {tuple(shape)} ({dtype})")
        elif not (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"):
            problems.append(f"dtype     {e.file}:{e.key} expected a float dtype found {dtype}")
    for file, reader in readers.items():
        for key in reader.keys():
            if key in expected.get(file, ()):
                continue
            optional = key.startswith(OPTIONAL_EXTRA_PREFIXES.get(file, ()))
            if optional and allow_optional_extras:
                skipped.append(f"{file}:{key}")
            else:
                note = " (optional extra: pass allow_optional_extras=True to skip)" if optional else ""
                shape, dtype = reader.shape_dtype(key)
                problems.append(f"unexpected {file}:{key} shape {tuple(shape)} ({dtype}){note}")
    return problems, skipped


def import_official(ckpt_dir, *, cfg=None, weights_file: str = EMA_FILE, allow_optional_extras: bool = False,
                    place: Callable[[NameMapEntry, np.ndarray], jax.Array] | None = None):
    """Build a UniMedVL from an official directory; returns (model, config, ImportReport).

    cfg: explicit model config (default: read from the JSON files). weights_file: 'ema.safetensors' (default) or
    'model.safetensors'. place(entry, array) puts one variable's value on its device/sharding (default:
    jnp.asarray); for a stacked variable (scanned layers) `array` holds every layer and `entry` is the last layer's.
    """
    cfg = cfg if cfg is not None else model_config_from_official(ckpt_dir)
    param_dtype = dtype_of(cfg.param_dtype)
    # Tensors are placed by `place`, not at variable creation: independent of the caller's eager-sharding mode.
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: UniMedVL(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    entries = build_name_map(abstract)
    files = {EMA_FILE: os.path.join(ckpt_dir, weights_file), AE_FILE: os.path.join(ckpt_dir, AE_FILE)}
    readers = {name: SafetensorsReader(path) for name, path in files.items()}
    try:
        problems, skipped = _check(entries, readers, allow_optional_extras)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {ckpt_dir} does not match the model config ({len(problems)} problems):\n  "
                + "\n  ".join(problems))
        place = place or (lambda entry, arr: jnp.asarray(arr))
        by_path = {}
        for e in entries:  # a stacked variable (scanned layers) has one entry per layer, in layer order
            by_path.setdefault(e.path, []).append(e)
        loaded = {EMA_FILE: 0, AE_FILE: 0}
        for path, var in nnx.to_flat_state(state):
            tensors = []
            for entry in by_path[tuple(path)]:
                tensors.append(FROM_OFFICIAL[entry.transform](readers[entry.file].get(entry.key)).astype(param_dtype))
                loaded[entry.file] += 1
            arr = tensors[0] if entry.layer is None else np.stack(tensors)
            var.set_value(place(entry, arr))
    finally:
        for r in readers.values():
            r.close()
    model = nnx.merge(graphdef, state)
    return model, cfg, ImportReport(loaded=loaded, skipped_optional=skipped)
