"""docs/preprocessing.md §6 ImageTransform shared by the ViT and the VAE: the BAGEL resize rule, PIL bicubic resampling,
ToTensor + Normalize(0.5, 0.5) to [-1, 1] (channels-last here), and the ViT patchify of docs/model.md §3.5."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from data_pipelines.schema import pil_to_rgb
from unimedvl_jax.patches import patchify

DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024  # 1,806,336 (docs/preprocessing.md §6.4)


def _make_divisible(value: float, stride: int) -> int:
    """mk(v) = max(stride, round(v / stride) · stride) with Python's half-to-even round (docs/preprocessing.md §6.2)."""
    return max(stride, int(round(value / stride) * stride))


def _apply_scale(w: int, h: int, scale: float, stride: int) -> tuple[int, int]:
    """Scale both sides, round half to even, then snap each to a stride multiple."""
    return _make_divisible(round(w * scale), stride), _make_divisible(round(h * scale), stride)


def resize_target(w: int, h: int, max_size: int, min_size: int, stride: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                  img_num: int = 1) -> tuple[int, int]:
    """(w', h') of the docs/preprocessing.md §6.2 resize rule, including the max_pixels area-as-linear quirk and the
    max-side clamp."""
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    scale = min(max_size / max(w, h), 1.0)
    scale = max(scale, min_size / min(w, h))
    new_w, new_h = _apply_scale(w, h, scale, stride)
    if new_w * new_h > max_pixels / img_num:
        # Quirk kept on purpose: an area ratio applied as a linear factor.
        new_w, new_h = _apply_scale(new_w, new_h, max_pixels / img_num / (new_w * new_h), stride)
    if max(new_w, new_h) > max_size:
        new_w, new_h = _apply_scale(new_w, new_h, max_size / max(new_w, new_h), stride)
    return new_w, new_h


def aspect_preserving_target_size(w: int, h: int, max_size: int = 1024, min_size: int = 512, stride: int = 16,
                                  max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(H, W) generation target for a w×h reference (docs/preprocessing.md §6
    `_calculate_target_size_with_aspect_ratio`)."""
    new_w, new_h = resize_target(w, h, max_size, min_size, stride, max_pixels)
    return new_h, new_w


def to_normalized_array(img) -> np.ndarray:
    """PIL image -> float32 (H, W, 3) in [-1, 1]: RGB conversion, ToTensor (÷255), Normalize(0.5, 0.5)."""
    rgb = np.asarray(pil_to_rgb(img), dtype=np.float32)
    return (rgb / 255.0 - 0.5) / 0.5


def patchify_vit(image_hwc: np.ndarray, patch: int) -> np.ndarray:
    """(H, W, C) -> (H/p · W/p, p·p·C) patches in raster order, features in (row-in-patch, col-in-patch, channel)."""
    image_hwc = np.asarray(image_hwc)
    h, w, c = image_hwc.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible by the patch size {patch}")
    return patchify(image_hwc, patch)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """BAGEL `ImageTransform(max_size, min_size, stride, max_pixels)`: resize rule + bicubic + [-1, 1]."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if not (self.stride > 0 and 0 < self.min_size and self.max_size >= self.stride and self.max_pixels > 0):
            raise ValueError(f"invalid {self}: need stride > 0, min_size > 0, max_size >= stride, max_pixels > 0")

    def target_size(self, w: int, h: int, img_num: int = 1) -> tuple[int, int]:
        """(w', h') this transform resizes a w×h image to."""
        return resize_target(w, h, self.max_size, self.min_size, self.stride, self.max_pixels, img_num)

    def resize(self, img, img_num: int = 1):
        """PIL image -> resized RGB PIL image (bicubic, as torchvision's PIL path with antialias)."""
        img = pil_to_rgb(img)
        new_w, new_h = self.target_size(*img.size, img_num=img_num)
        if (new_w, new_h) == img.size:
            return img
        return img.resize((new_w, new_h), Image.Resampling.BICUBIC)

    def __call__(self, img, img_num: int = 1) -> np.ndarray:
        """PIL image -> float32 (H', W', 3) in [-1, 1]."""
        return to_normalized_array(self.resize(img, img_num))

    @classmethod
    def from_config(cls, c) -> "ImageTransform":
        """Build from a mapping / ConfigDict with max_size, min_size, stride and optional max_pixels."""
        return cls(int(c["max_size"]), int(c["min_size"]), int(c["stride"]),
                   int(c.get("max_pixels", DEFAULT_MAX_PIXELS) or DEFAULT_MAX_PIXELS))


# Presets of docs/preprocessing.md §6 (released geometry).
VIT_VQA = ImageTransform(980, 378, 14, 2_007_040)   # VLM-SFT / VQA eval
VIT_EDIT = ImageTransform(518, 224, 14)             # BAGEL edit ViT
VAE_GEN = ImageTransform(1024, 512, 16)             # T2I / edit VAE (train)
