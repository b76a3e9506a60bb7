"""Model configuration schema (ml_collections) shared by every file under configs/.

Every constant the official code reads from its configs is a field here (docs/quirks.md §10): norm epsilons, rope θ,
head_dim, VAE geometry and scale/shift, patch sizes, position-table sides and special-token ids.
"""

from __future__ import annotations

import ml_collections

LAYER_MODULES = ("dense", "moe", "mot")
ATTENTION_BACKENDS = ("auto", "dense", "chunked", "blocksparse", "cpu_ffi", "splash", "pallas_gpu")
# models/remat.py REMAT_POLICIES (defined there; listed here so that configs are checked without the models)
REMAT_POLICY_NAMES = ("none", "full", "minimal", "save_qkv_proj", "save_attention_out", "offload_qkv_proj",
                      "offload_attention_out")


def llm_config(**overrides) -> ml_collections.ConfigDict:
    """Qwen2 geometry (docs/model.md §1.1) with the loader overrides applied (qk_norm, untied head, MoT layers)."""
    c = ml_collections.ConfigDict(dict(
        hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944,
        vocab_size=152064, rope_theta=1_000_000.0, rms_norm_eps=1e-6, qk_norm=True,
        layer_module="mot", max_position_embeddings=32768,
    ))
    c.update(overrides)
    return c


def vit_config(**overrides) -> ml_collections.ConfigDict:
    """SigLIP-so400m NaViT geometry as instantiated (docs/model.md §1.2): 26 layers, learned 70x70 position table."""
    c = ml_collections.ConfigDict(dict(
        hidden_size=1152, num_layers=26, num_heads=16, intermediate_size=4304, patch_size=14,
        image_size=980, num_channels=3, layer_norm_eps=1e-6,
    ))
    c.update(overrides)
    return c


def vae_config(**overrides) -> ml_collections.ConfigDict:
    """FLUX.1 autoencoder geometry (docs/model.md §1.3)."""
    c = ml_collections.ConfigDict(dict(
        resolution=256, in_channels=3, downsample=8, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4],
        num_res_blocks=2, z_channels=16, scale_factor=0.3611, shift_factor=0.1159, norm_groups=32,
        norm_eps=1e-6,
    ))
    c.update(overrides)
    return c


def model_config(*, llm=None, vit=None, vae=None, **overrides) -> ml_collections.ConfigDict:
    """Top-level UniMedVL model config (docs/model.md §1.4 Bagel fields, special tokens, kernels, precision)."""
    c = ml_collections.ConfigDict(dict(
        llm=llm if llm is not None else llm_config(),
        vit=vit if vit is not None else vit_config(),
        vae=vae if vae is not None else vae_config(),
        latent_patch_size=2,
        max_latent_size=64,
        vit_max_num_patch_per_side=70,
        connector_act="gelu_pytorch_tanh",
        interpolate_pos=False,
        # BagelConfig (training) shift; the sampler has its own (docs/model.md §1.4, docs/quirks.md §9.16)
        timestep_shift=1.0,
        special_tokens=ml_collections.ConfigDict(dict(
            bos_token_id=151644, eos_token_id=151645, start_of_image=151652, end_of_image=151653)),
        # 'auto' = the fast backend of the platform (TPU splash, GPU pallas_gpu, else blocksparse); 'dense' is the
        # reference, 'chunked' the memory-bounded fallback for arbitrary metadata (docs/packed_sequence.md §4.7).
        attention_backend="auto",
        attention_block_size=512,
        dtype="float32",  # activation/compute dtype
        param_dtype="float32",  # master weight dtype
        # Memory for large runs (docs/memory.md): decoder / ViT layers as one scanned body over stacked parameters,
        # and the rematerialisation policy of each decoder and ViT layer (models/remat.py REMAT_POLICIES).
        scan_layers=False,
        remat_policy="none",
        ce_chunk_size=0,  # lm_head + CE over this many CE rows at a time, logits recomputed in the backward (0: all)
        vae_images_per_call=0,  # VAE encode / decode this many images per call (0: 1 on CPU, all elsewhere)
    ))
    c.update(overrides)
    return c


def validate_model_config(c: ml_collections.ConfigDict) -> None:
    """Fail clearly on the config couplings the official loaders assume silently (docs/quirks.md §10.4)."""
    errors = []
    if c.llm.layer_module not in LAYER_MODULES:
        errors.append(f"llm.layer_module={c.llm.layer_module!r} not in {LAYER_MODULES}")
    if c.llm.hidden_size % c.llm.num_heads:
        errors.append(f"llm.hidden_size {c.llm.hidden_size} not divisible by num_heads {c.llm.num_heads}")
    if c.llm.num_heads % c.llm.num_kv_heads:
        errors.append(f"llm.num_heads {c.llm.num_heads} not divisible by num_kv_heads {c.llm.num_kv_heads}")
    if c.vit.hidden_size % c.vit.num_heads:
        errors.append(f"vit.hidden_size {c.vit.hidden_size} not divisible by num_heads {c.vit.num_heads}")
    if c.vit.image_size // c.vit.patch_size != c.vit_max_num_patch_per_side:
        errors.append(f"vit.image_size/patch_size = {c.vit.image_size}/{c.vit.patch_size} must equal "
                      f"vit_max_num_patch_per_side={c.vit_max_num_patch_per_side}")
    if c.vae.downsample != 2 ** (len(c.vae.ch_mult) - 1):
        errors.append(f"vae.downsample={c.vae.downsample} must equal 2**(len(ch_mult)-1)="
                      f"{2 ** (len(c.vae.ch_mult) - 1)}")
    if remat_policy(c) not in REMAT_POLICY_NAMES:
        errors.append(f"remat_policy={remat_policy(c)!r} not in {REMAT_POLICY_NAMES}")
    if c.attention_backend not in ATTENTION_BACKENDS:
        errors.append(f"attention_backend={c.attention_backend!r} not in {ATTENTION_BACKENDS}")
    if errors:
        raise ValueError("invalid UniMedVL model config:\n  " + "\n  ".join(errors))


def remat_policy(c: ml_collections.ConfigDict) -> str:
    """The model's remat policy name; configs written before `remat_policy` existed say remat=True / False."""
    if "remat_policy" in c:
        return c.remat_policy
    return "full" if c.get("remat", False) else "none"
