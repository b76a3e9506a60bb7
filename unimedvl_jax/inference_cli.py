"""Inference command lines: unimedvl-vqa, unimedvl-generate, unimedvl-edit.

    unimedvl-vqa      --checkpoint D --image scan.dcm --question "What imaging modality is this?"
    unimedvl-generate --checkpoint D --prompt "Generate an axial T1-weighted brain MRI slice." --out img.png
    unimedvl-edit     --checkpoint D --image low.png --instruction "Increase the resolution by 2x." --out hi.png

D is a training workdir, a params checkpoint or an official-layout directory (inference/loading.py). Images may be
PNG / JPEG / DICOM (--frame) / NIfTI (--slice, --axis; default the middle axial slice).
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags
from PIL import Image

from unimedvl_jax import entry_point
from unimedvl_jax.eval.vqa import answer_image
from unimedvl_jax.inference.interleave import EDIT_DEFAULTS, T2I_DEFAULTS, edit_image, text_to_image
from unimedvl_jax.inference.loading import load_for_inference, read_input_image


class _Pair(flags.ArgumentParser):
    """Two comma-separated numbers, `--size 512,512` / `--cfg-interval 0.4,1.0` (absl flags take one value)."""

    def __init__(self, kind: type):
        self.kind = kind

    def parse(self, argument):
        parts = argument.split(",") if isinstance(argument, str) else list(argument)
        if len(parts) != 2:
            raise ValueError(f"expected two comma-separated numbers, got {argument!r}")
        return tuple(self.kind(p) for p in parts)

    def flag_type(self) -> str:
        return f"pair of {self.kind.__name__}"


def _define_pair(name: str, default, kind: type, help: str, fv: flags.FlagValues) -> None:
    flags.DEFINE(_Pair(kind), name, default, help, flag_values=fv, serializer=flags.CsvListSerializer(","))


def _common(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "training workdir, params checkpoint (config.json + params/|ema/) or "
                        "official directory", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer dir/file (default: next to the checkpoint)", flag_values=fv)
    flags.DEFINE_enum("weights", "ema", ["ema", "params"], "EMA or raw weights", flag_values=fv)


def _image_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("image", None, "PNG / JPEG / DICOM / NIfTI file", flag_values=fv)
    flags.DEFINE_integer("slice", None, "NIfTI slice index (default: the middle slice)", flag_values=fv)
    flags.DEFINE_enum("axis", "axial", ["sagittal", "coronal", "axial"], "NIfTI slicing plane", flag_values=fv)
    flags.DEFINE_integer("frame", 0, "DICOM frame of a multi-frame file", flag_values=fv)


def _sampler_flags(fv: flags.FlagValues, defaults: dict) -> None:
    flags.DEFINE_integer("seed", 0, "seed of the initial noise (image i uses seed + i)", flag_values=fv)
    flags.DEFINE_integer("steps", defaults["num_timesteps"], "Euler steps", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("timestep-shift", defaults["timestep_shift"], "shift of the timestep schedule",
                       flag_values=fv)
    flags.DEFINE_float("cfg-text", defaults["cfg_text_scale"], "text guidance scale", flag_values=fv)
    flags.DEFINE_float("cfg-img", defaults["cfg_img_scale"], "image guidance scale", flag_values=fv)
    _define_pair("cfg-interval", defaults["cfg_interval"], float, "LO,HI: guidance is applied for t in (LO, HI]",
                 fv)
    flags.DEFINE_enum("cfg-renorm-type", defaults["cfg_renorm_type"], ["global", "channel", "text_channel"],
                      "renormalisation of the guided velocity", flag_values=fv)
    flags.DEFINE_float("cfg-renorm-min", defaults["cfg_renorm_min"], "lower clip of the renormalisation ratio",
                       flag_values=fv)


def _sampler_kwargs(args) -> dict:
    return dict(num_timesteps=args.steps, timestep_shift=args.timestep_shift, cfg_text_scale=args.cfg_text,
                cfg_img_scale=args.cfg_img, cfg_interval=tuple(args.cfg_interval),
                cfg_renorm_type=args.cfg_renorm_type, cfg_renorm_min=args.cfg_renorm_min)


def _load(args, prog: str):
    entry_point.start(prog)
    start = time.time()
    loaded = load_for_inference(args.checkpoint, tokenizer=args.tokenizer, weights=args.weights)
    print(f"loaded {loaded.source} in {time.time() - start:.1f}s", file=sys.stderr, flush=True)
    return loaded


def _input_image(args):
    return read_input_image(args.image, slice_index=args.slice, axis=args.axis, frame=args.frame)


def _save_png(image, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
    print(f"wrote {path} ({image.shape[1]}x{image.shape[0]})", flush=True)


_USAGE = __doc__.partition("\n")[2].strip("\n")  # the module docstring after its first line


def _help(summary: str) -> str:
    """A command's help: its one-line summary, then this module's usage examples and notes."""
    return f"{summary}\n\n{_USAGE}"


# --- unimedvl-vqa --------------------------------------------------------------------------------------------------
def _vqa_flags(fv: flags.FlagValues) -> None:
    _common(fv)
    _image_flags(fv)
    flags.DEFINE_string("question", None, "the question about the image", flag_values=fv)
    flags.DEFINE_integer("max-new-tokens", 64, "decoding budget of the answer", lower_bound=1, flag_values=fv)


def _vqa(args) -> int:
    image = _input_image(args)  # a bad --image fails before the model is loaded
    loaded = _load(args, "unimedvl-vqa")
    print(answer_image(loaded.model, loaded.tokenizer, loaded.vit_transform, image, args.question,
                       max_new_tokens=args.max_new_tokens), flush=True)
    return 0


VQA = entry_point.Command(
    "unimedvl-vqa", _help("unimedvl-vqa: answer a question about a medical image (greedy by default, "
                          "docs/inference.md §5.4)."),
    _vqa_flags, required=("checkpoint", "image", "question"))


def vqa_main(argv=None) -> int:
    """Console-script entry point of unimedvl-vqa (`argv`: the arguments after the program name)."""
    return VQA.run(_vqa, argv)


# --- unimedvl-generate ---------------------------------------------------------------------------------------------
def _generate_flags(fv: flags.FlagValues) -> None:
    _common(fv)
    flags.DEFINE_string("prompt", None, "what to draw", flag_values=fv)
    flags.DEFINE_string("out", None, "PNG path (with --num-images N: <stem>_<i>.png)", flag_values=fv)
    flags.DEFINE_integer("num-images", 1, "images to generate (seeds seed, seed + 1, ...)", lower_bound=1,
                         flag_values=fv)
    _define_pair("size", None, int, "H,W: image size (default: the training run's VAE image size, 1024,1024 for "
                 "official checkpoints)", fv)
    flags.DEFINE_bool("think", False, "plan in text first (docs/inference.md §5.3 think mode)", flag_values=fv)
    _sampler_flags(fv, T2I_DEFAULTS)


def _numbered(path: str, i: int, n: int) -> str:
    stem, ext = os.path.splitext(path)
    return path if n == 1 else f"{stem}_{i}{ext or '.png'}"


def _generate(args) -> int:
    loaded = _load(args, "unimedvl-generate")
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


GENERATE = entry_point.Command(
    "unimedvl-generate", _help("unimedvl-generate: text → image(s) with two-way CFG and the flow-matching Euler "
                               "sampler (docs/inference.md §5.3)."),
    _generate_flags, required=("checkpoint", "prompt", "out"))


def generate_main(argv=None) -> int:
    """Console-script entry point of unimedvl-generate (`argv`: the arguments after the program name)."""
    return GENERATE.run(_generate, argv)


# --- unimedvl-edit -------------------------------------------------------------------------------------------------
def _edit_flags(fv: flags.FlagValues) -> None:
    _common(fv)
    _image_flags(fv)
    flags.DEFINE_string("instruction", None, "what to do to the image", flag_values=fv)
    flags.DEFINE_string("out", None, "PNG path", flag_values=fv)
    flags.DEFINE_bool("understand-first", False, "describe the image first and append the reply to the "
                      "instruction (docs/inference.md §5.5)", flag_values=fv)
    _sampler_flags(fv, EDIT_DEFAULTS)


def _edit(args) -> int:
    image = _input_image(args)  # a bad --image fails before the model is loaded
    loaded = _load(args, "unimedvl-edit")
    result = edit_image(loaded.model, loaded.tokenizer, image, args.instruction, seed=args.seed,
                        understand_first=args.understand_first, vae_transform=loaded.vae_transform,
                        vit_transform=loaded.vit_transform, **_sampler_kwargs(args))
    if result.text:
        print(f"understanding: {result.text}", flush=True)
    _save_png(result.image, args.out)
    return 0


EDIT = entry_point.Command(
    "unimedvl-edit", _help("unimedvl-edit: image + instruction → image (super-resolution, denoising, translation, "
                           "...; docs/inference.md §5.3)."),
    _edit_flags, required=("checkpoint", "image", "instruction", "out"))


def edit_main(argv=None) -> int:
    """Console-script entry point of unimedvl-edit (`argv`: the arguments after the program name)."""
    return EDIT.run(_edit, argv)
