"""A params checkpoint: an orbax directory holding the model config and its weights (raw and/or EMA).

Layout:  <dir>/config.json   the model ConfigDict
         <dir>/params/       orbax StandardCheckpointer save of the nnx.State of params + fixed tables
         <dir>/ema/          optional, same structure (EMA weights)
`unimedvl-import` writes one; `unimedvl-export` reads one (EMA by default when present).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from unimedvl_jax.config import validate_model_config
from unimedvl_jax.errors import UserError, read_json
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
    data = read_json(cfg_path, what="model config (JSON)")
    if not isinstance(data, dict):
        raise UserError(f"{cfg_path}: expected a JSON object (the model config), found {type(data).__name__}")
    cfg = ml_collections.ConfigDict(data)
    try:
        validate_model_config(cfg)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a field missing or of the wrong type
        raise UserError(f"{cfg_path}: not a valid model config: {e}") from e
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
    checkpointer = ocp.StandardCheckpointer()
    _check_stored_shapes(checkpointer, os.path.join(path, item), target)
    try:
        restored = checkpointer.restore(os.path.join(path, item), target)
    except Exception as e:  # orbax / tensorstore: a damaged file, or weights that do not match config.json
        raise UserError(f"{os.path.join(path, item)}: cannot restore the {item} weights of this config.json: "
                        f"{_first_line(e)}") from e
    finally:
        checkpointer.close()  # also ends the reads still in flight after a failed one (no noise at exit)
    return nnx.merge(graphdef, restored), cfg


def _check_stored_shapes(checkpointer, directory: str, target, *, listed: int = 8) -> None:
    """UserError listing the arrays whose stored shape differs from the model that config.json describes (or that
    only one side has), before a restore that would fail on them. Unreadable metadata is left to the restore."""
    try:
        stored_tree = checkpointer.metadata(directory).item_metadata
    except Exception:  # noqa: BLE001 - the restore reports what is wrong with the directory
        return
    stored = {_leaf_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(stored_tree or {})
              if getattr(x, "shape", None) is not None}
    if not stored:
        return
    wanted = {_leaf_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
    problems = [f"{k}: stored {stored[k]}, config.json needs {wanted[k]}" for k in wanted
                if k in stored and stored[k] != wanted[k]]
    problems += [f"{k}: missing (config.json needs {wanted[k]})" for k in wanted if k not in stored]
    problems += [f"{k}: not in the model config.json describes" for k in stored if k not in wanted]
    if problems:
        more = f"; ... ({len(problems) - listed} more)" if len(problems) > listed else ""
        raise UserError(f"{directory}: the weights do not match the model of {os.path.dirname(directory)}/config.json "
                        f"({len(problems)} arrays): " + "; ".join(problems[:listed]) + more)


def _leaf_name(path) -> str:
    """'llm.layers.0.mlp.kernel.value' of a pytree key path."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _first_line(error: BaseException, limit: int = 400) -> str:
    """The first line of an error message (tensorstore's run to pages of JSON), at most `limit` characters."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0].split(" See full TensorStore details")[0]
    return text if len(text) <= limit else text[:limit] + " ..."
