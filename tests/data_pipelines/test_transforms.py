"""docs/preprocessing.md §6 ImageTransform: the resize rule (half-to-even rounding, min-size upscaling, the max_pixels
area-as-linear quirk, the max-side clamp, stride multiples), PIL bicubic resampling, [-1, 1] normalisation and
docs/model.md §3.5 patchify."""

import numpy as np
import pytest
from PIL import Image

from data_pipelines.transforms import (
    VAE_GEN,
    VIT_EDIT,
    VIT_VQA,
    ImageTransform,
    aspect_preserving_target_size,
    patchify_vit,
    resize_target,
    to_normalized_array,
)


@pytest.mark.parametrize("transform, size, img_num, expected, why", [
    # mk(584) = round(36.5)·16: half to even gives 36 (576); half-up would give 592.
    (VAE_GEN, (584, 800), 1, (576, 800), "half-to-even in the stride snap"),
    # s = 0.5: round(1041·0.5) = round(520.5) = 520 (even), then 520/16 = 32.5 -> 32 -> 512.
    # Half-up everywhere would give round(520.5) = 521 -> 32.56 -> 33 -> 528.
    (VAE_GEN, (2048, 1041), 1, (1024, 512), "half-to-even in round(w·s) and in the snap"),
    (VIT_VQA, (100, 200), 1, (378, 756), "min-size upscaling of the short side"),
    (VIT_EDIT, (1, 1), 1, (224, 224), "1x1 is upscaled to the min size"),
    (VAE_GEN, (1024, 1024), 1, (1024, 1024), "max_pixels never fires for a single shipped-size image"),
    # 980² > 2,007,040 / 4, so s₂ = 501760 / 960400 is applied linearly: 980·s₂ = 512 -> mk -> 518.
    # (An area-correct factor √s₂ would give 708.)
    (VIT_VQA, (980, 980), 4, (518, 518), "max_pixels quirk: area ratio used as a linear factor"),
    (VIT_VQA, (980, 980), 2, (980, 980), "max_pixels / 2 = 1,003,520 > 960,400: no change"),
    # Min-size upscaling makes the long side 2048 > 1024: the final clamp halves both sides.
    (VAE_GEN, (100, 400), 1, (256, 1024), "final max-side clamp after min-size upscaling"),
])
def test_resize_rule_cases(transform, size, img_num, expected, why):
    assert transform.target_size(*size, img_num=img_num) == expected, why
    assert resize_target(*size, transform.max_size, transform.min_size, transform.stride, transform.max_pixels,
                         img_num) == expected


def test_clamp_can_leave_the_long_side_above_max_size():
    """The clamp is applied once with the same snapping, so a max_size that is not a stride multiple can round
    back above it (the official rule, kept as is)."""
    t = ImageTransform(max_size=1020, min_size=16, stride=16)
    assert t.target_size(1020, 510) == (1024, 512)


@pytest.mark.parametrize("transform", [VIT_VQA, VIT_EDIT, VAE_GEN, ImageTransform(56, 28, 14)])
def test_outputs_are_stride_multiples(transform):
    rng = np.random.default_rng(0)
    for w, h in rng.integers(1, 3000, size=(300, 2)):
        new_w, new_h = transform.target_size(int(w), int(h))
        assert new_w % transform.stride == 0 and new_h % transform.stride == 0
        assert new_w >= transform.stride and new_h >= transform.stride


def test_aspect_preserving_target_size_returns_h_w():
    assert aspect_preserving_target_size(584, 800) == (800, 576)
    assert aspect_preserving_target_size(100, 400) == (1024, 256)


def test_call_is_pil_bicubic_then_normalise():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    t = ImageTransform(56, 28, 14)
    out = t(Image.fromarray(arr))
    new_w, new_h = t.target_size(53, 37)
    assert out.shape == (new_h, new_w, 3) and out.dtype == np.float32
    expected = np.asarray(Image.fromarray(arr).resize((new_w, new_h), Image.Resampling.BICUBIC), np.float32)
    np.testing.assert_array_equal(out, (expected / 255.0 - 0.5) / 0.5)


def test_normalisation_range_and_grayscale_to_rgb():
    gray = np.array([[0, 255], [128, 64]], np.uint8)
    out = to_normalized_array(Image.fromarray(gray))
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [-1.0, -1.0, -1.0] and out[0, 1].tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(out[1, 0], 128 / 127.5 - 1.0, atol=1e-7)  # float32 ToTensor + Normalize
    assert np.all(out[..., 0] == out[..., 2])
    rgba = Image.fromarray(np.zeros((2, 2, 4), np.uint8))  # fully transparent: composited on white
    assert np.all(to_normalized_array(rgba) == 1.0)


def test_same_size_is_unchanged():
    arr = np.random.default_rng(2).integers(0, 256, (28, 42, 3), dtype=np.uint8)
    out = ImageTransform(56, 28, 14)(Image.fromarray(arr))
    np.testing.assert_allclose(out, arr / 127.5 - 1.0, atol=1e-7)


def test_patchify_order_row_col_channel():
    p, h, w = 2, 3, 4
    y, x, c = np.meshgrid(np.arange(h * p), np.arange(w * p), np.arange(3), indexing="ij")
    img = (y * 1000 + x * 10 + c).astype(np.float32)
    patches = patchify_vit(img, p)
    assert patches.shape == (h * w, p * p * 3)
    for k in range(h * w):
        py, px = divmod(k, w)  # raster patch order
        for f in range(p * p * 3):
            ry, rest = divmod(f, p * 3)
            rx, ch = divmod(rest, 3)
            assert patches[k, f] == img[py * p + ry, px * p + rx, ch]


def test_patchify_rejects_non_multiple():
    with pytest.raises(ValueError, match="not divisible"):
        patchify_vit(np.zeros((15, 14, 3)), 14)


def test_invalid_transform():
    with pytest.raises(ValueError):
        ImageTransform(max_size=8, min_size=4, stride=16)
