"""A trained VAE on disk, and installing it into a UniMedVL before its training starts.

Layout:  <dir>/config.json   the vae config (with the fitted scale/shift) and the training report
         <dir>/params/       orbax StandardCheckpointer save of the AutoEncoder's nnx.Param state
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from unimedvl_jax.errors import UserError, read_json
from unimedvl_jax.models.vae import AutoEncoder

GEOMETRY_KEYS = ("resolution", "in_channels", "downsample", "ch", "out_ch", "ch_mult", "num_res_blocks",
                 "z_channels", "norm_groups", "norm_eps")


def save_vae_checkpoint(path: str, vae: AutoEncoder, vae_cfg, report: dict | None = None) -> None:
    """Write config.json (vae config + report) and params/ for an AutoEncoder."""
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "params"), nnx.state(vae, nnx.Param))
    checkpointer.wait_until_finished()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vae": vae_cfg.to_dict(), "report": report or {}}, f, indent=2)


def load_vae_config(path: str) -> ml_collections.ConfigDict:
    """The vae config (with its fitted latent scale/shift) of a VAE checkpoint."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; {path} is not a VAE checkpoint (unimedvl-train-vae)")
    saved = read_json(cfg_path, what="VAE checkpoint config (JSON)")
    if not isinstance(saved, dict) or not isinstance(saved.get("vae"), dict):
        raise UserError(f"{cfg_path}: no 'vae' section (a JSON object); {path} is not a VAE checkpoint "
                        f"(unimedvl-train-vae)")
    return ml_collections.ConfigDict(saved["vae"])


def adopt_vae_config(model_cfg, path: str) -> None:
    """Set model_cfg.vae's latent scale/shift from a VAE checkpoint; its geometry must match (in place)."""
    saved = load_vae_config(path)
    diff = {k: (model_cfg.vae[k], saved[k]) for k in GEOMETRY_KEYS
            if json.dumps(model_cfg.vae[k]) != json.dumps(saved[k])}
    if diff:
        raise UserError(f"VAE checkpoint {path} does not match model.vae: " +
                         ", ".join(f"{k}: config {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items()))
    model_cfg.vae.scale_factor, model_cfg.vae.shift_factor = saved.scale_factor, saved.shift_factor


def install_vae_weights(vae: AutoEncoder, path: str) -> None:
    """Load a VAE checkpoint's weights into an AutoEncoder (in place), keeping each parameter's sharding."""
    current = nnx.state(vae, nnx.Param)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current)
    nnx.update(vae, ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"), target))


def install_vae(model, path: str) -> None:
    """Load a VAE checkpoint into model.vae_model (in place); adopt_vae_config must have set its scale/shift."""
    saved = load_vae_config(path)
    vae = model.vae_model
    if (vae.scale_factor, vae.shift_factor) != (saved.scale_factor, saved.shift_factor):
        raise ValueError(f"model built with vae scale/shift {vae.scale_factor}/{vae.shift_factor} but {path} "
                         f"fitted {saved.scale_factor}/{saved.shift_factor}; call adopt_vae_config(cfg.model, "
                         f"path) before building the model")
    install_vae_weights(vae, path)
