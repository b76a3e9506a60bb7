"""Scanned layers and remat policies (models/layer_stack.py, models/remat.py): the scanned model equals the looped one
bit for bit (fp32 loss and every gradient, built from the same weights), exports to the same official tensors, and
every remat policy leaves the loss and gradients unchanged."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from unimedvl_jax.config import REMAT_POLICY_NAMES
from unimedvl_jax.interop.checkpoint_export import export_official
from unimedvl_jax.interop.checkpoint_import import import_official
from unimedvl_jax.interop.safetensors_io import SafetensorsReader
from unimedvl_jax.models.layer_stack import LAYER_AXIS, is_stacked, num_layers, stack_layers
from unimedvl_jax.models.remat import REMAT_POLICIES
from unimedvl_jax.models.unimedvl import UniMedVL, packed_loss
from unimedvl_jax.testing import Text, VaeImage, VitImage, build_packed_batch, small_model_config
from unimedvl_jax.train.step import param_path

SAMPLES = [[VitImage((2, 2)), Text([5, 6, 7]), Text([8, 9, 10, 11, 12, 13, 14, 15], loss=True)],
           [Text([16, 17, 18]), VaeImage((2, 3), noised=True, timestep=0.3)],
           [VaeImage((1, 3)), Text([30, 31, 32], loss=True)]]


def model_pair(**overrides):
    """(looped model, scanned model) with the same weights (the scanned one built from the looped one's layers)."""
    loop_cfg = small_model_config()
    loop_cfg.update(overrides)
    loop = UniMedVL(loop_cfg, rngs=nnx.Rngs(0))
    loop.llm2vae.kernel[...] = 0.1 * jax.random.normal(jax.random.key(1), loop.llm2vae.kernel.shape)
    scan_cfg = small_model_config()
    scan_cfg.update(overrides, scan_layers=True)
    scan = UniMedVL(scan_cfg, rngs=nnx.Rngs(0))
    params = loop_state_as_scanned(loop, scan)
    nnx.update(scan, params)
    return loop, scan


def loop_state_as_scanned(loop, scan):
    """The looped model's variables in the scanned model's layout."""
    state = nnx.state(loop)
    for owner in ("language_model", "vit_model"):
        layers = loop.language_model.model.layers if owner == "language_model" else \
            loop.vit_model.vision_model.encoder.layers
        stacked = nnx.state(stack_layers(list(layers)))
        if owner == "language_model":
            state["language_model"]["model"]["layers"] = stacked
        else:
            state["vit_model"]["vision_model"]["encoder"]["layers"] = stacked
    return state


def loss_and_grads(model, batch, latents, noise):
    """fp32 loss and gradients of every parameter, keyed by path (per layer for stacked parameters)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        out = nnx.merge(graphdef, params, rest)(batch, latents, noise)
        return packed_loss(out, batch.ce_weight)[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    flat = {}
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = param_path(path)
        if ".layers." in name and not name.split(".layers.")[1].split(".")[0].isdigit():  # stacked: one per layer
            head, tail = name.split(".layers.")
            for i in range(g.shape[0]):
                flat[f"{head}.layers.{i}.{tail}"] = np.asarray(g[i])
        else:
            flat[name] = np.asarray(g)
    return float(loss), flat


@pytest.fixture(scope="module")
def inputs():
    cfg = small_model_config()
    batch, latents, noise = build_packed_batch(SAMPLES, cfg, rng=3, pad_to=48,
                                               capacities=dict(und=40, gen=12, ce=16, vit=4, vae=12, vae_images=2))
    return batch, latents, noise


def test_stacked_layers_carry_a_replicated_layer_axis():
    _, scan = model_pair()
    layers = scan.language_model.model.layers
    assert is_stacked(layers) and num_layers(layers) == small_model_config().llm.num_layers
    kernel = layers.self_attn.q_proj.kernel
    assert kernel.get_metadata()["out_sharding"][0] == LAYER_AXIS
    assert kernel.shape[0] == num_layers(layers)


def test_scan_equals_loop_bit_for_bit(inputs):
    """Same weights: the scanned model's fp32 loss and every gradient equal the looped model's exactly."""
    loop, scan = model_pair()
    loss_loop, grads_loop = loss_and_grads(loop, *inputs)
    loss_scan, grads_scan = loss_and_grads(scan, *inputs)
    assert loss_loop == loss_scan
    assert grads_loop.keys() == grads_scan.keys()
    for name, g in grads_loop.items():
        np.testing.assert_array_equal(grads_scan[name], g, err_msg=name)
    assert any(np.abs(g).max() > 0 for name, g in grads_loop.items() if ".layers.1." in name)


def test_scanned_export_equals_looped_export_and_imports_back(tmp_path):
    loop, scan = model_pair()
    export_official(loop, loop.cfg, tmp_path / "loop", dtype="float32")
    export_official(scan, scan.cfg, tmp_path / "scan", dtype="float32")
    for file in ("ema.safetensors", "ae.safetensors"):
        a, b = SafetensorsReader(str(tmp_path / "loop" / file)), SafetensorsReader(str(tmp_path / "scan" / file))
        try:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                np.testing.assert_array_equal(a.get(key), b.get(key), err_msg=key)
        finally:
            a.close()
            b.close()
    cfg = scan.cfg.copy_and_resolve_references()
    back, _, _ = import_official(tmp_path / "loop", cfg=cfg)
    assert is_stacked(back.language_model.model.layers)
    np.testing.assert_array_equal(back.language_model.model.layers.mlp.down_proj.kernel[...],
                                  scan.language_model.model.layers.mlp.down_proj.kernel[...])


def test_every_remat_policy_gives_the_same_loss_and_gradients(inputs):
    """Scanned decoder and ViT layers (the large-model setting) under each policy against no remat."""
    assert tuple(REMAT_POLICIES) == REMAT_POLICY_NAMES
    _, model = model_pair()
    base_loss, base_grads = loss_and_grads(model, *inputs)
    for policy in REMAT_POLICY_NAMES[1:]:
        model.remat_policy = policy
        loss, grads = loss_and_grads(model, *inputs)
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6, err_msg=policy)
        for name, g in base_grads.items():  # recomputed fp32 forwards fuse differently: rounding-level changes
            np.testing.assert_allclose(grads[name], g, rtol=1e-5, atol=max(1e-5 * np.abs(g).max(), 1e-9),
                                       err_msg=f"{policy}: {name}")


def test_remat_policies_change_what_is_saved():
    """The policies differ in what the backward keeps: 'none' keeps the most residuals, 'full' the fewest, and the
    named policies keep their tensors (jax.ad_checkpoint.print_saved_residuals)."""
    loop, _ = model_pair()
    layer = loop.language_model.model.layers[0]
    cfg = small_model_config()
    n, hidden = 16, cfg.llm.hidden_size
    x = jax.random.normal(jax.random.key(0), (n, hidden))
    cos = jnp.ones((n, hidden // cfg.llm.num_heads))
    sin = jnp.zeros_like(cos)
    from unimedvl_jax.models.attention import TokenMeta
    meta = TokenMeta(*(jnp.zeros(n, jnp.int32),) * 3, jnp.arange(n, dtype=jnp.int32))
    idx = [jnp.arange(8, dtype=jnp.int32), jnp.arange(8, 16, dtype=jnp.int32)]
    graphdef, state = nnx.split(layer)

    def saved(policy):
        def f(state, x):
            out, _ = nnx.merge(graphdef, state)(x, idx, cos, sin, meta, backend="dense", block_size=16)
            return jnp.sum(out)

        chosen = REMAT_POLICIES[policy]
        fn = f if chosen is None else jax.checkpoint(f, policy=chosen)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(fn, state, x)
        return [line for line in out.getvalue().splitlines() if line.strip()
                and "from the argument" not in line and "from a constant" not in line]

    counts = {p: len(saved(p)) for p in ("none", "full", "minimal", "save_qkv_proj", "save_attention_out")}
    assert counts["full"] == 0
    assert 0 < counts["save_attention_out"] < counts["save_qkv_proj"] < counts["minimal"] < counts["none"], counts
    names = " ".join(saved("save_qkv_proj"))
    assert "query_proj" in names and "key_proj" in names and "value_proj" in names


def test_scanned_model_decodes_like_the_looped_one():
    """Prefill and greedy decoding (KV cache per layer, stacked for the scan) give the looped model's tokens and
    logits."""
    from unimedvl_jax.inference.context import Context
    from unimedvl_jax.inference.decoding import decode

    loop, scan = model_pair()
    outs = []
    for model in (loop, scan):
        ctx = Context.new(model, 48).add_text(list(range(10, 30))).add_text(list(range(40, 47)))
        outs.append(decode([ctx], 6, return_logits=True))
    assert outs[0].ids == outs[1].ids
    np.testing.assert_allclose(outs[1].logits[0], outs[0].logits[0], rtol=0, atol=1e-5)
