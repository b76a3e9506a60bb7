"""Inference command lines: unimedvl-vqa, unimedvl-generate, unimedvl-edit.

    unimedvl-vqa      --checkpoint D --image scan.dcm --question "What imaging modality is this?"
    unimedvl-generate --checkpoint D --prompt "Generate an axial T1-weighted brain MRI slice." --out img.png
    unimedvl-edit     --checkpoint D --image low.png --instruction "Increase the resolution by 2x." --out hi.png

D is a training workdir, a params checkpoint or an official-layout directory (inference/loading.py). Images may be
PNG / JPEG / DICOM (--frame) / NIfTI (--slice, --axis; default the middle axial slice).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="training workdir, params checkpoint (config.json + params/|ema/) or official directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir/file (default: next to the checkpoint)")
    p.add_argument("--weights", default="ema", choices=["ema", "params"], help="EMA (default) or raw weights")


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="PNG / JPEG / DICOM / NIfTI file")
    p.add_argument("--slice", type=int, default=None, help="NIfTI slice index (default: the middle slice)")
    p.add_argument("--axis", default="axial", choices=["sagittal", "coronal", "axial"], help="NIfTI slicing plane")
    p.add_argument("--frame", type=int, default=0, help="DICOM frame of a multi-frame file")


def _sampler_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (image i uses seed + i)")
    p.add_argument("--steps", type=int, default=defaults["num_timesteps"], help="Euler steps")
    p.add_argument("--timestep-shift", type=float, default=defaults["timestep_shift"])
    p.add_argument("--cfg-text", type=float, default=defaults["cfg_text_scale"], help="text guidance scale")
    p.add_argument("--cfg-img", type=float, default=defaults["cfg_img_scale"], help="image guidance scale")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=defaults["cfg_interval"], metavar=("LO", "HI"),
                   help="guidance is applied for t in (LO, HI]")
    p.add_argument("--cfg-renorm-type", default=defaults["cfg_renorm_type"],
                   choices=["global", "channel", "text_channel"])
    p.add_argument("--cfg-renorm-min", type=float, default=defaults["cfg_renorm_min"])


def _sampler_kwargs(args) -> dict:
    return dict(num_timesteps=args.steps, timestep_shift=args.timestep_shift, cfg_text_scale=args.cfg_text,
                cfg_img_scale=args.cfg_img, cfg_interval=tuple(args.cfg_interval),
                cfg_renorm_type=args.cfg_renorm_type, cfg_renorm_min=args.cfg_renorm_min)


def _load(args, prog: str):
    from unimedvl_jax.entry_point import start

    start(prog)
    from unimedvl_jax.inference.loading import load_for_inference

    start = time.time()
    loaded = load_for_inference(args.checkpoint, tokenizer=args.tokenizer, weights=args.weights)
    print(f"loaded {loaded.source} in {time.time() - start:.1f}s", file=sys.stderr, flush=True)
    return loaded


def _input_image(args):
    from unimedvl_jax.inference.loading import read_input_image

    return read_input_image(args.image, slice_index=args.slice, axis=args.axis, frame=args.frame)


def _save_png(image, path: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
    print(f"wrote {path} ({image.shape[1]}x{image.shape[0]})", flush=True)


def vqa_main(argv=None) -> int:
    """unimedvl-vqa: answer a question about a medical image (greedy by default, docs/inference.md §5.4)."""
    p = argparse.ArgumentParser(prog="unimedvl-vqa", description=vqa_main.__doc__)
    _common(p)
    _image_args(p)
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    loaded = _load(args, "unimedvl-vqa")
    from unimedvl_jax.eval.vqa import answer_image

    print(answer_image(loaded.model, loaded.tokenizer, loaded.vit_transform, _input_image(args), args.question,
                       max_new_tokens=args.max_new_tokens), flush=True)
    return 0


def _numbered(path: str, i: int, n: int) -> str:
    stem, ext = os.path.splitext(path)
    return path if n == 1 else f"{stem}_{i}{ext or '.png'}"


def generate_main(argv=None) -> int:
    """unimedvl-generate: text → image(s) with two-way CFG and the flow-matching Euler sampler
    (docs/inference.md §5.3)."""
    from unimedvl_jax.inference.interleave import T2I_DEFAULTS

    p = argparse.ArgumentParser(prog="unimedvl-generate", description=generate_main.__doc__)
    _common(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="PNG path (with --num-images N: <stem>_<i>.png)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="image size (default: the training run's VAE image size, 1024² for official checkpoints)")
    p.add_argument("--think", action="store_true", help="plan in text first (docs/inference.md §5.3 think mode)")
    _sampler_args(p, T2I_DEFAULTS)
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error("--num-images must be ≥ 1")
    loaded = _load(args, "unimedvl-generate")
    from unimedvl_jax.inference.interleave import text_to_image

    size = tuple(args.size) if args.size else loaded.image_size
    for i in range(args.num_images):
        start = time.time()
        result = text_to_image(loaded.model, loaded.tokenizer, args.prompt, image_shape=size, seed=args.seed + i,
                               think=args.think, **_sampler_kwargs(args))
        if result.text:
            print(f"plan: {result.text}", flush=True)
        _save_png(result.image, _numbered(args.out, i, args.num_images))
        print(f"image {i + 1}/{args.num_images}: {time.time() - start:.1f}s", file=sys.stderr, flush=True)
    return 0


def edit_main(argv=None) -> int:
    """unimedvl-edit: image + instruction → image (super-resolution, denoising, translation, ...;
    docs/inference.md §5.3)."""
    from unimedvl_jax.inference.interleave import EDIT_DEFAULTS

    p = argparse.ArgumentParser(prog="unimedvl-edit", description=edit_main.__doc__)
    _common(p)
    _image_args(p)
    p.add_argument("--instruction", required=True)
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--understand-first", action="store_true",
                   help="describe the image first and append the reply to the instruction (docs/inference.md §5.5)")
    _sampler_args(p, EDIT_DEFAULTS)
    args = p.parse_args(argv)
    loaded = _load(args, "unimedvl-edit")
    from unimedvl_jax.inference.interleave import edit_image

    result = edit_image(loaded.model, loaded.tokenizer, _input_image(args), args.instruction, seed=args.seed,
                        understand_first=args.understand_first, vae_transform=loaded.vae_transform,
                        vit_transform=loaded.vit_transform, **_sampler_kwargs(args))
    if result.text:
        print(f"understanding: {result.text}", flush=True)
    _save_png(result.image, args.out)
    return 0
