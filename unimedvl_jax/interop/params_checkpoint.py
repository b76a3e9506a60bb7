"""A params checkpoint: an orbax directory holding the model config and its weights (raw and/or EMA).

Layout:  <dir>/config.json   the model ConfigDict
         <dir>/params/       orbax StandardCheckpointer save of the nnx.State of params + fixed tables
         <dir>/ema/          optional, same structure (EMA weights)
`unimedvl-import` writes one; `unimedvl-export` reads one (EMA by default when present).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from unimedvl_jax.config import validate_model_config
from unimedvl_jax.models.bridges import PositionTable
from unimedvl_jax.models.unimedvl import UniMedVL

WEIGHT_ITEMS = ("params", "ema")


def weights_state(model) -> nnx.State:
    """The exported state of a model: every nnx.Param and fixed position table."""
    return nnx.state(model, nnx.Any(nnx.Param, PositionTable))


def save_params_checkpoint(path, model, cfg, *, ema_model=None) -> None:
    """Save config + raw weights (+ EMA weights) of a UniMedVL to `path` (must not exist)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists")
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "params"), weights_state(model))
    if ema_model is not None:
        ckptr.save(os.path.join(path, "ema"), weights_state(ema_model))
    ckptr.wait_until_finished()


def load_params_config(path) -> ml_collections.ConfigDict:
    """The model config stored in a params checkpoint."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; {path} is not a params checkpoint")
    with open(cfg_path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    validate_model_config(cfg)
    return cfg


def available_weights(path) -> list[str]:
    """Which weight items ('params', 'ema') a params checkpoint holds."""
    return [w for w in WEIGHT_ITEMS if os.path.isdir(os.path.join(path, w))]


def load_params_checkpoint(path, *, weights: str = "ema"):
    """(model, cfg) from a params checkpoint; weights='ema' falls back to raw params when no EMA was saved."""
    path = os.path.abspath(os.fspath(path))
    cfg = load_params_config(path)
    have = available_weights(path)
    if weights not in WEIGHT_ITEMS:
        raise ValueError(f"weights={weights!r} not in {WEIGHT_ITEMS}")
    item = weights if weights in have else ("params" if weights == "ema" and "params" in have else None)
    if item is None:
        raise FileNotFoundError(f"{path}: no {weights!r} weights (has {have})")
    # Weights are placed by the restore, not at variable creation: independent of the caller's eager-sharding mode.
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: UniMedVL(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    device = jax.local_devices()[0]  # this process's own (jax.devices()[0] belongs to process 0)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(device)),
        state)
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, item), target)
    return nnx.merge(graphdef, restored), cfg
