"""VQA with the KV cache reproduces the official Bagel.chat / InterleaveInferencer runs recorded in the fixtures:
ViT tokens from the raw image (docs/preprocessing.md §6 transform + docs/model.md §3.5 patchify), the prefill KV cache
(post k-norm + RoPE, docs/inference.md §5.1), every step's logits and the greedy tokens (docs/inference.md §5.2)."""

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_pipelines.transforms import ImageTransform, patchify_vit
from unimedvl_jax.inference.context import Context
from unimedvl_jax.interop.checkpoint_import import import_official
from unimedvl_jax.interop.safetensors_io import SafetensorsReader

TOL = 1e-4


def read(path):
    with SafetensorsReader(path) as r:
        return {k: r.get(k) for k in r.keys()}


@pytest.fixture(scope="module")
def model(official_dir):
    return import_official(official_dir / "tiny_ckpt")[0]


def grid_of(position_ids, side):
    rows, cols = np.asarray(position_ids) // side, np.asarray(position_ids) % side
    return int(rows.max()) + 1, int(cols.max()) + 1


def vit_patches(image, transform, patch):
    pixels = transform(image)
    return patchify_vit(pixels, patch), (pixels.shape[0] // patch, pixels.shape[1] // patch)


def run_vqa(model, patches, grid, prompt_ids, max_length):
    ctx = Context.new(model, 128).add_vit_image(patches, grid).add_text(prompt_ids[1:-1])
    return ctx, ctx.generate_text(max_length)


def test_chat_path_matches_official(model, official_dir):
    t = read(official_dir / "infer_vqa_chat_fp32.safetensors")
    side, patch = model.cfg.vit_max_num_patch_per_side, model.cfg.vit.patch_size
    patches, grid = vit_patches(Image.fromarray(t["image_uint8_hwc"]), ImageTransform(112, 28, 14), patch)
    assert np.max(np.abs(patches - t["vit_packed_vit_tokens"])) <= 1e-6
    assert grid == grid_of(t["vit_packed_vit_position_ids"], side)
    ctx, (ids, logits) = run_vqa(model, patches, grid, t["prompt_ids"], len(t["generated_ids"]))
    assert ctx.kv_len == len(t["vit_packed_position_ids"]) + len(t["prompt_ids"])
    for i in range(model.cfg.llm.num_layers):
        for kind in ("key", "value"):
            cached = np.asarray((ctx.cache.keys if kind == "key" else ctx.cache.values)[i, :ctx.kv_len])
            assert np.max(np.abs(cached - t[f"prefill_kv_layer{i}_{kind}"])) <= TOL, (i, kind)
    assert np.max(np.abs(logits - t["step_logits"])) <= TOL
    assert ids == t["generated_ids"].tolist()


def test_inferencer_path_matches_official(model, official_dir):
    """InterleaveInferencer resizes with the VAE rule first, then the ViT transform
    (docs/inference.md §5.3 'Before adding')."""
    chat = read(official_dir / "infer_vqa_chat_fp32.safetensors")
    t = read(official_dir / "infer_vqa_inferencer_fp32.safetensors")
    image = Image.fromarray(chat["image_uint8_hwc"])
    vae_rule = ImageTransform(64, 32, 16)
    image = vae_rule.resize(image)
    assert image.size == (48, 32)
    patches, grid = vit_patches(image, ImageTransform(112, 28, 14), model.cfg.vit.patch_size)
    assert np.max(np.abs(patches - t["vit_packed_vit_tokens"])) <= 1e-6
    _, (ids, logits) = run_vqa(model, patches, grid, t["prompt_ids"], len(t["generated_ids"]))
    assert np.max(np.abs(logits - t["step_logits"])) <= TOL
    assert ids == t["generated_ids"].tolist()


def test_generation_stops_at_im_end_and_context_is_unchanged(model):
    """The newly predicted <|im_end|> ends generation and is not returned; gen works on a copy
    (docs/inference.md §5.2)."""
    st = model.cfg.special_tokens
    ctx = Context.new(model, 64).add_text([40, 41, 42])
    before = (ctx.kv_len, ctx.rope, np.asarray(ctx.cache.keys).copy())
    ids, logits = ctx.generate_text(6)
    assert (ctx.kv_len, ctx.rope) == before[:2] and np.array_equal(np.asarray(ctx.cache.keys), before[2])
    assert ids[0] == st.bos_token_id and st.eos_token_id not in ids and len(logits) == len(ids) == 6
    # Make <|im_end|> the first step's argmax: its lm_head column = 10 x that of the token predicted there.
    first = ids[1]
    assert logits[0, first] > 0
    eos_model = nnx.clone(model)
    kernel = eos_model.language_model.lm_head.kernel
    kernel[...] = kernel[...].at[:, st.eos_token_id].set(10.0 * kernel[...][:, first])
    eos_ids, eos_logits = Context(eos_model, ctx.cache, ctx.kv_len, ctx.rope).generate_text(6)
    assert eos_ids == [st.bos_token_id] and len(eos_logits) == 1
    with pytest.raises(ValueError, match="context overflow"):
        Context.new(model, 4).add_text([1, 2, 3, 4])
