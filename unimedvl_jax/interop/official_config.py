"""Read/write the official llm_config.json / vit_config.json (+ our fixture/VAE params) as a model config.

The loader overrides of docs/model.md §1.1 / docs/model.md §1.2 are applied on read: qk_norm=True, untied lm_head, MoT
layers, ViT rope off and `num_hidden_layers - 1` ViT layers (docs/quirks.md §9.15).
"""

from __future__ import annotations

import os

import ml_collections

from unimedvl_jax import config as C
from unimedvl_jax.errors import UserError, read_json

VIT_LAYERS_DROPPED = 1  # the official loaders instantiate config.num_hidden_layers - 1 ViT layers


def _read_json(path):
    try:
        data = read_json(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: missing (an official checkpoint directory needs it)") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return _Keys(data, path)


class _Keys(dict):
    """A JSON object whose missing key is a UserError naming the file and the key."""

    def __init__(self, data: dict, path: str):
        super().__init__(data)
        self.path = path

    def __missing__(self, key):
        raise UserError(f"{self.path}: required key {key!r} is missing")


def model_config_from_official(ckpt_dir, *, base: ml_collections.ConfigDict | None = None,
                               layer_module: str = "mot", qk_norm: bool = True) -> ml_collections.ConfigDict:
    """Model config for an official directory; fields the JSON files lack come from `base` (default released).

    `fixture_config.json` (the tiny test checkpoint) and `bagel_config.json` (our exports) add the Bagel-level
    fields and VAE params; the released snapshot has neither and uses the released values (docs/model.md §1.3,
    docs/model.md §1.4).
    """
    cfg = ml_collections.ConfigDict(base.to_dict()) if base is not None else C.model_config()
    llm = _read_json(os.path.join(ckpt_dir, "llm_config.json"))
    vit = _read_json(os.path.join(ckpt_dir, "vit_config.json"))
    cfg.llm.update(dict(
        hidden_size=llm["hidden_size"], num_layers=llm["num_hidden_layers"], num_heads=llm["num_attention_heads"],
        num_kv_heads=llm.get("num_key_value_heads", llm["num_attention_heads"]),
        intermediate_size=llm["intermediate_size"], vocab_size=llm["vocab_size"],
        rope_theta=float(llm.get("rope_theta", 10000.0)), rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=llm.get("max_position_embeddings", 32768), qk_norm=qk_norm,
        layer_module=layer_module))
    cfg.vit.update(dict(
        hidden_size=vit["hidden_size"], num_layers=vit["num_hidden_layers"] - VIT_LAYERS_DROPPED,
        num_heads=vit["num_attention_heads"], intermediate_size=vit["intermediate_size"],
        patch_size=vit["patch_size"], image_size=vit["image_size"], num_channels=vit.get("num_channels", 3),
        layer_norm_eps=float(vit.get("layer_norm_eps", 1e-6))))
    for extra in ("fixture_config.json", "bagel_config.json"):
        path = os.path.join(ckpt_dir, extra)
        if os.path.exists(path):
            _apply_bagel_fields(cfg, _read_json(path))
    try:
        C.validate_model_config(cfg)
    except ValueError as e:
        raise UserError(f"{ckpt_dir}: the config files describe no valid model: {e}") from e
    return cfg


# FLUX AE fields carried in bagel_config.json's vae_params (the official AE hard-codes them; norm_groups/norm_eps
# only differ from FLUX's 32 / 1e-6 in small from-scratch VAEs and are optional when reading).
VAE_PARAM_KEYS = ("resolution", "in_channels", "downsample", "ch", "out_ch", "ch_mult", "num_res_blocks",
                  "z_channels", "scale_factor", "shift_factor", "norm_groups", "norm_eps")


def _apply_bagel_fields(cfg, extra):
    for key in ("latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side", "timestep_shift",
                "interpolate_pos", "connector_act"):
        if key in extra.get("bagel_config", {}):
            cfg[key] = extra["bagel_config"][key]
    if "vae_params" in extra:
        vae = dict(extra["vae_params"])
        cfg.vae.update({k: vae[k] for k in VAE_PARAM_KEYS if k in vae})
    if "special_token_ids" in extra:
        cfg.special_tokens.update(extra["special_token_ids"])
