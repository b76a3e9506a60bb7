"""A Qwen2-1.5B-sized MoT LLM (28 layers, hidden 1536, 12 query / 2 KV heads, MLP 8960, vocab 151936, rope θ 1e6,
QK-norm) with the released SigLIP / FLUX AE / bridge geometry of configs/unimedvl_14b.py, bf16 compute, for one
accelerator: 8,192-token packs, 8 packs per step in 8 sequential micro-batches (≈ 3.58 B parameters with both MoT
experts, the ViT and the VAE)."""

import ml_collections

from configs import unimedvl_14b
from unimedvl_jax import config as C


def get_config() -> ml_collections.ConfigDict:
    """configs/unimedvl_14b.py with the 1.5B LLM and single-accelerator pack budgets."""
    cfg = unimedvl_14b.get_config()
    cfg.model.llm = C.llm_config(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                                 intermediate_size=8960, vocab_size=151936, rope_theta=1_000_000.0, qk_norm=True,
                                 layer_module="mot")
    cfg.model.attention_backend = "auto"  # the platform's fast backend (models/attention.py resolve_backend)
    # 8,192-token packs: the 14B budgets scaled by 8192 / 11520 (rounded to multiples of 512), same transforms.
    cfg.data.update(dict(max_tokens=8192, und_capacity=8192, gen_capacity=6144, max_ce=6144, max_vit_patches=6144,
                         max_vae_tokens=6144, max_vae_images=12))
    cfg.train.batch_packs = 8
    cfg.optim.grad_accum_steps = 8  # one pack per micro-batch keeps activations to one pack's
    return cfg
