"""The PackedBatch hand builder (unimedvl_jax.testing): official layout, padding layout, patchify order, errors."""

import json

import ml_collections
import numpy as np
import pytest

from unimedvl_jax import config as C
from unimedvl_jax.interop.official_batch import official_to_packed_batch
from unimedvl_jax.interop.official_config import model_config_from_official
from unimedvl_jax.interop.safetensors_io import SafetensorsReader
from unimedvl_jax.packed_batch import CAUSAL, FULL, NOISE, PAD, TEXT, VAE, VIT
from unimedvl_jax.testing import Text, VaeImage, VitImage, build_packed_batch

LAYOUT_FIELDS = ["text_ids", "token_kind", "sample_id", "split_id", "split_mode", "position_ids", "und_index",
                 "gen_index", "ce_index", "ce_labels", "vit_position_ids", "vit_image_id", "vit_token_index",
                 "vae_token_image", "vae_token_row", "vae_token_col", "vae_position_ids", "vae_token_index",
                 "vae_timestep"]


def small_config():
    return C.model_config(
        llm=C.llm_config(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, vocab_size=100),
        vit=C.vit_config(image_size=112), vae=C.vae_config(z_channels=4), vit_max_num_patch_per_side=8,
        max_latent_size=8,
        special_tokens=ml_collections.ConfigDict(dict(bos_token_id=96, eos_token_id=97, start_of_image=98,
                                                      end_of_image=99)))


def _samples_from_plan(plan, text_ids, cfg):
    """Rebuild the official sample plan as builder items, reading each text's ids from the packed text stream."""
    stream, p, samples = list(map(int, text_ids)), 0, []
    pixel = cfg.vit.patch_size
    pixel_per_token = cfg.vae.downsample * cfg.latent_patch_size
    for plan_sample in plan:
        items = []
        for it in plan_sample:
            dropped = bool(it.get("dropped", False))
            if it["type"] == "text":
                n = it["n_ids"]
                ids = [0] * n if dropped else stream[p + 1: p + 1 + n]
                label = it.get("special_token_label") if it.get("special_token_loss") else None
                items.append(Text(ids, loss=bool(it["loss"]), special_token_label=label, dropped=dropped))
                p += 0 if dropped else n + 2
                continue
            _, h, w = it["image_chw"]
            if it["type"] == "vit_image":
                items.append(VitImage((h // pixel, w // pixel), dropped=dropped))
            else:
                items.append(VaeImage((h // pixel_per_token, w // pixel_per_token), noised=bool(it["loss"]),
                                      timestep=it.get("timestep", 0.0), dropped=dropped))
            p += 0 if dropped else 2
        samples.append(items)
    assert p == len(stream)
    return samples


@pytest.mark.parametrize("name", ["train_mixed_fp32", "train_vqa_t2i_fp32", "train_t2i_fp32"])
def test_builder_reproduces_official_pack_layout(official_dir, name):
    """Rebuilding the recorded sample plans gives exactly the official index layout (docs/packed_sequence.md §4.2, incl.
    CFG drops)."""
    cfg = model_config_from_official(official_dir / "tiny_ckpt")
    fixture = json.loads((official_dir / "manifest.json").read_text())["fixtures"][name]
    reader = SafetensorsReader(official_dir / f"{name}.safetensors")
    tensors = {k: reader.get(k) for k in reader.keys()}
    official, _ = official_to_packed_batch(tensors, fixture["batch"]["attn_modes"],
                                           latent_channels=cfg.vae.z_channels)
    ours, latents, noise = build_packed_batch(_samples_from_plan(fixture["plan"], tensors["packed_text_ids"], cfg),
                                              cfg)
    for field in LAYOUT_FIELDS:
        np.testing.assert_array_equal(getattr(ours, field), getattr(official, field), err_msg=field)
    shapes = tensors.get("patchified_vae_latent_shapes", np.zeros((0, 2), int))
    assert latents.shape[0] == len(shapes) and noise.shape == (len(ours.vae_token_index),
                                                               cfg.latent_patch_size ** 2 * cfg.vae.z_channels)


def test_padding_layout():
    """pad_to adds one causal PAD sample with its own ids; every buffer pads with index T / neutral values."""
    cfg = small_config()
    samples = [[Text([1, 2], loss=True), VitImage((2, 2))], [Text([3]), VaeImage((1, 2), noised=True, timestep=0.4)]]
    caps = dict(und=30, gen=5, ce=6, vit=7, vae=4, vae_images=2)
    b, latents, noise = build_packed_batch(samples, cfg, pad_to=32, capacities=caps)
    t, n_real = 32, 4 + 6 + 3 + 4
    pad = np.asarray(b.token_kind) == PAD
    assert b.num_tokens == t and pad.sum() == t - n_real and pad[n_real:].all()
    assert set(b.sample_id[pad]) == {2} and set(b.split_mode[pad]) == {CAUSAL}
    assert len(set(b.split_id[pad])) == 1 and b.split_id[pad][0] > b.split_id[~pad].max()
    np.testing.assert_array_equal(b.split_mode[~pad], [CAUSAL] * 4 + [FULL] * 6 + [CAUSAL] * 3 + [NOISE] * 4)
    np.testing.assert_array_equal(b.position_ids[:n_real], [0, 1, 2, 3] + [4] * 6 + [0, 1, 2] + [3] * 4)
    for field, cap in [("und_index", 30), ("gen_index", 5), ("ce_index", 6), ("vit_token_index", 7),
                       ("vae_token_index", 4)]:
        idx = np.asarray(getattr(b, field))
        assert idx.shape == (cap,)
        real = idx[idx < t]
        assert np.all(np.diff(real) > 0) and np.all(idx[len(real):] == t), field
    kind = np.asarray(b.token_kind)
    assert set(kind[b.und_index[b.und_index < t]]) == {TEXT, VIT} and set(kind[b.gen_index[:2]]) == {VAE}
    np.testing.assert_array_equal(b.ce_index, [0, 1, 2, t, t, t])
    np.testing.assert_array_equal(b.ce_labels, [1, 2, 97, 0, 0, 0])
    np.testing.assert_array_equal(b.ce_weight, [1, 1, 1, 0, 0, 0])
    assert set(b.vit_image_id[4:]) == {1}  # padding patches form their own image
    np.testing.assert_array_equal(b.vae_timestep, np.float32([0.4, 0.4, -np.inf, -np.inf]))
    assert latents.shape == (2, 2, 4, 4) and b.vae_images.shape == (2, 16, 32, 3)
    assert noise.shape == (4, 16) and np.all(noise[2:] == 0)


def test_vit_patchify_order_and_positions():
    """Patch features are (row-in-patch, col-in-patch, channel); ids are r·side + c (docs/model.md §3.5,
    docs/model.md §3.6)."""
    cfg = small_config()
    pixels = np.random.default_rng(0).uniform(-1, 1, (28, 42, 3)).astype(np.float32)
    b, _, _ = build_packed_batch([[VitImage((2, 3), pixels=pixels)]], cfg)
    np.testing.assert_array_equal(b.vit_position_ids, [0, 1, 2, 8, 9, 10])
    np.testing.assert_array_equal(b.vit_token_index, np.arange(1, 7))
    for r in range(2):
        for c in range(3):
            for i, j, ch in [(0, 0, 0), (0, 1, 0), (1, 0, 2), (13, 5, 1), (7, 13, 2)]:
                assert b.vit_patches[r * 3 + c, (i * 14 + j) * 3 + ch] == pixels[r * 14 + i, c * 14 + j, ch]


@pytest.mark.parametrize("samples, kwargs, message", [
    ([[Text([1]), VitImage((9, 2))]], {}, "sample 0 item 1 (VitImage): grid 9x2 exceeds the 8x8"),
    ([[Text([1])], [VaeImage((2, 9))]], {}, "sample 1 item 0 (VaeImage): grid 2x9 exceeds the 8x8"),
    ([[Text([1, 100])]], {}, "record 'sample 0': token ids [100] outside [0, 100)"),
    ([[Text([1])]], dict(pad_to=2), "pad_to=2 is shorter than the 3 real tokens"),
    ([[Text([1], loss=True)]], dict(capacities=dict(ce=1)), "capacity ce=1 is smaller than the 2"),
    ([[Text([1])]], dict(capacities=dict(moe=3)), "unknown capacity keys ['moe']"),
    ([[VitImage((1, 1), dropped=True)]], {}, "record 'sample 0': the sample has no tokens"),
    ([[VitImage((1, 1), pixels=np.zeros((14, 15, 3)))]], {}, "pixels of shape (14, 15, 3), expected (14, 14, 3)"),
    ([[VaeImage((1, 1), noised=True, timestep=float("-inf"))]], {}, "noised image needs a finite timestep"),
    ([["text"]], {}, "sample 0 item 0 (str): unknown item type"),
])
def test_clear_errors(samples, kwargs, message):
    with pytest.raises(ValueError) as err:
        build_packed_batch(samples, small_config(), **kwargs)
    assert message in str(err.value)


def test_random_inputs_are_reproducible():
    """Pixels, latents and noise drawn from rng=None are the same on every call (seed 0), and differ by seed."""
    cfg = small_config()
    samples = [[VitImage((1, 2)), VaeImage((2, 2), noised=True)]]
    a = build_packed_batch(samples, cfg)
    b = build_packed_batch(samples, cfg)
    c = build_packed_batch(samples, cfg, rng=1)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0].vit_patches, b[0].vit_patches)
    assert not np.array_equal(a[2], c[2])


def test_special_token_labels_on_closing_markers():
    """special_token_label puts one CE label on the item's closing marker, as BAGEL's pack_sequence does: the
    <|vision_end|> of a ViT image, the <|im_end|> of a text with or without its own loss; nothing else moves."""
    cfg = small_config()
    plain = [[Text([1, 2]), VitImage((2, 2)), Text([3], loss=True)]]
    labelled = [[Text([1, 2], special_token_label=98), VitImage((2, 2), special_token_label=96),
                 Text([3], loss=True)]]
    a, _, _ = build_packed_batch(plain, cfg)
    b, _, _ = build_packed_batch(labelled, cfg)
    # [96 1 2 97] [98 v v v v 99] [96 3 97]: the closing markers of the first two items sit at 3 and 9
    assert b.text_ids[3] == 97 and b.text_ids[9] == 99
    np.testing.assert_array_equal(a.ce_index, [10, 11])
    np.testing.assert_array_equal(b.ce_index, [3, 9, 10, 11])
    np.testing.assert_array_equal(b.ce_labels, [98, 96, 3, 97])
    for field in sorted(set(LAYOUT_FIELDS) - {"ce_index", "ce_labels"}):
        np.testing.assert_array_equal(getattr(b, field), getattr(a, field), err_msg=field)
    with pytest.raises(ValueError, match=r"record 'sample 0': special token label \[100\] outside \[0, 100\)"):
        build_packed_batch([[VitImage((1, 1), special_token_label=100)]], cfg)


def test_matches_the_data_pipeline_on_a_record():
    """An editing record planned by data_pipelines (special_token_loss on: the answer's <|im_end|> predicts
    <|vision_start|>) and packed by its Packer gives the layout and ViT patches of the same items built here."""
    from configs import tiny
    from data_pipelines import schema
    from data_pipelines.packing import PackBudgets, Packer
    from data_pipelines.sample_plan import Transforms, record_to_plan
    from data_pipelines.transforms import ImageTransform
    from unimedvl_jax.tokenizers import SentencePieceTokenizer

    cfg = tiny.get_config().model
    texts = ["Make the lesion larger.", "Lesion enlarged."]
    tok = SentencePieceTokenizer.train(texts * 50, vocab_size=cfg.llm.vocab_size, special_ids=dict(cfg.special_tokens))
    rng = np.random.default_rng(0)
    images = [schema.encode_png(rng.integers(0, 256, hw + (3,), dtype=np.uint8)) for hw in [(48, 40), (32, 64)]]
    segments = [schema.Segment("image", "input", image=0), schema.Segment("text", "context", text=texts[0]),
                schema.Segment("text", "answer", text=texts[1]), schema.Segment("image", "target", image=1)]
    rec = schema.Record(id="e1", task="interleaved", segments=segments, images=images, modality="CT",
                        split="train", source="synthetic", source_scan="e1", license="CC0").validate()
    transforms = Transforms(vit=ImageTransform(56, 28, 14), vae=ImageTransform(64, 32, 16))
    plan = record_to_plan(rec, tok, transforms, cfg, np.random.default_rng(3), special_token_loss=True)
    (pack,) = Packer(PackBudgets(**plan.usage(), vae_image_size=(64, 64)), vit_patch_dim=14 * 14 * 3).pack_all([plan])

    stride = cfg.vae.downsample * cfg.latent_patch_size
    vae_hw = [tuple(s // stride for s in transforms.vae(schema.decode_image(im, record_id="e1")).shape[:2])
              for im in images]
    vit_pixels = transforms.vit(schema.decode_image(images[0], record_id="e1"))
    timestep = float(plan.vae_timestep[plan.vae_token_image == 1][0])
    items = [VaeImage(vae_hw[0]), VitImage((vit_pixels.shape[0] // 14, vit_pixels.shape[1] // 14), pixels=vit_pixels),
             Text(tok.encode(texts[0])), Text(tok.encode(texts[1]), loss=True, special_token_label=tok.start_of_image),
             VaeImage(vae_hw[1], noised=True, timestep=timestep)]
    ours, _, _ = build_packed_batch([items], cfg)
    assert pack.batch.ce_labels[-1] == tok.start_of_image
    for field in LAYOUT_FIELDS + ["vit_patches", "ce_weight"]:
        np.testing.assert_array_equal(getattr(ours, field), getattr(pack.batch, field), err_msg=field)
