"""The ONE table that maps JAX parameter paths to official state-dict keys (and back) with a layout transform.

Both import and export are driven by `build_name_map`, so they cannot drift apart. JAX module attribute names
mirror the official module names; the table only needs the few rules below:

  * the file a tensor lives in (`vae_model.*` -> ae.safetensors without the prefix, everything else -> ema)
  * leaf renames (`kernel` -> `weight`) and module renames (time_embedder.fc_in -> time_embedder.mlp.0, ...)
  * a layout transform: Dense kernels (in, out) <-> torch Linear (out, in); conv kernels HWIO <-> OIHW.
    The ViT patch embedding is already a Linear over (row, col, channel) patches in the official layout
    (docs/model.md §3.5, conv-as-linear), so it is a plain transpose.
  * scanned layers (model.scan_layers, models/layer_stack.py): a variable whose first logical axis is `layers`
    holds every layer; it has one entry per layer (`layer` = its index on that axis), whose official key has the
    index after the `layers` module, exactly as the looped model's `layers.<i>` paths give.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from unimedvl_jax.models.bridges import PositionTable
from unimedvl_jax.models.layer_stack import LAYER_AXIS

EMA_FILE = "ema.safetensors"
AE_FILE = "ae.safetensors"

# (JAX module path prefix, official module path prefix)
MODULE_RENAMES = (
    ("time_embedder.fc_in.", "time_embedder.mlp.0."),
    ("time_embedder.fc_out.", "time_embedder.mlp.2."),
)
LEAF_RENAMES = {"kernel": "weight"}
# (JAX top-level prefix, file, prefix stripped in that file)
FILE_RULES = (("vae_model.", AE_FILE),)

# Transforms from the JAX layout to the official layout; inverses below.
TO_OFFICIAL = {
    "identity": lambda a: a,
    "transpose": lambda a: np.transpose(a),
    "hwio_to_oihw": lambda a: np.transpose(a, (3, 2, 0, 1)),
}
FROM_OFFICIAL = {
    "identity": lambda a: a,
    "transpose": lambda a: np.transpose(a),
    "hwio_to_oihw": lambda a: np.transpose(a, (2, 3, 1, 0)),
}


@dataclasses.dataclass(frozen=True)
class NameMapEntry:
    """One official tensor: JAX path (and layer index into a stacked variable), official file and key, transform,
    both shapes (per layer) and whether it is trainable."""

    path: tuple
    file: str
    key: str
    transform: str
    jax_shape: tuple
    official_shape: tuple
    dtype: np.dtype
    frozen_table: bool
    axes: tuple  # logical axis names of the JAX variable (for placing it on a mesh; stacked: `layers` first)
    layer: int | None = None  # index on the leading layer axis of a stacked variable, else None

    @property
    def jax_name(self) -> str:
        return ".".join(str(p) for p in self.path) + ("" if self.layer is None else f"[{self.layer}]")

    def select(self, value):
        """This entry's tensor (JAX layout) from its variable's value: the layer's slice of a stacked variable."""
        return value if self.layer is None else value[self.layer]


def _transform_for(leaf: str, ndim: int) -> str:
    if leaf != "kernel":
        return "identity"
    return {2: "transpose", 4: "hwio_to_oihw"}[ndim]


def official_shape(transform: str, shape: tuple) -> tuple:
    """Shape of a tensor after TO_OFFICIAL[transform]."""
    if transform == "transpose":
        return tuple(reversed(shape))
    if transform == "hwio_to_oihw":
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def official_location(path: tuple) -> tuple[str, str, str]:
    """(file, key, transform-leaf) of a JAX parameter path."""
    name = ".".join(str(p) for p in path[:-1]) + "."
    leaf = str(path[-1])
    for jax_prefix, official_prefix in MODULE_RENAMES:
        if name.startswith(jax_prefix):
            name = official_prefix + name[len(jax_prefix):]
    file = EMA_FILE
    for prefix, target in FILE_RULES:
        if name.startswith(prefix):
            file, name = target, name[len(prefix):]
    return file, name + LEAF_RENAMES.get(leaf, leaf), leaf


def build_name_map(model_or_state) -> list[NameMapEntry]:
    """Name-map entries for every parameter and frozen table of a model (concrete or nnx.eval_shape'd)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(
        model_or_state, nnx.Any(nnx.Param, PositionTable))
    entries = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        shape = tuple(value.shape)
        axes = tuple(var.get_metadata().get("out_sharding") or ())
        stacked = bool(axes) and axes[0] == LAYER_AXIS
        layers = range(shape[0]) if stacked else [None]
        shape = shape[1:] if stacked else shape
        cut = _layers_end(path) if stacked else 0
        for layer in layers:
            file, key, leaf = official_location(tuple(path)[:cut] + (layer,) + tuple(path)[cut:] if stacked else path)
            transform = _transform_for(leaf, len(shape))
            entries.append(NameMapEntry(path=tuple(path), file=file, key=key, transform=transform, jax_shape=shape,
                                        official_shape=official_shape(transform, shape),
                                        dtype=np.dtype(value.dtype), frozen_table=isinstance(var, PositionTable),
                                        axes=axes, layer=layer))
    keys = [(e.file, e.key) for e in entries]
    if len(set(keys)) != len(keys):
        raise AssertionError("name map is not one-to-one")
    return entries


def _layers_end(path) -> int:
    """Where a stacked variable's layer index goes in its path: just after its `layers` module."""
    return max(i for i, p in enumerate(path) if str(p) == "layers") + 1
