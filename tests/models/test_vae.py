"""FLUX.1 autoencoder: parity with diffusers AutoencoderKL, released geometry vs docs/model.md §2.2, latent sampling
(docs/model.md §3.10)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from unimedvl_jax.config import vae_config
from unimedvl_jax.models.vae import AutoEncoder, Conv2d, GroupNorm

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _no_eager_sharding():
    with nnx.use_eager_sharding(False):
        yield


def _params(module):
    """{dotted path: Param} over every parameter of `module`."""
    return {".".join(map(str, path)): var for path, var in nnx.iter_graph(module) if isinstance(var, nnx.Param)}


# --------------------------------------------------------------------------------------------------------------
# 1. Parity with diffusers (FLUX-style AutoencoderKL: no quant convs, single-head mid attention)
# --------------------------------------------------------------------------------------------------------------

PARITY_CH, PARITY_MULT, PARITY_Z, PARITY_GROUPS = 32, (1, 2, 2, 2), 4, 8


@pytest.fixture(scope="module")
def diffusers_vae():
    """A FLUX-geometry diffusers AutoencoderKL (block_out_channels 32,64,64,64) with every weight randomised."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    n = len(PARITY_MULT)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=PARITY_Z, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(PARITY_CH * m for m in PARITY_MULT), norm_num_groups=PARITY_GROUPS,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):  # GroupNorm affine scale
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
    return vae


def _diffusers_key_to_ours(key: str) -> str:
    """Map a diffusers AutoencoderKL state-dict key to our (FLUX-named) parameter path."""
    parts = key.split(".")
    leaf = parts[-1]
    n_levels = len(PARITY_MULT)
    out = []
    i = 0
    while i < len(parts) - 1:
        p = parts[i]
        if p == "down_blocks":
            out += ["down", parts[i + 1]]
            i += 2
        elif p == "up_blocks":  # diffusers up_blocks run lowest-res first; FLUX up[k] is resolution level k
            out += ["up", str(n_levels - 1 - int(parts[i + 1]))]
            i += 2
        elif p == "resnets" and out[-1] == "mid_block":
            out[-1:] = ["mid", {"0": "block_1", "1": "block_2"}[parts[i + 1]]]
            i += 2
        elif p == "resnets":
            out += ["block", parts[i + 1]]
            i += 2
        elif p == "attentions":  # mid_block.attentions.0
            out[-1:] = ["mid", "attn_1"]
            i += 2
        elif p in ("downsamplers", "upsamplers"):
            out.append("downsample" if p == "downsamplers" else "upsample")
            i += 2
        elif p == "to_out":  # to_out.0 (to_out.1 is dropout)
            out.append("proj_out")
            i += 2
        else:
            out.append({"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k",
                        "to_v": "v", "conv_norm_out": "norm_out"}.get(p, p))
            i += 1
    return ".".join(out + [leaf])


def _to_jax_value(key, t):
    """Convert a diffusers tensor: conv (out,in,kh,kw) and attention Linear (out,in) become (kh,kw,in,out)."""
    a = t.detach().numpy()
    if a.ndim == 4:
        a = a.transpose(2, 3, 1, 0)
    elif a.ndim == 2:
        a = a.T[None, None]
    return jnp.asarray(a)


def _ours_from_diffusers(vae):
    """Our AutoEncoder holding the diffusers weights; every parameter must be assigned exactly once."""
    cfg = vae_config(ch=PARITY_CH, ch_mult=list(PARITY_MULT), z_channels=PARITY_Z, norm_groups=PARITY_GROUPS,
                     downsample=2 ** (len(PARITY_MULT) - 1))
    model = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0)))  # every param is overwritten below
    params = _params(model)
    for key, t in vae.state_dict().items():
        path = _diffusers_key_to_ours(key)
        if path.endswith(".weight") and t.ndim in (2, 4):
            path = path[: -len("weight")] + "kernel"
        assert path in params, (key, path)
        value = _to_jax_value(key, t)
        var = params.pop(path)
        assert var.get_value().shape == value.shape, (key, path, var.get_value().shape, value.shape)
        var.set_value(value)
    assert not params, f"parameters without a diffusers counterpart: {sorted(params)}"
    return model


def test_diffusers_downsample_pads_bottom_right(diffusers_vae):
    """diffusers' encoder Downsample2D (padding=0) must pad (0,1,0,1), i.e. right and bottom, like FLUX."""
    ds = diffusers_vae.encoder.down_blocks[0].downsamplers[0]
    assert ds.padding == 0 and ds.conv.stride == (2, 2) and ds.conv.padding == (0, 0)
    x = torch.randn(1, ds.channels, 6, 8)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), ds.conv.weight, ds.conv.bias, stride=2)
    torch.testing.assert_close(ds(x), ref, rtol=0, atol=0)


def test_parity_with_diffusers(diffusers_vae):
    """Encoder moments and decoder output match diffusers to 1e-4 on a non-square 32x48 image."""
    vae = diffusers_vae
    model = _ours_from_diffusers(vae)

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(2, 3, 32, 48)).astype(np.float32)
    z = rng.standard_normal(size=(2, PARITY_Z, 4, 6)).astype(np.float32)
    with torch.no_grad():
        ref_moments = vae.encoder(torch.from_numpy(x)).numpy()
        ref_image = vae.decoder(torch.from_numpy(z)).numpy()

    mean, logvar = model.encode_moments(jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert mean.shape == logvar.shape == (2, 4, 6, PARITY_Z)
    moments = np.concatenate([np.asarray(mean), np.asarray(logvar)], axis=-1).transpose(0, 3, 1, 2)
    image = np.asarray(model.decoder(jnp.asarray(z.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)

    enc_diff = np.max(np.abs(moments - ref_moments))
    dec_diff = np.max(np.abs(image - ref_image))
    print(f"encoder max|diff|={enc_diff:.3e} (|ref|max={np.abs(ref_moments).max():.2f}); "
          f"decoder max|diff|={dec_diff:.3e} (|ref|max={np.abs(ref_image).max():.2f})")
    assert np.abs(ref_moments).max() > 0.1 and np.abs(ref_image).max() > 0.1  # non-trivial outputs
    assert enc_diff <= TOL
    assert dec_diff <= TOL


# --------------------------------------------------------------------------------------------------------------
# 2. Released geometry: names, shapes, parameter count and sharding metadata against docs/model.md §2.2
# --------------------------------------------------------------------------------------------------------------


def official_flux_ae_shapes(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, in_ch=3, out_ch=3, z=16):
    """Official FLUX `ae.safetensors` keys → torch shapes, enumerated from the docs/model.md §2.2 rules."""
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(prefix, c):
        resblock(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{proj}", c, c, 1)
        resblock(f"{prefix}.mid.block_2", c, c)

    levels = [ch * m for m in ch_mult]
    conv("encoder.conv_in", in_ch, ch, 3)
    cin = ch
    for i, c in enumerate(levels):
        for j in range(num_res_blocks):
            resblock(f"encoder.down.{i}.block.{j}", cin, c)
            cin = c
        if i != len(levels) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, 2 * z, 3)

    cin = levels[-1]
    conv("decoder.conv_in", z, cin, 3)
    mid("decoder", cin)
    for k in reversed(range(len(levels))):
        for j in range(num_res_blocks + 1):
            resblock(f"decoder.up.{k}.block.{j}", cin, levels[k])
            cin = levels[k]
        if k != 0:
            conv(f"decoder.up.{k}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", cin, out_ch, 3)
    return shapes


def test_released_geometry_matches_official_state_dict():
    """nnx.eval_shape of the released AE: same keys/shapes/count as docs/model.md §2.2, logical axes on every param."""
    cfg = vae_config()
    model = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0)))
    official = official_flux_ae_shapes()

    # Spot checks written straight from the docs/model.md §2.2 text.
    assert official["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert official["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert official["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert "encoder.down.3.downsample.conv.weight" not in official

    ours = {}
    for path, var in _params(model).items():
        shape = tuple(var.get_value().shape)
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(shape), (path, axes, shape)
        if path.endswith(".kernel"):  # (kh, kw, in, out) ↔ torch (out, in, kh, kw)
            path = path[: -len("kernel")] + "weight"
            shape = (shape[3], shape[2], shape[0], shape[1])
        ours[path] = shape

    assert sorted(ours) == sorted(official)
    assert ours == official
    count = sum(math.prod(s) for s in ours.values())
    assert count == sum(math.prod(s) for s in official.values())
    assert count == 83_819_683  # FLUX.1 ae.safetensors


# --------------------------------------------------------------------------------------------------------------
# 3. Latent sampling / normalisation, decode, config validation
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ae():
    """A small random AE (two levels, downsample 2) with non-trivial scale/shift."""
    cfg = vae_config(ch=32, ch_mult=[1, 2], downsample=2, z_channels=4, norm_groups=8,
                     scale_factor=0.5, shift_factor=0.25)
    # Filled from numpy rather than initialised: eager per-shape init compiles dominate CPU test time.
    model = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(1)
    for path, var in _params(model).items():
        shape = var.get_value().shape
        if path.endswith("kernel"):
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:3]))
        else:
            value = 0.1 * rng.standard_normal(shape) + (1.0 if path.endswith("weight") else 0.0)
        var.set_value(jnp.asarray(value, jnp.float32))
    return cfg, model


def test_encode_sampling_and_normalisation(tiny_ae):
    """encode() = scale·(mean + exp(logvar/2)·eps − shift); sample=False uses the mean; key draws N(0, 1)."""
    cfg, model = tiny_ae
    x = jax.random.uniform(jax.random.key(0), (2, 8, 12, 3), minval=-1, maxval=1)
    mean, logvar = model.encode_moments(x)
    assert mean.shape == (2, 4, 6, 4)
    eps = jax.random.normal(jax.random.key(1), mean.shape)

    expected = cfg.scale_factor * (mean + np.exp(0.5 * np.asarray(logvar)) * eps - cfg.shift_factor)
    np.testing.assert_allclose(model.encode(x, eps=eps), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.encode(x, sample=False), cfg.scale_factor * (mean - cfg.shift_factor),
                               rtol=1e-6, atol=1e-6)
    # key-driven sampling draws eps ~ N(0, 1) of the latent's shape
    key = jax.random.key(7)
    np.testing.assert_allclose(model.encode(x, key=key), model.encode(x, eps=jax.random.normal(key, mean.shape)),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(model.encode(x, key=key), model.encode(x, sample=False))
    with pytest.raises(ValueError):
        model.encode(x)


def test_decode_denormalises(tiny_ae):
    """decode(z) = Decoder(z/scale + shift)."""
    cfg, model = tiny_ae
    z = jax.random.normal(jax.random.key(2), (1, 4, 6, 4))
    out = model.decode(z)
    assert out.shape == (1, 8, 12, 3)
    np.testing.assert_allclose(out, model.decoder(z / cfg.scale_factor + cfg.shift_factor), rtol=1e-6, atol=1e-6)
    assert not np.allclose(out, model.decoder(z))


def test_default_init_matches_torch():
    """Conv2d weight/bias ~ U(±1/sqrt(in·kh·kw)) (torch default); GroupNorm starts at weight 1, bias 0."""
    conv = Conv2d(8, 16, 3, rngs=nnx.Rngs(0))
    bound = 1 / math.sqrt(8 * 3 * 3)
    for p in (conv.kernel.get_value(), conv.bias.get_value()):
        assert np.abs(p).max() <= bound and np.abs(p).max() > 0.8 * bound
    kernel = np.asarray(conv.kernel.get_value())
    assert kernel.shape == (3, 3, 8, 16) and abs(kernel.std() - bound / math.sqrt(3)) < 0.1 * bound
    norm = GroupNorm(16, num_groups=4, eps=1e-6)
    np.testing.assert_array_equal(norm.weight.get_value(), np.ones(16))
    np.testing.assert_array_equal(norm.bias.get_value(), np.zeros(16))


def test_wrong_downsample_raises():
    """downsample must equal 2**(len(ch_mult) - 1)."""
    with pytest.raises(ValueError, match="downsample"):
        AutoEncoder(vae_config(ch=32, ch_mult=[1, 2], downsample=8, z_channels=4, norm_groups=8),
                    rngs=nnx.Rngs(0))


@pytest.mark.parametrize("per_call", [2, 5])
def test_images_per_call_bounds_the_batch_without_changing_values(tiny_ae, per_call):
    """model.vae_images_per_call: 5 images encoded and decoded `per_call` at a time (a remainder included) equal all
    at once."""
    _, model = tiny_ae
    x = jax.random.uniform(jax.random.key(3), (5, 8, 12, 3), minval=-1, maxval=1)
    z = jax.random.normal(jax.random.key(4), (5, 4, 6, 4))
    reference = (model.encode_moments(x)[0], model.decode(z))
    model.images_per_call = per_call
    try:
        np.testing.assert_allclose(model.encode_moments(x)[0], reference[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(model.decode(z), reference[1], rtol=1e-5, atol=1e-5)
    finally:
        model.images_per_call = 0
