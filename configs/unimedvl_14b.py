"""Released UniMedVL geometry (BAGEL-7B-MoT, spec §1): Qwen2.5-7B MoT LLM, SigLIP-so400m (26 layers), FLUX AE."""

import ml_collections

from unimedvl_jax import config as C


def get_config() -> ml_collections.ConfigDict:
    """Return the experiment config for the released 14B model."""
    cfg = ml_collections.ConfigDict()
    cfg.model = C.model_config(
        llm=C.llm_config(),
        vit=C.vit_config(),
        vae=C.vae_config(),
        latent_patch_size=2,
        max_latent_size=64,
        vit_max_num_patch_per_side=70,
        dtype="bfloat16",
        attention_backend="chunked",
        remat=True,
    )
    return cfg
