"""Mesh construction and the rules tables on 8 simulated CPU devices (subprocess, XLA flag set before jax)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from unimedvl_jax.sharding import (
    BATCH_AXES,
    MESH_AXES,
    RESIDUAL,
    RULES,
    activation_rules,
    constrain,
    make_mesh,
    partition_spec,
)

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


def _constraint_specs(fn, *args):
    """The sharding specs of every sharding_constraint in fn's jaxpr, as strings."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [str(e.params["sharding"].spec) for e in jaxpr.eqns if e.primitive.name == "sharding_constraint"]


def test_constrain_is_a_no_op_without_a_mesh_or_without_rules():
    x = jnp.ones((6, 4))
    with activation_rules("fsdp_tensor"):  # rules but no mesh
        assert constrain(x, RESIDUAL) is x
        assert _constraint_specs(lambda x: constrain(x, ("act_length", "act_mlp")), x) == []
    with jax.sharding.use_abstract_mesh(make_mesh((1, 1, 1)).abstract_mesh):  # a mesh but no rules
        assert constrain(x, RESIDUAL) is x
        assert _constraint_specs(lambda x: constrain(x, ("act_length", "act_mlp")), x) == []
        with activation_rules(None):  # rules switched off explicitly
            assert constrain(x, RESIDUAL) is x
    assert constrain(x, RESIDUAL) is x


def test_constrain_resolves_activation_names_from_the_active_table():
    """On a (1,1,1) mesh every axis divides: the spec is the table's, minus the batch axes of an enclosing vmap."""
    x = jnp.ones((6, 4, 2))
    axes = ("act_length", "act_heads", None)
    with jax.sharding.use_abstract_mesh(make_mesh((1, 1, 1)).abstract_mesh):
        with activation_rules("fsdp_tensor"):
            assert _constraint_specs(lambda x: constrain(x, axes), x) == [str(P(None, "tensor", None))]
        with activation_rules("fsdp_tensor_sp"):
            assert _constraint_specs(lambda x: constrain(x, axes), x) == [str(P("tensor", None, None))]
        with activation_rules("fsdp"):  # activations split over the batch only
            assert _constraint_specs(lambda x: constrain(x, axes), x) == [str(P(None, None, None))]
        # A table naming a batch axis: kept out while a vmap's spmd_axis_name uses it, used otherwise.
        table = {"act_length": "fsdp", "act_heads": "tensor"}
        with activation_rules(table, batch_axes=BATCH_AXES):
            assert _constraint_specs(lambda x: constrain(x, axes), x) == [str(P(None, "tensor", None))]
        with activation_rules(table):
            assert _constraint_specs(lambda x: constrain(x, axes), x) == [str(P("fsdp", "tensor", None))]
    # Every table that names an activation maps it to a mesh axis, and never to a batch axis.
    for name, table in RULES.items():
        acts = {k: v for k, v in table.items() if k.startswith("act_")}
        assert all(v in MESH_AXES and v not in BATCH_AXES for v in acts.values()), (name, acts)


CONSTRAIN_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from unimedvl_jax.sharding import BATCH_AXES, activation_rules, constrain, make_mesh

    mesh = make_mesh((2, 2, 2))
    x = jnp.arange(8 * 6 * 5 * 4, dtype=jnp.float32).reshape(8, 6, 5, 4)

    def step(x, table):
        # The train step's shape: packs vmapped over the batch axes, the model sees one pack (length, heads, dim).
        def one(pack):
            with activation_rules(table, batch_axes=BATCH_AXES):
                return jnp.sin(constrain(pack, ("act_length", "act_heads", None))) * 2
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.vmap(one, spmd_axis_name=BATCH_AXES)(x)

    data = NamedSharding(mesh, P(BATCH_AXES))
    want = jnp.sin(x) * 2
    # heads (5) do not divide over tensor: dropped; length (6) does under the sequence-parallel name.
    cases = (({"act_heads": "tensor"}, '[{"data", "fsdp"}, {}, {}, {}]', P(BATCH_AXES), "f32[2,6,5,4]"),
             ({"act_length": "tensor", "act_heads": "tensor"}, '[{"data", "fsdp"}, {"tensor"}, {}, {}]',
              P(BATCH_AXES, "tensor"), "f32[2,3,5,4]"),
             ({"act_length": "fsdp"}, '[{"data", "fsdp"}, {}, {}, {}]', P(BATCH_AXES), "f32[2,6,5,4]"))
    for table, spec, out_spec, per_device in cases:
        f = jax.jit(lambda x, t=table: step(x, t), in_shardings=data)
        lowered = f.lower(x)
        text = lowered.as_text()
        assert text.count("sdy.sharding_constraint") == 1 and spec in text, (table, text)
        assert per_device in lowered.compile().as_text(), (table, per_device)
        out = f(x)
        assert out.sharding.spec == out_spec, (table, out.sharding)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
        print("OK", table, flush=True)
    # The raw constraint naming a batch axis inside the vmap is an error, which activation_rules avoids.
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            jax.vmap(lambda p: jax.lax.with_sharding_constraint(p, P("fsdp")), spmd_axis_name=BATCH_AXES)(x)
        raise AssertionError("expected an error")
    except ValueError as e:
        assert "spmd_axis_name" in str(e), e
    print("ALL-OK")
""")


def test_activation_constraints_inside_the_batch_vmap_on_eight_devices():
    """Constraints under vmap(spmd_axis_name=BATCH_AXES) on a (2,2,2) mesh: the StableHLO carries the batch axes plus
    the table's axis where it divides, the compiled per-device shapes are sharded so, values are unchanged, and a
    table naming a batch axis inside the vmap is resolved without it (the raw constraint would raise)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", CONSTRAIN_SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert "ALL-OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
