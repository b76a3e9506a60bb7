"""The splash (Pallas TPU) attention backend equals the dense reference under the docs/packed_sequence.md §4.3 mask:
forward and gradients on randomised packs, under vmap, for ViT segments and a cache-shaped call, in bf16 (all in
interpret mode on CPU), and it compiles ahead of time for a TPU v5p slice."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import attention_cases as cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import assert_close, dense, qkv, value_and_grads

from unimedvl_jax.models.attention_mask import segment_meta
from unimedvl_jax.models.attention_splash import padded_mask, splash_attention
from unimedvl_jax.packed_batch import CAUSAL, FULL, NOISE

ROOT = pathlib.Path(__file__).resolve().parents[2]
BLOCK = 128  # the smallest block the kernel takes


def random_meta(seed: int, pad_to: int | None = None):
    """TokenMeta of a randomised pack of 10-14 samples (every split kind, images opening and closing samples) with
    trailing padding, about 260-300 tokens: three 128-token blocks."""
    return cases.random_meta(seed, (10, 15), pad_to)


def splash(q_meta, k_meta, scale=None):
    return lambda q, k, v: splash_attention(q, k, v, q_meta, k_meta, scale=scale, block_size=BLOCK)


def block_kinds(mask, block=BLOCK):
    """The set of block kinds ('empty', 'partial', 'full') of a padded mask tiled into block × block tiles."""
    t = np.asarray(mask)
    tiles = t.reshape(t.shape[0] // block, block, t.shape[1] // block, block).swapaxes(1, 2)
    kinds = np.where(tiles.all((2, 3)), "full", np.where(tiles.any((2, 3)), "partial", "empty"))
    return set(kinds.ravel().tolist())


@pytest.mark.parametrize("seed", range(3))
def test_matches_dense_on_random_packs(seed):
    """Forward and dq, dk, dv within 1e-5 (fp32) on packs with text, ViT, clean and noised VAE splits and padding;
    GQA 4 / 2 heads; lengths that are not a multiple of the block; fully masked blocks present (and skipped)."""
    meta = random_meta(seed)
    t = meta.length
    assert t > BLOCK and t % BLOCK, t
    assert {int(m) for m in meta.mode} == {CAUSAL, FULL, NOISE}
    assert {"empty", "partial"} <= block_kinds(padded_mask(meta, meta, -(-t // BLOCK) * BLOCK, -(-t // BLOCK) * BLOCK))
    q, k, v, cot = qkv(seed, t)
    assert_close(value_and_grads(splash(meta, meta), q, k, v, cot), value_and_grads(dense(meta, meta), q, k, v, cot))


def test_under_vmap_over_packs():
    """Two different packs of one static length in a vmapped, differentiated call (as in the train step), with an
    explicit scale."""
    metas = [random_meta(seed, pad_to=300) for seed in (5, 6)]
    meta = jax.tree.map(lambda *a: jnp.stack(a), *metas)
    q, k, v, cot = (x.reshape((2, 300) + x.shape[1:]) for x in qkv(7, 2 * 300))

    def batched(attention):
        return lambda q, k, v: jax.vmap(lambda q, k, v, m: attention(m, m, scale=0.3)(q, k, v))(q, k, v, meta)

    assert_close(value_and_grads(batched(splash), q, k, v, cot), value_and_grads(batched(dense), q, k, v, cot))


def test_vit_segments():
    """Bidirectional attention within images (the ViT's segment_meta), plain multi-head; covers full blocks too."""
    meta = segment_meta(np.repeat(np.arange(4), [150, 130, 1, 19]))
    assert block_kinds(padded_mask(meta, meta, 384, 384)) == {"empty", "partial", "full"}
    q, k, v, cot = qkv(3, meta.length, hq=2, hkv=2)
    assert_close(value_and_grads(splash(meta, meta), q, k, v, cot), value_and_grads(dense(meta, meta), q, k, v, cot))


def test_cache_shaped_call():
    """A chunk of 11 new queries against a 128-slot cache (filled prefix, the chunk written in place, empty slots
    after): padded queries but no padded keys, Tq != Tk."""
    cache_len, filled, chunk = 128, 37, 11
    q_meta, k_meta = cases.cache_metas(cache_len, filled, chunk)
    q, k, v, cot = qkv(4, chunk, tk=cache_len)
    got = value_and_grads(splash(q_meta, k_meta), q, k, v, cot)
    assert_close(got, value_and_grads(dense(q_meta, k_meta), q, k, v, cot))


def test_bf16_error_is_that_of_dense_bf16():
    """In bf16, splash's error against fp32 dense (on the same bf16-rounded inputs) is within 3× the bf16 dense
    backend's own error, for the output and every gradient. Both keep fp32 accumulators and round to bf16 at a few
    points, so both errors are a few bf16 ulps of the largest values (measured ratios 0.7-2.0 over three packs);
    splash rounds differently (q·scale to bf16 with the inexact scale 32^-0.5, other summation orders), hence the
    factor 3. A real fault (a wrong mask entry, a missing scale, a wrongly skipped block) errs by the size of the
    values."""
    meta = random_meta(11)
    q, k, v, cot = qkv(11, meta.length, d=32)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    ref = value_and_grads(dense(meta, meta), *(x.astype(jnp.float32) for x in low), cot)
    flat_ref = jax.tree.leaves(ref)
    for name, want, dense_bf16, splash_bf16 in zip(
            ["out", "dq", "dk", "dv"], flat_ref, jax.tree.leaves(value_and_grads(dense(meta, meta), *low, cot)),
            jax.tree.leaves(value_and_grads(splash(meta, meta), *low, cot))):
        assert splash_bf16.dtype == jnp.bfloat16
        dense_err = float(jnp.abs(dense_bf16.astype(jnp.float32) - want).max())
        err = float(jnp.abs(splash_bf16.astype(jnp.float32) - want).max())
        scale = float(jnp.abs(want).max())
        assert 0 < dense_err < 0.02 * scale, (name, dense_err, scale)
        assert err <= 3 * dense_err, (name, err, dense_err)


def test_rejects_bad_arguments():
    """Clear errors naming the offending shape or size."""
    meta = segment_meta(np.zeros(40, np.int32))
    q, k, v, _ = qkv(0, 40)
    with pytest.raises(ValueError, match="multiple of 128, got 100"):
        splash_attention(q, k, v, meta, meta, block_size=100)
    with pytest.raises(ValueError, match=r"query heads 3 not a multiple of KV heads 2 \(q \(40, 3, 16\)"):
        splash_attention(q[:, :3], k, v, meta, meta, block_size=128)
    with pytest.raises(ValueError, match=r"metadata lengths \(q 39, k 40\)"):
        splash_attention(q, k, v, meta[:39], meta, block_size=128)
    with pytest.raises(ValueError, match=r"v \(40, 2, 8\)"):
        splash_attention(q, k, v[..., :8], meta, meta, block_size=128)


# A jitted, differentiated call over 4 packs (one per chip, sharded over the mesh), each pack vmapped and put inside a
# per-pack shard_map as the train step would (a Mosaic kernel cannot be partitioned automatically); compiled for the
# 4 chips of a v5p-8 from this CPU machine. The environment must be set before jax is imported.
AOT_SCRIPT = r"""
import json, os, time
os.environ.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
from unimedvl_jax.models.attention_mask import TokenMeta
from unimedvl_jax.models.attention_splash import splash_attention

topo = topologies.get_topology_desc(platform="tpu", topology_name="v5:2x2x1", chip_config_name="megacore",
                                    chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))
mesh = jax.sharding.Mesh(topo.devices, ("data",))
packs, t, hq, hkv, d = 4, 1000, 8, 2, 128

def per_pack(q, k, v, meta):
    attend = lambda q, k, v, m: splash_attention(q, k, v, m, m, block_size=512, interpret=False)
    return jax.shard_map(attend, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)(q, k, v, meta)

def loss(q, k, v, meta):
    out = jax.vmap(per_pack, spmd_axis_name="data")(q, k, v, meta)
    return jnp.sum(out.astype(jnp.float32) ** 2)

def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("data")))

ids = spec((packs, t), jnp.int32)
args = (spec((packs, t, hq, d), jnp.bfloat16), spec((packs, t, hkv, d), jnp.bfloat16),
        spec((packs, t, hkv, d), jnp.bfloat16), TokenMeta(ids, ids, ids, ids))
start = time.time()
compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile()
mem = compiled.memory_analysis()
hlo = compiled.as_text()
print("RESULT " + json.dumps(dict(
    device_kind=topo.devices[0].device_kind, num_devices=len(topo.devices), compile_s=time.time() - start,
    kernels=hlo.count('custom_call_target="tpu_custom_call"'), all_gathers=hlo.count("all-gather"),
    argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
    temp_bytes=mem.temp_size_in_bytes, generated_code_bytes=mem.generated_code_size_in_bytes)))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'); it compiles for TPU without one")
def test_compiles_for_tpu_v5p_ahead_of_time():
    """The jitted, vmapped, differentiated splash call compiles for a v5p-8 (4 chips) with the compiled kernel: three
    Mosaic kernels (forward, dQ, dK / dV), packs kept on their chips (no all-gather)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(result)
    assert result["device_kind"].startswith("TPU v5") and result["num_devices"] == 4
    assert result["kernels"] == 3 and result["all_gathers"] == 0, result
    # One pack per chip: q, k, v in bf16 (3 MB) and the int32 ids. The temporaries are mostly the int32 mask tilings
    # of the 1024-token padded pack (4 MiB per kernel); the fp32 scores of a dense fallback alone would take 32 MiB.
    assert 1000 * (8 + 2 + 2) * 128 * 2 < result["argument_bytes"] < 1000 * (8 + 2 + 2) * 128 * 2 + 2**15
    assert 0 < result["temp_bytes"] < 24 * 2**20
