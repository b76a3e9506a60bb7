"""FLUX.1 autoencoder (docs/model.md §1.3, docs/model.md §2.2, docs/model.md §3.10) in NHWC layout.

Attribute paths mirror the official `ae.safetensors` keys (docs/model.md §2.2): our `<path>.kernel` (kh, kw, in, out) is
the official `<path>.weight` (out, in, kh, kw); biases and GroupNorm weights keep their names.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from unimedvl_jax.models.layers import annotated_param, constant_init, param_keys, torch_default_init
from unimedvl_jax.sharding import trace_platform

CONV_AXES = ("conv_kh", "conv_kw", "vae_in", "vae_out")


def swish(x):
    """swish(x) = x * sigmoid(x)."""
    return jax.nn.silu(x)


class Conv2d(nnx.Module):
    """NHWC 2-D convolution with kernel (kh, kw, in, out), symmetric integer padding (or per-call padding pairs)
    and a bias."""

    def __init__(self, in_channels, out_channels, kernel_size, *, stride=1, padding=0, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = torch_default_init(in_channels * kernel_size * kernel_size)
        self.kernel = annotated_param(rngs, init, (kernel_size, kernel_size, in_channels, out_channels),
                                      CONV_AXES, param_dtype)
        self.bias = annotated_param(rngs, init, (out_channels,), ("vae_out",), param_dtype)
        self.stride = stride
        self.padding = padding
        self.dtype = dtype

    def __call__(self, x, *, padding=None, kernel=None):
        """padding: ((top, bottom), (left, right)) zero padding instead of the symmetric default; kernel: a
        (kh, kw, in, out) kernel derived from this layer's, used in its place (the bias stays this layer's)."""
        dtype = self.dtype or x.dtype
        kernel = self.kernel[...] if kernel is None else kernel
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), kernel.astype(dtype), window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)) if padding is None else padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(dtype)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on NHWC: per-group mean/biased variance over (H, W, group channels), fp32 stats."""

    def __init__(self, num_channels, *, num_groups, eps, param_dtype=jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels not divisible by {num_groups} groups")
        self.weight = annotated_param(None, constant_init(1.0), (num_channels,), ("vae_norm",), param_dtype)
        self.bias = annotated_param(None, constant_init(0.0), (num_channels,), ("vae_norm",), param_dtype)
        self.num_groups = num_groups
        self.eps = eps

    def __call__(self, x):
        b, h, w, c = x.shape
        g, k = self.num_groups, c // self.num_groups
        # torch groups are contiguous channel ranges: channel i belongs to group i // k. Statistics are per-channel
        # sums over the h·w positions, then summed over each group's k channels and broadcast back to them: XLA:CPU
        # reduces (B, H·W, C) over the middle axis ~10x faster than (B, H, W, G, k) over axes (1, 2, 4) when k > 1.
        xf = x.astype(jnp.float32).reshape(b, h * w, c)

        def group_mean(channel_sums):
            """(b, c) per-channel sums → (b, 1, c): each channel's group mean."""
            return jnp.repeat(channel_sums.reshape(b, g, k).sum(-1) / (h * w * k), k, axis=-1)[:, None, :]

        mean = group_mean(jnp.sum(xf, axis=1))
        var = group_mean(jnp.sum(jnp.square(xf - mean), axis=1))
        scale = jax.lax.rsqrt(var + self.eps) * self.weight[...].astype(jnp.float32)
        y = (xf - mean) * scale + self.bias[...].astype(jnp.float32)
        return y.reshape(b, h, w, c).astype(x.dtype)


class ResnetBlock(nnx.Module):
    """nin_shortcut(x) + conv2(swish(norm2(conv1(swish(norm1(x)))))), nin only when channels change
    (docs/model.md §3.10)."""

    def __init__(self, in_channels, out_channels, *, norm_kw, conv_kw):
        self.norm1 = GroupNorm(in_channels, **norm_kw)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, **conv_kw)
        self.norm2 = GroupNorm(out_channels, **norm_kw)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, **conv_kw)
        self.nin_shortcut = Conv2d(in_channels, out_channels, 1, **conv_kw) if in_channels != out_channels else None

    def __call__(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nnx.Module):
    """x + proj_out(softmax(q kᵀ / sqrt(C)) v) over the h·w positions, one head of width C (docs/model.md §3.10)."""

    def __init__(self, channels, *, norm_kw, conv_kw):
        self.norm = GroupNorm(channels, **norm_kw)
        self.q = Conv2d(channels, channels, 1, **conv_kw)
        self.k = Conv2d(channels, channels, 1, **conv_kw)
        self.v = Conv2d(channels, channels, 1, **conv_kw)
        self.proj_out = Conv2d(channels, channels, 1, **conv_kw)

    def __call__(self, x):
        b, h, w, c = x.shape
        hn = self.norm(x)
        q, k, v = (proj(hn).reshape(b, h * w, c) for proj in (self.q, self.k, self.v))
        scores = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / math.sqrt(c)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(b, h, w, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    """Zero-pad bottom and right by 1, then a 3x3 stride-2 conv without padding (docs/model.md §3.10)."""

    def __init__(self, channels, *, conv_kw):
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0, **conv_kw)

    def __call__(self, x):
        return self.conv(x, padding=((0, 1), (0, 1)))


def _upsampled_taps(kernel, phase: int, axis: int):
    """The 3 taps of `kernel` along `axis` folded onto the 2 input rows that output phase 0 / 1 of a nearest-x2
    upsampled row sees: (k0, k1 + k2) over rows r − 1, r, or (k0 + k1, k2) over rows r, r + 1."""
    k0, k1, k2 = (jnp.take(kernel, i, axis=axis) for i in range(3))
    pair = (k0, k1 + k2) if phase == 0 else (k0 + k1, k2)
    return jnp.stack(pair, axis=axis)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv with padding 1 (docs/model.md §3.10).

    Computed without building the upsampled image: output pixel (2r + a, 2c + b) sees only input rows r − 1 + a,
    r + a and columns c − 1 + b, c + b, each repeated, so each of the four phases (a, b) is a 2x2 convolution of the
    input with the 3x3 taps summed accordingly (16 instead of 36 multiply-adds per input pixel and channel pair);
    the phases are then interleaved.
    """

    def __init__(self, channels, *, conv_kw):
        self.conv = Conv2d(channels, channels, 3, padding=1, **conv_kw)

    def __call__(self, x):
        b, h, w = x.shape[:3]
        kernel = self.conv.kernel[...]
        phases = [[self.conv(x, padding=((1 - a, a), (1 - e, e)),
                             kernel=_upsampled_taps(_upsampled_taps(kernel, a, 0), e, 1)) for e in range(2)]
                  for a in range(2)]
        # (b, h, a, w, e, C) → output row 2r + a, column 2c + e.
        y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
        return y.reshape(b, 2 * h, 2 * w, y.shape[-1])


def _res_blocks(in_channels, out_channels, num_blocks, *, norm_kw, conv_kw):
    """`num_blocks` ResBlocks; only the first changes the channel count."""
    return nnx.List([ResnetBlock(in_channels if j == 0 else out_channels, out_channels, norm_kw=norm_kw,
                                 conv_kw=conv_kw) for j in range(num_blocks)])


def _run_blocks(blocks, x):
    """Apply `blocks` in order."""
    for blk in blocks:
        x = blk(x)
    return x


class DownLevel(nnx.Module):
    """Encoder level `down[i]`: ResBlocks, then a Downsample except at the last level (no attribute there)."""

    def __init__(self, in_channels, out_channels, num_blocks, *, add_downsample, norm_kw, conv_kw):
        self.block = _res_blocks(in_channels, out_channels, num_blocks, norm_kw=norm_kw, conv_kw=conv_kw)
        if add_downsample:
            self.downsample = Downsample(out_channels, conv_kw=conv_kw)

    def __call__(self, x):
        x = _run_blocks(self.block, x)
        return self.downsample(x) if hasattr(self, "downsample") else x


class UpLevel(nnx.Module):
    """Decoder level `up[k]`: ResBlocks, then an Upsample except at level 0 (no attribute there)."""

    def __init__(self, in_channels, out_channels, num_blocks, *, add_upsample, norm_kw, conv_kw):
        self.block = _res_blocks(in_channels, out_channels, num_blocks, norm_kw=norm_kw, conv_kw=conv_kw)
        if add_upsample:
            self.upsample = Upsample(out_channels, conv_kw=conv_kw)

    def __call__(self, x):
        x = _run_blocks(self.block, x)
        return self.upsample(x) if hasattr(self, "upsample") else x


class MidBlock(nnx.Module):
    """block_1 → attn_1 → block_2 at the lowest resolution."""

    def __init__(self, channels, *, norm_kw, conv_kw):
        self.block_1 = ResnetBlock(channels, channels, norm_kw=norm_kw, conv_kw=conv_kw)
        self.attn_1 = AttnBlock(channels, norm_kw=norm_kw, conv_kw=conv_kw)
        self.block_2 = ResnetBlock(channels, channels, norm_kw=norm_kw, conv_kw=conv_kw)

    def __call__(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


def per_image(fn, x, images_per_call: int = 0):
    """fn on a batch (B, ...) → (B, ...), `images_per_call` images at a time (lax.map); 0 = one at a time on CPU,
    all at once elsewhere.

    Every op of the encoder and decoder is per image, so the values are the same. On CPU a whole batch's activations
    (16 × 128² × 32 fp32 = 32 MiB per tensor) stream through memory at every GroupNorm, swish and convolution, while
    one image's stay in cache: the loop is faster. On an accelerator a bounded number per call bounds the memory:
    16 canvases of 1024² at 128 channels in bf16 are 4 GiB per activation (docs/memory.md).
    """
    per_call = images_per_call or (1 if trace_platform() == "cpu" else x.shape[0])
    if x.shape[0] <= per_call:
        return fn(x)
    return jax.lax.map(lambda image: fn(image[None])[0], x, batch_size=per_call if per_call > 1 else None)


def _block_kwargs(cfg, dtype, param_dtype, rngs):
    """Shared GroupNorm and Conv2d keyword arguments."""
    norm_kw = dict(num_groups=cfg.norm_groups, eps=cfg.norm_eps, param_dtype=param_dtype)
    conv_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return norm_kw, conv_kw


class Encoder(nnx.Module):
    """(B, H, W, in_channels) → (B, H/f, W/f, 2·z_channels) = mean ‖ logvar (docs/model.md §3.10)."""

    def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        norm_kw, conv_kw = _block_kwargs(cfg, dtype, param_dtype, rngs)
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, **conv_kw)
        levels, block_in = [], cfg.ch
        for i, block_out in enumerate(chans):
            levels.append(DownLevel(block_in, block_out, cfg.num_res_blocks, add_downsample=i < len(chans) - 1,
                                    norm_kw=norm_kw, conv_kw=conv_kw))
            block_in = block_out
        self.down = nnx.List(levels)
        self.mid = MidBlock(block_in, norm_kw=norm_kw, conv_kw=conv_kw)
        self.norm_out = GroupNorm(block_in, **norm_kw)
        self.conv_out = Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1, **conv_kw)

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nnx.Module):
    """(B, h, w, z_channels) → (B, h·f, w·f, out_ch); `up[k]` is resolution level k, run from last to 0
    (docs/model.md §2.2)."""

    def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        norm_kw, conv_kw = _block_kwargs(cfg, dtype, param_dtype, rngs)
        chans = [cfg.ch * m for m in cfg.ch_mult]
        block_in = chans[-1]
        self.conv_in = Conv2d(cfg.z_channels, block_in, 3, padding=1, **conv_kw)
        self.mid = MidBlock(block_in, norm_kw=norm_kw, conv_kw=conv_kw)
        levels = [None] * len(chans)
        for k in reversed(range(len(chans))):
            levels[k] = UpLevel(block_in, chans[k], cfg.num_res_blocks + 1, add_upsample=k > 0,
                                norm_kw=norm_kw, conv_kw=conv_kw)
            block_in = chans[k]
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(block_in, **norm_kw)
        self.conv_out = Conv2d(block_in, cfg.out_ch, 3, padding=1, **conv_kw)

    def __call__(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nnx.Module):
    """FLUX.1 AE: Encoder, diagonal-Gaussian sampling with scale/shift normalisation, Decoder (docs/model.md §3.10)."""

    def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, images_per_call: int = 0, rngs: nnx.Rngs):
        expected = 2 ** (len(cfg.ch_mult) - 1)
        if cfg.downsample != expected:
            raise ValueError(f"vae.downsample={cfg.downsample} but ch_mult={list(cfg.ch_mult)} downsamples by "
                             f"2**(len(ch_mult)-1) = {expected}")
        rngs = param_keys(rngs)
        self.encoder = Encoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.scale_factor = float(cfg.scale_factor)
        self.shift_factor = float(cfg.shift_factor)
        self.images_per_call = int(images_per_call)  # per_image: 0 = the platform's default

    def encode_moments(self, x):
        """x (B, H, W, 3) in [-1, 1] → (mean, logvar), each (B, H/f, W/f, z_channels)."""
        mean, logvar = jnp.split(per_image(self.encoder, x, self.images_per_call), 2, axis=-1)
        return mean, logvar

    def encode(self, x, *, eps=None, key=None, sample=True):
        """Normalised latent scale·(z − shift), z = mean + exp(logvar/2)·eps (or mean if not sample)."""
        mean, logvar = self.encode_moments(x)
        z = mean.astype(jnp.float32)
        if sample:
            if eps is None:
                if key is None:
                    raise ValueError("encode(sample=True) needs `eps` or `key`")
                eps = jax.random.normal(key, mean.shape, jnp.float32)
            # FLUX's DiagonalGaussian does not clamp logvar (diffusers clamps it to [-30, 20]).
            z = z + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps.astype(jnp.float32)
        return (self.scale_factor * (z - self.shift_factor)).astype(mean.dtype)

    def decode(self, z):
        """Normalised latent (B, h, w, z_channels) → image (B, h·f, w·f, 3) via Decoder(z/scale + shift)."""
        return per_image(self.decoder, z / self.scale_factor + self.shift_factor, self.images_per_call)
