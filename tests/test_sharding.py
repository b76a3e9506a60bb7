"""Mesh construction and the rules tables on 8 simulated CPU devices (subprocess, XLA flag set before jax)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from unimedvl_jax.sharding import make_mesh, partition_spec

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    nnx.use_eager_sharding(False)
    from configs import tiny
    from unimedvl_jax.models.unimedvl import UniMedVL
    from unimedvl_jax.sharding import make_mesh, shard_model
    from unimedvl_jax.testing import Text, VaeImage, VitImage, build_packed_batch

    cfg = tiny.get_config().model
    samples = [[VitImage((3, 4)), Text([5, 6, 7], loss=False), Text([8, 9, 10, 11], loss=True)],
               [Text([12, 13, 14]), VaeImage((2, 3), noised=True, timestep=0.3)]]
    batch, latents, noise = build_packed_batch(samples, cfg, pad_to=96)

    @nnx.jit
    def forward(model, batch, latents, noise):
        out = model(batch, latents, noise)
        return out.ce, out.mse, out.hidden

    reference = forward(UniMedVL(cfg, rngs=nnx.Rngs(0)), batch, latents, noise)
    expect = {  # representative weights: (mesh shape, rules) -> {path: spec}
        ((8, 1, 1), "dp"): {"q": P(None, None), "emb": P(None, None)},
        ((2, 4, 1), "fsdp"): {"q": P("fsdp", None), "emb": P("fsdp", None), "down": P(None, "fsdp")},
        ((2, 2, 2), "fsdp_tensor"): {"q": P("fsdp", "tensor"), "emb": P("tensor", "fsdp"),
                                     "down": P("tensor", "fsdp"), "conv": P(None, None, "fsdp", None)},
    }
    for (shape, rules), specs in expect.items():
        mesh = make_mesh(shape)
        model = shard_model(UniMedVL(cfg, rngs=nnx.Rngs(0)), rules, mesh)
        lm = model.language_model.model
        got = {"q": lm.layers[0].self_attn.q_proj.kernel, "emb": lm.embed_tokens.weight,
               "down": lm.layers[1].mlp_moe_gen.down_proj.kernel,
               "conv": model.vae_model.decoder.up[1].block[0].conv1.kernel}
        for name, spec in specs.items():
            assert got[name].get_value().sharding.spec == spec, (shape, rules, name, got[name].get_value().sharding)
        with jax.set_mesh(mesh):
            out = forward(model, batch, latents, noise)
        for a, b in zip(out, reference):
            a, b = np.asarray(a), np.asarray(b)
            assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, np.max(np.abs(b))), (shape, rules)
        print("OK", shape, rules)
    print("ALL-OK")
""")


def test_rules_tables_on_eight_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=900)
    assert "ALL-OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


def test_partition_spec_uses_each_mesh_axis_once_and_only_where_it_divides():
    class FakeMesh:
        shape = {"data": 2, "fsdp": 4, "tensor": 2}

    rules = {"embed": "fsdp", "embed_in": "fsdp", "mlp": "tensor"}
    assert partition_spec(("embed_in", "embed"), (64, 64), rules, FakeMesh()) == P("fsdp", None)
    assert partition_spec(("embed", "mlp"), (6, 8), rules, FakeMesh()) == P(None, "tensor")
    with pytest.raises(ValueError, match=r"needs 6 devices, have 1"):
        make_mesh((2, 3, 1))
    with pytest.raises(ValueError, match="at most one -1"):
        make_mesh((-1, -1, 1))
