"""VAE encode / decode and text-to-image speed of the 'small' config (configs/small.py) with random weights, fp32,
next to the official PyTorch numbers measured on the same machine type (2 CPU cores).

Prints a Markdown table: first call (compile + run), best and median seconds of --repeats warm calls, and the median
over the official time. VAE encode is the train step's call (`vae_model.encode(images, key=...)` in one jit,
unimedvl_jax/train/step.py); text→image is bench/inference.py's measure (prompt "a chest x-ray", prompt prefill +
sampling + VAE decode + uint8, through `interleave.text_to_image`), with text CFG alone (two branches) and with text
and image CFG (three, the `interleave_inference` defaults). The warm calls of all rows take turns, so load on a shared
machine hits every row alike; --torch adds rows for a PyTorch FLUX-geometry autoencoder (diffusers AutoencoderKL,
the parity reference of tests/models/test_vae.py) timed the same way in the same process: its ratio to the official
time shows how far the machine's load is from the official measurement's.
Usage:  python bench/vae_t2i.py [--repeats 7] [--batch 16] [--vae-size 128] [--image-size 64] [--steps 25] [--torch]
                                [--skip-vae] [--skip-t2i]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

# bench/inference.py (run as a script, this directory is on sys.path): the same model builder, prompt tokenizer and
# table format.
from inference import ByteTokenizer, build_model, markdown

# Official PyTorch seconds (fp32, small config, 2 CPU cores): (low, high) of the measured range.
OFFICIAL_VAE_ENCODE = (0.44, 0.46)
OFFICIAL_T2I_TEXT_CFG = (0.38, 0.47)


def timed_in_turns(calls: dict, repeats: int) -> dict:
    """{name: (seconds of the first call, best, median of `repeats` warm calls)}; the warm calls of all entries
    take turns. Each call blocks on its result."""
    first, runs = {}, {name: [] for name in calls}
    for name, fn in calls.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: (first[name], min(runs[name]), statistics.median(runs[name])) for name in calls}


def vae_calls(model, batch: int, size: int) -> dict:
    """{row name: (blocking call, official range or None)}: encode (posterior sampled from a key) and decode."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    vae_cfg = model.cfg.vae
    pixels = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), jnp.float32, -1.0, 1.0)
    side = size // vae_cfg.downsample
    latents = jax.random.normal(jax.random.key(2), (batch, side, side, vae_cfg.z_channels), jnp.float32)
    encode = nnx.jit(lambda vae, x, key: vae.encode(x, key=key))
    decode = nnx.jit(lambda vae, z: vae.decode(z))
    key = jax.random.key(3)
    return {f"VAE encode, {batch} images {size}x{size}":
            (lambda: jax.block_until_ready(encode(model.vae_model, pixels, key)), OFFICIAL_VAE_ENCODE),
            f"VAE decode, {batch} latents → {size}x{size}":
            (lambda: jax.block_until_ready(decode(model.vae_model, latents)), None)}


def torch_vae_calls(model, batch: int, size: int) -> dict:
    """The same encode / decode on a diffusers AutoencoderKL of the model's VAE geometry (PyTorch, no grad)."""
    import torch
    from diffusers import AutoencoderKL

    vae_cfg = model.cfg.vae
    levels = len(vae_cfg.ch_mult)
    vae = AutoencoderKL(
        in_channels=vae_cfg.in_channels, out_channels=vae_cfg.out_ch, latent_channels=vae_cfg.z_channels,
        layers_per_block=vae_cfg.num_res_blocks, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(vae_cfg.ch * m for m in vae_cfg.ch_mult), norm_num_groups=vae_cfg.norm_groups,
        use_quant_conv=False, use_post_quant_conv=False).eval()
    pixels = torch.rand(batch, 3, size, size) * 2 - 1
    side = size // vae_cfg.downsample
    latents = torch.randn(batch, vae_cfg.z_channels, side, side)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    return {f"PyTorch (diffusers) VAE encode, threads {torch.get_num_threads()}":
            (no_grad(lambda: vae.encode(pixels).latent_dist.sample()), OFFICIAL_VAE_ENCODE),
            f"PyTorch (diffusers) VAE decode, threads {torch.get_num_threads()}":
            (no_grad(lambda: vae.decode(latents).sample), None)}


def t2i_calls(model, image_size: int, steps: int) -> dict:
    """{row name: (blocking call, official range)}: text→image with text CFG 3.0 (image scale 1, two branches) and
    with text 3.0 + image 1.5 (three branches)."""
    from unimedvl_jax.inference.interleave import text_to_image

    tokenizer = ByteTokenizer()

    def run(img_scale):
        return text_to_image(model, tokenizer, "a chest x-ray", image_shape=(image_size, image_size),
                             num_timesteps=steps, cfg_text_scale=3.0, cfg_img_scale=img_scale).image

    name = f"T2I {image_size}x{image_size}, {steps} steps"
    return {f"{name}, text CFG 3.0": (lambda: run(1.0), OFFICIAL_T2I_TEXT_CFG),
            f"{name}, text 3.0 + image 1.5 CFG": (lambda: run(1.5), OFFICIAL_T2I_TEXT_CFG)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vae-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--torch", action="store_true", help="also time a PyTorch (diffusers) autoencoder")
    parser.add_argument("--skip-vae", action="store_true")
    parser.add_argument("--skip-t2i", action="store_true")
    args = parser.parse_args()

    import jax

    model = build_model(str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "small.py"), None)
    calls = {}
    if not args.skip_vae:
        calls.update(vae_calls(model, args.batch, args.vae_size))
        if args.torch:
            calls.update(torch_vae_calls(model, args.batch, args.vae_size))
    if not args.skip_t2i:
        calls.update(t2i_calls(model, args.image_size, args.steps))
    times = timed_in_turns({name: fn for name, (fn, _) in calls.items()}, args.repeats)
    rows = []
    for name, (_, official) in calls.items():
        first, best, median = times[name]
        ref = f"{official[0]:.2f}–{official[1]:.2f}" if official else "—"
        ratio = f"{median / official[1]:.2f}–{median / official[0]:.2f}" if official else "—"
        rows.append((name, f"{first:.1f}", f"{best:.3f}", f"{median:.3f}", ref, ratio))
    print(f"small config, random weights, fp32, backend {jax.default_backend()} ({jax.device_count()} device(s)), "
          f"{args.repeats} warm repeats taking turns\n")
    print(markdown(["work", "first call s (compile)", "best s", "median s", "official PyTorch s",
                    "median / official"], rows))


if __name__ == "__main__":
    main()
