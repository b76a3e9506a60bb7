"""configs/tiny.py shrunk for the training-loop tests (CPU, fp32): 2-layer 64-wide LLM, 1-layer ViT, small VAE,
256-token packs, 3 stages of 4 steps. Used as `unimedvl-train --config tests/train/loop_config.py ...`."""

from configs import tiny


def get_config():
    cfg = tiny.get_config()
    m = cfg.model
    m.llm.update(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
    m.vit.update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, image_size=56)
    m.vit_max_num_patch_per_side = 4
    m.vae.update(ch=8, norm_groups=8, num_res_blocks=1, resolution=64)
    m.max_latent_size = 4
    cfg.data.update(max_tokens=256, und_capacity=256, gen_capacity=64, max_ce=128, max_vit_patches=64,
                    max_vae_tokens=64, max_vae_images=4, vae_image_size=(64, 64))
    cfg.data.vit_transform.update(max_size=56, min_size=28)
    cfg.data.vae_transform.update(max_size=64, min_size=32)
    cfg.curriculum.stage_steps = (4, 4, 4)
    cfg.curriculum.lr = (1e-3, 1e-3, 1e-3)
    cfg.curriculum.warmup_steps = (2, 0, 0)
    cfg.curriculum.schedule = ("constant", "constant", "cosine")
    cfg.curriculum.trainable = (r"^language_model\.", r"^(?!vae_model\.)", r"^(?!vae_model\.)")
    cfg.optim.ema_decay = 0.9
    cfg.train.update(batch_packs=2, log_every=4, checkpoint_every=6, keep_checkpoints=3)
    return cfg
