"""SigLIP NaViT encoder: parity with HuggingFace SiglipVisionModel (docs/model.md §3.5, docs/model.md §3.6) and no
attention leak between packed images of different sizes.

Every HF weight is randomised (LayerNorm scales 1+0.1N, non-zero biases everywhere, position table N), so a
mis-mapped parameter, a wrong patch flattening order or wrong position ids fails the comparison.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from unimedvl_jax.config import vit_config
from unimedvl_jax.models.vit import SiglipVisionModel
from unimedvl_jax.testing import param_dict

TOL = 1e-4  # parity with HF (fp32)
PACK_TOL = 1e-5  # packed vs alone, both ours

HIDDEN, LAYERS, HEADS, INTER, PATCH, IMAGE = 32, 2, 2, 64, 14, 56
SIDE = IMAGE // PATCH  # 4: position table is SIDE x SIDE




def _patchify(image):
    """(3, H, W) -> (H/14 * W/14, 588): row-major patches, features in (row-in-patch, col-in-patch, channel) order."""
    c, h, w = image.shape
    x = image.reshape(c, h // PATCH, PATCH, w // PATCH, PATCH).transpose(1, 3, 2, 4, 0)
    return x.reshape((h // PATCH) * (w // PATCH), PATCH * PATCH * c)


def _position_ids(nh, nw):
    """Extrapolate flattened 2-D ids (docs/model.md §3.6): pid = r * SIDE + c, the top-left corner of the table."""
    r, c = np.meshgrid(np.arange(nh), np.arange(nw), indexing="ij")
    return (r * SIDE + c).reshape(-1)


@nnx.jit
def _forward(model, patches, pos, image_ids):
    return model(patches, pos, image_ids, backend="dense")


def _run(model, images):
    """Pack several (3, H, W) images into one patch sequence and run our encoder; returns per-image features."""
    patches, pos, ids, sizes = [], [], [], []
    for i, img in enumerate(images):
        nh, nw = img.shape[1] // PATCH, img.shape[2] // PATCH
        patches.append(_patchify(img))
        pos.append(_position_ids(nh, nw))
        ids.append(np.full(nh * nw, i))
        sizes.append(nh * nw)
    out = np.asarray(_forward(model, jnp.asarray(np.concatenate(patches), jnp.float32),
                              jnp.asarray(np.concatenate(pos), jnp.int32),
                              jnp.asarray(np.concatenate(ids), jnp.int32)))
    assert out.shape == (sum(sizes), HIDDEN)
    return np.split(out, np.cumsum(sizes)[:-1])


@pytest.fixture(scope="module")
def siglip_pair():
    from transformers import SiglipVisionConfig
    from transformers import SiglipVisionModel as HFSiglip

    hf_cfg = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, num_channels=3, image_size=IMAGE, patch_size=PATCH,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
                                attn_implementation="eager")
    hf = HFSiglip(hf_cfg).eval()
    assert not hf.vision_model.use_head
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "position_embedding" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))

    ours = SiglipVisionModel(vit_config(hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                                        intermediate_size=INTER, patch_size=PATCH, image_size=IMAGE),
                             dtype="float32", rngs=nnx.Rngs(0))
    params = param_dict(ours)
    written = set()
    for name, tensor in hf.state_dict().items():
        value = tensor.detach().numpy()
        if name.endswith("patch_embedding.weight"):  # conv (out, 3, 14, 14) -> Linear over (row, col, channel)
            target = name[: -len(".weight")] + ".kernel"
            value = value.transpose(2, 3, 1, 0).reshape(PATCH * PATCH * 3, HIDDEN)
        elif name.endswith(".weight") and value.ndim == 2 and "position_embedding" not in name:
            target, value = name[: -len(".weight")] + ".kernel", value.T
        else:
            target = name
        assert target in params, f"HF parameter {name} has no counterpart {target}"
        assert params[target][...].shape == value.shape, (target, params[target][...].shape, value.shape)
        params[target].set_value(jnp.asarray(value))
        written.add(target)
    assert written == set(params), f"not loaded from HF: {sorted(set(params) - written)}"
    return hf, ours


def test_matches_hf_siglip_on_full_grid(siglip_pair):
    hf, ours = siglip_pair
    image = np.random.default_rng(1).standard_normal((3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        expected = hf(pixel_values=torch.from_numpy(image)[None]).last_hidden_state[0].numpy()
    (got,) = _run(ours, [image])
    assert expected.shape == got.shape == (SIDE * SIDE, HIDDEN)
    diff = np.abs(got - expected).max()
    assert diff <= TOL, diff


def test_packed_images_of_different_sizes_do_not_interact(siglip_pair):
    _, ours = siglip_pair
    rng = np.random.default_rng(2)
    small = rng.standard_normal((3, 2 * PATCH, 3 * PATCH)).astype(np.float32)  # 2x3 patches
    full = rng.standard_normal((3, IMAGE, IMAGE)).astype(np.float32)  # 4x4 patches
    packed_small, packed_full = _run(ours, [small, full])
    (alone_small,) = _run(ours, [small])
    (alone_full,) = _run(ours, [full])
    diff = max(np.abs(packed_small - alone_small).max(), np.abs(packed_full - alone_full).max())
    assert diff <= PACK_TOL, diff
