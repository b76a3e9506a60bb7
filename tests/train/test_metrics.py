"""FLOP functions of train/metrics.py: the mask's pair count, the attention conventions, capacity counts, peaks."""

import numpy as np
import pytest

from unimedvl_jax.testing import Text, VaeImage, VitImage, build_packed_batch, small_model_config
from unimedvl_jax.train.metrics import FlopModel, mask_pairs, peak_tflops, sample_lengths

# Every split mode: causal text, full ViT and clean VAE blocks, noised blocks (hidden from later tokens), padding.
SAMPLES = [[Text([5, 6, 7]), VaeImage((2, 3), noised=True, timestep=0.3), Text([8, 9], loss=True)],
           [VaeImage((2, 2)), VitImage((3, 2)), Text([10, 11, 12, 13], loss=True), VaeImage((2, 2), noised=True)],
           [Text([14])]]
FM = FlopModel(n_llm=10, n_head=7, n_vit=5, n_latent=3, llm_layers=2, llm_hidden=4, vit_layers=1, vit_hidden=2)


def _batch(**kw):
    return build_packed_batch(SAMPLES, small_model_config(), pad_to=64, **kw)[0].to_numpy()


def test_mask_pairs_counts_what_the_mask_allows():
    from unimedvl_jax.models.attention_mask import TokenMeta, allowed
    from unimedvl_jax.packed_batch import PAD

    b = _batch()
    meta = TokenMeta(b.sample_id, b.split_id, b.split_mode, np.arange(64))
    real = b.token_kind != PAD
    brute = np.asarray(allowed(meta, meta))[real][:, real].sum()
    assert mask_pairs(b) == brute
    n = sample_lengths(b)
    assert list(n) == [5 + 8 + 4, 6 + 8 + 6 + 6, 3] and real.sum() < 64
    assert np.sum(n * (n + 1) / 2) < mask_pairs(b) < np.sum(n ** 2)  # image blocks see ahead, noise is hidden


def test_attention_conventions_and_capacity():
    b = _batch(capacities=dict(und=40, gen=20, ce=16, vit=8, vae=24))
    n = sample_lengths(b).astype(float)
    real = FM.pack_flop_terms(b, attention="mask")
    assert FM.pack_flops(b) == FM.pack_flops(b, n)  # sample lengths default to the batch's own
    assert real["llm"] == 6 * 10 * n.sum() and real["vit"] == 6 * 5 * 6 and real["latent"] == 6 * 3 * 14
    assert real["head"] == 6 * 7 * np.sum(b.ce_index < 64) and real["vit_attention"] == 12 * 1 * 2 * 6 ** 2
    assert real["attention"] == 12 * 2 * 4 * mask_pairs(b)
    for convention, pairs in (("causal", np.sum(n ** 2) / 2), ("maxtext", 64 ** 2 / 2), ("full", 64 ** 2)):
        assert FM.pack_flop_terms(b, attention=convention)["attention"] == 12 * 2 * 4 * pairs
    cap = FM.pack_flop_terms(b, capacity=True)
    assert cap["llm"] == 6 * 10 * (40 + 20) and cap["head"] == 6 * 7 * 16
    assert cap["vit"] == 6 * 5 * 8 and cap["latent"] == 6 * 3 * 24
    shared = FlopModel(**{**vars(FM), "n_llm_shared": 4}).pack_flop_terms(b, capacity=True)
    assert shared["llm"] == 6 * (4 * 64 + 6 * 60)
    with pytest.raises(ValueError, match="attention='bogus' not in"):
        FM.pack_flops(b, attention="bogus")


@pytest.mark.parametrize("layer_module", ["mot", "moe", "dense"])
def test_shared_parameters_by_layer_module(layer_module):
    import jax
    from flax import nnx

    from unimedvl_jax.models.unimedvl import UniMedVL

    cfg = small_model_config()
    cfg.llm.layer_module = layer_module
    params = jax.eval_shape(lambda: nnx.split(UniMedVL(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[1])
    fm = FlopModel.from_params(params, cfg)
    h, d, kv, mlp = 64, 16, 32, 128
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h + 2 * d + h  # q, k, v, o, QK-norm, input norm
    mlp_params = 3 * h * mlp
    assert fm.n_llm == 2 * (attention + mlp_params + h)
    shared = {"mot": 0, "moe": attention + h, "dense": attention + mlp_params + h}[layer_module]
    assert fm.n_llm_shared == 2 * shared


def test_peak_tflops_by_device_kind():
    assert peak_tflops("NVIDIA H200") == peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops("TPU v5") == peak_tflops("TPU v5p") == 459
    assert peak_tflops("TPU v6 lite") == 918
    assert peak_tflops("TPU v5 lite") is None and peak_tflops("cpu") is None
