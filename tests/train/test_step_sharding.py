"""The train step under the rules tables' activation constraints and with bf16 compute weights over fp32 master
parameters, on 8 simulated CPU devices (subprocess, XLA flag set before jax; helpers from tests/train/test_step.py).

Gradients are read exactly with a pass-through "optimizer" whose state is the last (masked) gradient; the step runs
at the first stage-1 step, where every group but the VAE trains."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, os, re, sys, tempfile
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    nnx.use_eager_sharding(False)
    sys.path.insert(0, os.path.join(os.getcwd(), "tests", "train"))
    import test_step as T
    from unimedvl_jax.sharding import BATCH_AXES, make_mesh, shard_model, state_shardings
    from unimedvl_jax.train.step import (compile_train_step, init_train_state, make_optimizer, make_tables,
                                         make_train_step, train_state_shardings)
    from unimedvl_jax.train.train_config import mesh_config

    assert len(jax.devices()) == 8
    KEY = jax.random.key(T.KEY_SEED)


    def last_grads():
        # A pass-through "optimizer": zero updates, state = the gradient the step handed it.
        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
        return optax.GradientTransformation(zeros, lambda grads, state, params=None: (zeros(grads), grads))


    def setup(shape, rules, constrain, model_dtype="float32", **optim):
        cfg = T.small_cfg()
        cfg.model.dtype = model_dtype
        cfg.mesh = mesh_config(shape, rules, constrain_activations=constrain)
        cfg.optim.update(optim)
        mesh = make_mesh(shape)
        graphdef, params, rest = nnx.split(shard_model(T.make_model(cfg), rules, mesh), nnx.Param, ...)
        tables = make_tables(cfg, params)
        tx = make_optimizer(cfg, tables) if optim else last_grads()
        state = init_train_state(params, tx).replace(step=jnp.asarray(T.STAGE_STEPS[0], jnp.int32))
        shardings = train_state_shardings(state, state_shardings(params, rules, mesh), mesh)
        batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
        step = compile_train_step(make_train_step(graphdef, rest, tx, tables, cfg), shardings, batch_sharding)
        return step, jax.device_put(state, shardings), jax.device_put(T.make_batch(cfg.model, 8), batch_sharding)


    def constraints(lowered):
        # The distinct sharding_constraint annotations of a lowered step (StableHLO / Shardy text).
        found = re.findall(r"sdy.sharding_constraint %[^ ]+ <@mesh, (\\[.*?\\])> : tensor<([^>]*)>", lowered.as_text())
        return sorted(set(found))


    def compile_with_all_gathers(lowered):
        # The executable and the (dtype, shape) of every all-gather right after SPMD partitioning: the CPU backend's
        # later float normalisation widens bf16 collectives to f32, so the final HLO cannot show what a GPU / TPU
        # would move.
        with tempfile.TemporaryDirectory() as tmp:
            compiled = lowered.compile(compiler_options={"xla_dump_to": tmp,
                                                         "xla_dump_hlo_pass_re": "spmd-partitioning"})
            name = [f for f in os.listdir(tmp) if "step_on_mesh" in f and "after_spmd-partitioning" in f]
            assert len(name) == 1, sorted(os.listdir(tmp))[:20]
            text = open(os.path.join(tmp, name[0])).read()
        return compiled, re.findall(r"= (\\w+)\\[([\\d,]*)\\]\\S* all-gather\\(", text)


    result = {}
    # (a) fsdp_tensor on (2,2,2) with and without the activation constraints; fsdp_tensor_sp with them.
    for rules, constrain in (("fsdp_tensor", False), ("fsdp_tensor", True), ("fsdp_tensor_sp", True)):
        step, state, batch = setup((2, 2, 2), rules, constrain)
        lowered = step.lower(state, batch, KEY)
        new, m = lowered.compile()(state, batch, KEY)
        result[f"{rules} {constrain}"] = {"loss": float(m["loss"]), "constraints": constraints(lowered),
                                          "grads": {p: v.tolist() for p, v in T.flat(new.opt_state).items()}}
        print("OK", rules, constrain, flush=True)

    # (c) bf16 compute weights over fp32 masters, fsdp on (2,4,1), compute in bf16 (model.dtype).
    param_shapes = {}
    for weights in ("", "bfloat16"):
        step, state, batch = setup((2, 4, 1), "fsdp", True, model_dtype="bfloat16", compute_weights_dtype=weights)
        compiled, gathers = compile_with_all_gathers(step.lower(state, batch, KEY))
        before = T.flat(state.params)
        new, m = compiled(state, batch, KEY)
        after, lr = T.flat(new.params), float(m["lr"])
        moved = [p for p in after if np.any(after[p] != before[p])]
        param_shapes = {",".join(map(str, v.shape)) for v in before.values() if v.ndim >= 2}
        result[f"weights {weights}"] = {
            "loss": float(m["loss"]), "finite": bool(m["finite"]), "moved": len(moved),
            "param_dtypes": sorted({str(v.dtype) for v in after.values()}),
            # First AdamW step: Δ = -lr·(sign(g) + wd·p) with p the fp32 master, so Δ + lr·wd·p is 0 or ±lr
            # entry by entry (relative error, max over parameters); bf16-rounded masters would be off by ~1e-3·|p|.
            "master_update_err": max(float(np.max(np.minimum(np.abs(d), np.abs(np.abs(d) - lr)))) / lr for d in (
                after[p].astype(np.float64) - before[p] + lr * T.WEIGHT_DECAY * before[p] for p in moved)),
            "param_gathers": sorted({(d, s) for d, s in gathers if s in param_shapes})}
        print("OK weights", weights or "off", flush=True)
    print("RESULT", json.dumps(result))
    for name, r in result.items():
        print("SUMMARY", name, {k: v for k, v in r.items() if k != "grads"})
""")


@pytest.fixture(scope="module")
def mesh_result():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=1500)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-3000:] + res.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_activation_constraints_keep_loss_and_grads_and_reach_the_compiled_step(mesh_result):
    """fsdp_tensor on (2,2,2): the step with the activation constraints gives the loss and gradients of the step
    without them, and its lowering carries them (heads / MLP / vocab over tensor after the batch axes, residual
    stream replicated over tensor); fsdp_tensor_sp shards the residual stream's tokens over tensor, same values."""
    off, on, sp = (mesh_result[k] for k in ("fsdp_tensor False", "fsdp_tensor True", "fsdp_tensor_sp True"))
    assert off["constraints"] == []
    batch = '{"data", "fsdp"}'
    specs = {spec for spec, _ in on["constraints"]}
    assert f'[{batch}, {{}}, {{"tensor"}}, {{}}]' in specs  # ViT q / k / v: (length, heads, head_dim)
    assert f'[{batch}, {{}}, {{"tensor"}}]' in specs        # CE logits: (positions, vocab)
    assert f'[{batch}, {{}}, {{}}]' in specs                 # residual stream: (length, embed)
    assert not any(s.startswith(f'[{batch}, {{"tensor"}}') for s in specs)
    sp_specs = {spec for spec, _ in sp["constraints"]}
    assert f'[{batch}, {{"tensor"}}, {{}}]' in sp_specs and f'[{batch}, {{}}, {{}}]' not in sp_specs
    for name, r in (("fsdp_tensor", on), ("fsdp_tensor_sp", sp)):
        np.testing.assert_allclose(r["loss"], off["loss"], rtol=1e-6, err_msg=name)
        moved = 0
        for path, g_ref in off["grads"].items():
            g_ref, g = np.asarray(g_ref), np.asarray(r["grads"][path])
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(g_ref).max()),
                                       err_msg=f"{name} {path}")
            moved += bool(np.abs(g_ref).max() > 0)
        assert moved > 50, moved


def test_bf16_compute_weights_update_fp32_masters_and_gather_bf16(mesh_result):
    """optim.compute_weights_dtype='bfloat16' on (2,4,1) fsdp: the step runs, the parameters stay fp32 and take
    the AdamW update exactly, the loss is the fp32-weights loss (bf16 or fp32 activations) within bf16 precision,
    and every parameter-shaped all-gather moves bf16 (without the option the fp32 embedding table is gathered in
    fp32)."""
    off, on = mesh_result["weights "], mesh_result["weights bfloat16"]
    for r in (off, on):
        assert r["finite"] and r["param_dtypes"] == ["float32"] and r["moved"] > 50, r
    for r in (off, on):  # the update applied to the fp32 master (see the script)
        assert r["master_update_err"] < 1e-3, r["master_update_err"]
    np.testing.assert_allclose(on["loss"], off["loss"], rtol=1e-2)
    np.testing.assert_allclose(on["loss"], mesh_result["fsdp_tensor False"]["loss"], rtol=1e-2)  # all fp32
    assert on["loss"] != off["loss"]  # the forward really read bf16 weights
    on_dtypes = {d for d, _ in on["param_gathers"]}
    assert on_dtypes == {"bf16"} and len(on["param_gathers"]) >= 5, on["param_gathers"]
    assert ["f32", "256,64"] in off["param_gathers"], off["param_gathers"]  # the (vocab, embed) table
