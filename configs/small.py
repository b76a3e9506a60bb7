"""The 'small' benchmark geometry (README "Training speed"): the config the official-vs-ours speed table was measured
with. LLM hidden 256, 4 MoT layers, 8 query / 4 KV heads; ViT hidden 128, 8 patches per side; FLUX AE ch 32."""

import ml_collections

from configs import tiny
from unimedvl_jax import config as C


def get_config() -> ml_collections.ConfigDict:
    """configs/tiny.py's training sections with the 'small' model geometry."""
    cfg = tiny.get_config()
    cfg.model = C.model_config(
        llm=C.llm_config(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=1024,
                         vocab_size=1024, qk_norm=True, layer_module="mot"),
        vit=C.vit_config(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512, patch_size=14,
                         image_size=112),
        vae=C.vae_config(resolution=128, ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=2, z_channels=4, norm_groups=32),
        latent_patch_size=2,
        max_latent_size=8,
        vit_max_num_patch_per_side=8,
        special_tokens=tiny.get_config().model.special_tokens,
        attention_block_size=64,  # blocksparse on CPU: 64-token blocks suit 100–300-token samples
    )
    return cfg
