"""Released UniMedVL geometry (BAGEL-7B-MoT, docs/model.md §1): Qwen2.5-7B MoT LLM, SigLIP-so400m (26 layers),
FLUX AE."""

import ml_collections

from unimedvl_jax import config as C
from unimedvl_jax.curriculum import curriculum_config
from unimedvl_jax.data_config import data_config
from unimedvl_jax.train.optim_config import optim_config
from unimedvl_jax.train.train_config import add_train_sections


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
        # Memory (docs/memory.md; README "Memory plan"): the platform's fast attention (splash on TPU, the Pallas
        # kernel on GPU), one scanned layer body, full remat per layer, CE logits 2,048 rows at a time, the frozen
        # VAE one canvas at a time.
        attention_backend="auto",
        scan_layers=True,
        remat_policy="full",
        ce_chunk_size=2048,
        vae_images_per_call=1,
    )
    # BAGEL fine-tune token budget (docs/training.md §7.2: expected 10240, max 11520 tokens per pack); transforms of
    # docs/inference.md §5.5 / docs/preprocessing.md §6.
    cfg.data = data_config(
        max_tokens=11520, und_capacity=11520, gen_capacity=8192, max_ce=8192, max_vit_patches=8192,
        max_vae_tokens=8192, max_vae_images=16, vae_image_size=(1024, 1024),
        vit_transform=dict(max_size=980, min_size=378, stride=14, max_pixels=2_007_040),
        vae_transform=dict(max_size=1024, min_size=512, stride=16, max_pixels=14 * 14 * 9 * 1024))
    cfg.curriculum = curriculum_config(steps=(85_000, 120_000, 70_000))  # docs/training.md §7.1
    cfg.optim = optim_config()
    add_train_sections(cfg, mesh_shape=(1, -1, 1), rules="fsdp", batch_packs=32, log_every=10,
                       checkpoint_every=1000, keep_checkpoints=3, log_record_ids=False)
    return cfg
