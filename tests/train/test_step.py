"""The jitted train step (unimedvl_jax/train/step.py): in-jit curriculum, frozen groups, non-finite skip,
docs/packed_sequence.md §4.6 normalisation, and the same per-step losses on 8 simulated CPU devices (subprocess) as on
one.

One module-scoped run of a tiny model through all three stages (stage_steps (3, 2, 3), weight decay on) is
recorded state by state; the single-process tests read that trajectory, so the step compiles once for them all.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from unimedvl_jax.curriculum import curriculum_config
from unimedvl_jax.models.unimedvl import UniMedVL
from unimedvl_jax.testing import Text, VaeImage, VitImage, build_packed_batch, small_model_config
from unimedvl_jax.train.optim_config import optim_config
from unimedvl_jax.train.step import init_train_state, make_optimizer, make_tables, make_train_step, param_path

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEY_SEED = 7
STAGE_STEPS = (3, 2, 3)
N_STEPS = sum(STAGE_STEPS)
# Per stage: (peak lr, warmup steps, schedule, min lr). Stage 0 warms up from 0, stage 2 decays (cosine).
LR = ((1e-3, 2, "constant", 1e-7), (5e-4, 0, "constant", 1e-7), (2e-3, 0, "cosine", 2e-4))
CE_W, MSE_W = (1.0, 0.0, 1.0), (0.0, 1.0, 0.5)
TRAINABLE = (r"^language_model\.", r"^(?!vae_model\.)", r"^(?!(vae_model|language_model)\.)")
GROUPS = ("language_model", "vit_model", "connector", "vae2llm", "llm2vae", "time_embedder", "vae_model")
TRAINED = ({"language_model"},
           {"language_model", "vit_model", "connector", "vae2llm", "llm2vae", "time_embedder"},
           {"vit_model", "connector", "vae2llm", "llm2vae", "time_embedder"})
WEIGHT_DECAY = 0.1
EMA_DECAY = 0.9  # large enough that one EMA update of a trained parameter is visible in fp32

# Two pack layouts with different CE / MSE token counts (so global ≠ per-pack normalisation), one static shape;
# a noised image follows a ViT image, so the MSE alone trains the ViT too (stage 1 has no CE).
STATIC = dict(pad_to=48, capacities=dict(und=40, gen=8, ce=12, vit=4, vae=8, vae_images=2))


def _packs():
    return [
        [[VitImage((2, 2)), Text([5, 6, 7]), Text([8, 9, 10, 11, 12, 13, 14, 15], loss=True)],
         [Text([16, 17, 18]), VaeImage((2, 3), noised=True, timestep=0.3)]],
        [[VitImage((1, 2)), Text([20, 21], loss=True), VaeImage((2, 2), noised=True, timestep=-0.5)],
         [VaeImage((1, 3)), Text([30, 31, 32], loss=True)]],
    ]


def small_cfg():
    """A 2-layer MoT with ViT, a minimal VAE and the test curriculum (fp32 everywhere)."""
    cfg = ml_collections.ConfigDict()
    cfg.model = small_model_config()
    cur = curriculum_config(steps=STAGE_STEPS)
    cur.lr = tuple(s[0] for s in LR)
    cur.warmup_steps = tuple(s[1] for s in LR)
    cur.schedule = tuple(s[2] for s in LR)
    cur.min_lr = tuple(s[3] for s in LR)
    cur.ce_weight, cur.mse_weight, cur.trainable = CE_W, MSE_W, TRAINABLE
    cfg.curriculum = cur
    cfg.optim = optim_config(weight_decay=WEIGHT_DECAY, ema_decay=EMA_DECAY)
    return cfg


def make_model(cfg):
    """The tiny model with a non-zero llm2vae (zero-initialised by design, which would hide the MSE path)."""
    model = UniMedVL(cfg.model, rngs=nnx.Rngs(0))
    k1, k2 = jax.random.split(jax.random.key(42))
    model.llm2vae.kernel[...] = 0.1 * jax.random.normal(k1, model.llm2vae.kernel.shape)
    model.llm2vae.bias[...] = 0.1 * jax.random.normal(k2, model.llm2vae.bias.shape)
    return model


def make_batch(cfg_model, n_packs):
    """n_packs static-shape packs stacked on a leading axis (alternating the two layouts)."""
    layouts = _packs()
    packs = [build_packed_batch(layouts[i % len(layouts)], cfg_model, rng=i, **STATIC)[0] for i in range(n_packs)]
    return jax.tree.map(lambda *xs: np.stack(xs), *packs)


def expected_lr(step):
    """The joined per-stage schedule written out independently of optax."""
    start = 0
    for s, (steps, (peak, warm, kind, floor)) in enumerate(zip(STAGE_STEPS, LR)):
        if step < start + steps or s == len(STAGE_STEPS) - 1:  # past the end: the last stage's piece
            local = step - start
            if local < warm:
                return peak * local / warm
            if kind == "constant":
                return peak
            decay = max(steps - warm, 1)
            frac = min(local - warm, decay) / decay
            return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))
        start += steps
    raise AssertionError(step)


def expected_stage(step):
    return int(np.searchsorted(np.cumsum(STAGE_STEPS)[:-1], step, side="right"))


def by_path(tree):
    """{dotted parameter path: leaf} of a params-shaped tree."""
    return {param_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat(tree):
    """{dotted parameter path: np.ndarray} of a params-shaped tree."""
    return {p: np.asarray(v) for p, v in by_path(tree).items()}


def adam_state(opt_state):
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1, found
    return found[0]


def views(state):
    """(params, mu, nu, ema) of a TrainState, each as {path: array}, plus the Adam count."""
    adam = adam_state(state.opt_state)
    return dict(params=flat(state.params), mu=flat(adam.mu), nu=flat(adam.nu), ema=flat(state.ema)), int(adam.count)


def group(path):
    return path.split(".")[0]


def to_host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


@pytest.fixture(scope="module")
def run():
    cfg = small_cfg()
    graphdef, params, rest = nnx.split(make_model(cfg), nnx.Param, ...)
    assert {group(p) for p in flat(params)} == set(GROUPS)
    tables = make_tables(cfg, params)
    tx = make_optimizer(cfg, tables)
    step_fn = make_train_step(graphdef, rest, tx, tables, cfg)
    traces = []

    def counted(state, batch, key):
        traces.append(1)  # runs once per trace (= per lowering)
        return step_fn(state, batch, key)

    step = jax.jit(counted)
    batch = make_batch(cfg.model, 2)
    key = jax.random.key(KEY_SEED)
    state = init_train_state(params, tx)
    states, metrics = [to_host(state)], []
    for _ in range(N_STEPS):
        state, m = step(state, batch, key)
        states.append(to_host(state))
        metrics.append({k: np.asarray(v) for k, v in m.items()})
    return types.SimpleNamespace(cfg=cfg, graphdef=graphdef, rest=rest, tables=tables, step=step, batch=batch,
                                 key=key, states=states, metrics=metrics, traces=len(traces),
                                 cache_size=step._cache_size())


def _adam_delta(p, mu, nu, count, lr):
    """The AdamW parameter change reconstructed from the moments after the update (float64)."""
    o = optim_config()
    mu_hat = mu.astype(np.float64) / (1 - o.b1 ** count)
    nu_hat = nu.astype(np.float64) / (1 - o.b2 ** count)
    return -lr * (mu_hat / (np.sqrt(nu_hat) + o.eps) + WEIGHT_DECAY * p.astype(np.float64))


def _check_update_used_lr(before, after, path, lr):
    """after.params[path] - before.params[path] is the AdamW step at learning rate `lr`."""
    (vb, _), (va, count) = views(before), views(after)
    got = va["params"][path].astype(np.float64) - vb["params"][path]
    want = _adam_delta(vb["params"][path], va["mu"][path], va["nu"][path], count, lr)
    scale = np.max(np.abs(want)) + 1e-30
    tol = 1e-3 * scale + 4 * np.finfo(np.float32).eps * np.max(np.abs(vb["params"][path]))
    assert np.max(np.abs(got - want)) <= tol, (path, lr, np.max(np.abs(got - want)), scale)


def test_one_compile_across_stages_with_per_stage_lr_weights_and_groups(run):
    assert run.traces == 1 and run.cache_size == 1, (run.traces, run.cache_size)
    boundaries = set(np.cumsum(STAGE_STEPS)[:-1].tolist())
    lm_path, vit_path = "language_model.model.layers.0.self_attn.q_proj.kernel", \
        "vit_model.vision_model.encoder.layers.0.mlp.fc1.kernel"
    for k, m in enumerate(run.metrics):
        s = expected_stage(k)
        assert int(m["stage"]) == s, (k, m["stage"])
        assert bool(m["finite"])
        # Learning rate: the reported value and the one the optimizer really applied (from the moments).
        np.testing.assert_allclose(float(m["lr"]), expected_lr(k), rtol=1e-6, atol=1e-12, err_msg=f"step {k}")
        path = lm_path if s < 2 else vit_path
        assert path in views(run.states[k])[0]["params"], path
        _check_update_used_lr(run.states[k], run.states[k + 1], path, expected_lr(k))
        # Loss weights: loss = w_ce·ce + w_mse·mse with this stage's weights (and both terms non-trivial).
        assert float(m["ce"]) > 0.1 and float(m["mse"]) > 0.1, m
        np.testing.assert_allclose(float(m["loss"]), CE_W[s] * float(m["ce"]) + MSE_W[s] * float(m["mse"]),
                                   rtol=1e-6, err_msg=f"step {k}")
    # The LR moves at each boundary (the values differ on either side).
    for b in boundaries:
        assert abs(float(run.metrics[b]["lr"]) - float(run.metrics[b - 1]["lr"])) > 1e-5, b
    # Trainable groups: exactly the stage's groups change over the stage.
    start = 0
    for s, steps in enumerate(STAGE_STEPS):
        before, after = views(run.states[start])[0]["params"], views(run.states[start + steps])[0]["params"]
        changed = {group(p) for p in before if not np.array_equal(before[p], after[p])}
        assert changed == TRAINED[s], (s, changed)
        start += steps


def test_frozen_groups_keep_params_moments_and_ema_bit_identical(run):
    start = 0
    for s, steps in enumerate(STAGE_STEPS):
        frozen = set(GROUPS) - TRAINED[s]
        for k in range(start, start + steps):
            (b, cb), (a, ca) = views(run.states[k]), views(run.states[k + 1])
            assert ca == cb + 1  # the step was taken (not skipped)
            for kind in ("params", "mu", "nu", "ema"):
                for path in b[kind]:
                    if group(path) in frozen:
                        assert np.array_equal(b[kind][path], a[kind][path]), (s, k, kind, path)
        # Every trained leaf moves over its stage unless it is zero with zero gradient throughout (weight decay
        # alone moves any non-zero value), and its moments and EMA move with it.
        (b, _), (a, _) = views(run.states[start]), views(run.states[start + steps])
        for path in b["params"]:
            if group(path) not in TRAINED[s]:
                continue
            if not np.array_equal(b["params"][path], a["params"][path]):
                assert not np.array_equal(b["ema"][path], a["ema"][path]), (s, path)
            else:
                assert not np.any(b["params"][path]) and not np.any(a["mu"][path]), (s, path)
        for kind in ("params", "mu", "nu", "ema"):
            moved = {group(p) for p in b[kind] if not np.array_equal(b[kind][p], a[kind][p])}
            assert moved == TRAINED[s], (s, kind, moved)
        start += steps
    # (Above: the ViT / connector / bridges are frozen in stage 0 and move in stage 1; the LLM moves in stages 0-1
    # and is frozen in stage 2.) The VAE is never trained: identical from the first state to the last.
    first, last = views(run.states[0])[0], views(run.states[-1])[0]
    for kind in ("params", "mu", "nu", "ema"):
        assert all(np.array_equal(first[kind][p], last[kind][p]) for p in first[kind] if group(p) == "vae_model")


def test_non_finite_step_is_skipped_and_counted(run):
    poisoned = jax.tree.map(np.copy, run.batch)
    poisoned.vit_patches[0, 0, 0] = np.nan  # one pixel of one real ViT patch
    assert np.isfinite(run.batch.vit_patches).all()
    state = jax.tree.map(jnp.asarray, run.states[0])  # device arrays, as in the recorded run (same jit cache entry)
    initial = views(state)
    for n in (1, 2):
        state, m = run.step(state, poisoned, run.key)
        assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
        assert int(state.step) == n and int(state.skipped) == n and int(state.consecutive_skipped) == n
        got = views(state)
        assert got[1] == initial[1]  # Adam count (bias correction) not advanced
        for kind in ("params", "mu", "nu", "ema"):
            for path, v in initial[0][kind].items():
                assert np.array_equal(v, got[0][kind][path]), (n, kind, path)
    before = to_host(state)
    state, m = run.step(state, run.batch, run.key)
    assert bool(m["finite"]) and np.isfinite(float(m["loss"]))
    assert int(state.step) == 3 and int(state.skipped) == 2 and int(state.consecutive_skipped) == 0
    # The good step updates, at the learning rate of the global step it runs at (step 2: lr 1e-3, not the
    # warmup's 0 at step 0 where the optimizer would be if skipped steps held back its schedule).
    assert int(m["stage"]) == 0
    np.testing.assert_allclose(float(m["lr"]), expected_lr(2), rtol=1e-6)
    _check_update_used_lr(before, state, "language_model.model.layers.0.self_attn.q_proj.kernel", expected_lr(2))
    after = views(state)[0]
    assert any(not np.array_equal(after["params"][p], v) for p, v in initial[0]["params"].items())
    assert run.step._cache_size() == 1  # the poisoned batch did not recompile


def test_loss_is_normalised_over_the_global_batch(run):
    """docs/packed_sequence.md §4.6: ce = Σce·w / N_ce and mse = Σmse / N_mse with sums and counts over both packs,
    recomputed pack by pack with the step's key derivation (fold_in(key, step) → split per pack → (vae, noise))."""
    cfg = run.cfg
    patch_dim = cfg.model.latent_patch_size ** 2 * cfg.model.vae.z_channels

    @jax.jit
    def pack_terms(params, pack, key):
        model = nnx.merge(run.graphdef, params, run.rest)
        k_vae, k_noise = jax.random.split(key)
        latents = model.vae_model.encode(pack.vae_images, key=k_vae)
        noise = jax.random.normal(k_noise, (pack.vae_token_index.shape[0], patch_dim), jnp.float32)
        out = model(pack, latents, noise)
        return jnp.sum(out.ce * pack.ce_weight), jnp.sum(out.ce_mask), jnp.sum(out.mse), jnp.sum(out.mse_mask)

    n_packs = run.batch.text_ids.shape[0]
    for k in (0, 3):  # stage 0 (ce only) and stage 1 (mse only), from the recorded parameters
        keys = jax.random.split(jax.random.fold_in(run.key, k), n_packs)
        terms = np.array([[float(x) for x in pack_terms(run.states[k].params,
                                                        jax.tree.map(lambda a, b=b: a[b], run.batch), keys[b])]
                          for b in range(n_packs)], np.float64)
        ce_sum, n_ce, mse_sum, n_mse = terms.T
        assert len(set(n_ce)) == n_packs and len(set(n_mse)) == n_packs  # packs differ, so normalisation matters
        m = run.metrics[k]
        assert int(m["n_ce"]) == n_ce.sum() and int(m["n_mse"]) == n_mse.sum()
        ce, mse = ce_sum.sum() / n_ce.sum(), mse_sum.sum() / n_mse.sum()
        np.testing.assert_allclose(float(m["ce"]), ce, rtol=1e-5)
        np.testing.assert_allclose(float(m["mse"]), mse, rtol=1e-5)
        s = expected_stage(k)
        np.testing.assert_allclose(float(m["loss"]), CE_W[s] * ce + MSE_W[s] * mse, rtol=1e-5)
        # Per-pack means averaged give a different number, by well over the 1e-5 tolerance above.
        assert abs(np.mean(ce_sum / n_ce) - ce) > 1e-4 * ce and abs(np.mean(mse_sum / n_mse) - mse) > 1e-4 * mse


MESH_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 " + os.environ.get("STEP_TEST_XLA", "")
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    nnx.use_eager_sharding(False)
    sys.path.insert(0, os.path.join(os.getcwd(), "tests", "train"))
    import test_step as T
    from unimedvl_jax.sharding import make_mesh, shard_model, state_shardings
    from unimedvl_jax.train.step import (compile_train_step, init_train_state, make_optimizer, make_tables,
                                         make_train_step, train_state_shardings)

    N_PACKS, N_STEPS = 8, 5
    assert len(jax.devices()) == 8
    cfg = T.small_cfg()
    batch = T.make_batch(cfg.model, N_PACKS)
    key = jax.random.key(T.KEY_SEED)

    def build(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tables = make_tables(cfg, params)
        tx = make_optimizer(cfg, tables)
        return graphdef, params, rest, tables, tx

    graphdef, params, rest, tables, tx = build(T.make_model(cfg))
    step = jax.jit(make_train_step(graphdef, rest, tx, tables, cfg))
    state, ref = init_train_state(params, tx), []
    for _ in range(N_STEPS):
        state, m = step(state, batch, key)
        ref.append(float(m["loss"]))
    print("REF", json.dumps(ref), flush=True)

    Q = "language_model.model.layers.0.self_attn.q_proj.kernel"
    EMB = "language_model.model.embed_tokens.weight"
    DOWN = "language_model.model.layers.1.mlp_moe_gen.down_proj.kernel"
    expect = {
        ((8, 1, 1), "dp"): {Q: P(None, None), EMB: P(None, None)},
        ((2, 4, 1), "fsdp"): {Q: P("fsdp", None), EMB: P("fsdp", None), DOWN: P(None, "fsdp")},
        ((2, 2, 2), "fsdp_tensor"): {Q: P("fsdp", "tensor"), EMB: P("tensor", "fsdp"), DOWN: P("tensor", "fsdp")},
    }
    result = {"ref": ref}
    for (shape, rules), specs in expect.items():
        mesh = make_mesh(shape)
        model = shard_model(T.make_model(cfg), rules, mesh)
        graphdef, params, rest, tables, tx = build(model)
        state = init_train_state(params, tx)
        adam = T.adam_state(state.opt_state)
        # Optimizer moments and EMA created from sharded params are sharded like them (before any step).
        want = {p: v.sharding for p, v in T.by_path(params).items()}
        assert sum(len(w.device_set) > 1 and not w.is_fully_replicated for w in want.values()) > 0 or rules == "dp"
        for name, tree in (("mu", adam.mu), ("nu", adam.nu), ("ema", state.ema)):
            got = T.by_path(tree)
            bad = [p for p in want if got[p].sharding != want[p]]
            assert not bad, (shape, rules, name, [(p, got[p].sharding, want[p]) for p in bad[:3]])
        shardings = train_state_shardings(state, state_shardings(params, rules, mesh), mesh)
        # The fresh state's scalars (step, counters, optimizer counts) sit on one device: place the whole state on
        # its shardings first, or the first call (and only it) hits a second jit cache entry and compiles again.
        state = jax.device_put(state, shardings)
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        assert N_PACKS % dp == 0
        batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
        jstep = compile_train_step(make_train_step(graphdef, rest, tx, tables, cfg), shardings, batch_sharding)
        gbatch = jax.device_put(batch, batch_sharding)
        losses = []
        with jax.set_mesh(mesh):
            for _ in range(N_STEPS):
                state, m = jstep(state, gbatch, key)
                losses.append(float(m["loss"]))
        assert jstep._cache_size() == 1
        adam = T.adam_state(state.opt_state)
        out = {}
        for name, tree in (("params", state.params), ("mu", adam.mu), ("nu", adam.nu), ("ema", state.ema)):
            leaves = T.by_path(tree)
            out[name] = {p: str(leaves[p].sharding.spec) for p in specs}
        result[str((shape, rules))] = {"losses": losses, "specs": out, "want": {p: str(s) for p, s in specs.items()},
                                       "scalars_replicated": all(
                                           leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
                                           for leaf in jax.tree.leaves(state) if leaf.ndim == 0),
                                       "batch_shards": len(gbatch.text_ids.sharding.device_set)}
        print("OK", shape, rules, flush=True)

    # Kernel attention backends (interpret mode here) run per device inside the sharded step (shard_map).
    kernels = {}
    for backend in ("splash", "pallas_gpu"):
        kcfg = T.small_cfg()
        kcfg.model.attention_backend = backend
        mesh = make_mesh((2, 4, 1))
        graphdef, params, rest = nnx.split(shard_model(T.make_model(kcfg), "fsdp", mesh), nnx.Param, ...)
        tables = make_tables(kcfg, params)
        tx = make_optimizer(kcfg, tables)
        shardings = train_state_shardings(init_train_state(params, tx), state_shardings(params, "fsdp", mesh), mesh)
        state = jax.device_put(init_train_state(params, tx), shardings)
        batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
        jstep = compile_train_step(make_train_step(graphdef, rest, tx, tables, kcfg), shardings, batch_sharding)
        losses = []
        for _ in range(N_STEPS):
            state, m = jstep(state, jax.device_put(batch, batch_sharding), key)
            losses.append(float(m["loss"]))
        kernels[backend] = losses
        print("OK", backend, flush=True)
    result["kernels"] = kernels
    print("RESULT", json.dumps(result))
""")


def test_meshes_on_eight_devices_match_one_device():
    """(8,1,1) dp, (2,4,1) fsdp, (2,2,2) fsdp_tensor: per-step losses within 1e-5 relative of one device over 5
    steps (crossing the stage-0 → stage-1 boundary), with params, moments and EMA really sharded by the rules; the
    splash and pallas_gpu kernels (interpret mode) inside the (2,4,1) sharded step give the same losses.
    The subprocess compiles at XLA backend optimisation level 0 (compile time); every run in it uses that level."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               STEP_TEST_XLA="--xla_backend_optimization_level=0")
    res = subprocess.run([sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=1200)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-3000:] + res.stderr[-5000:]
    result = json.loads(lines[-1][len("RESULT "):])
    ref = np.asarray(result.pop("ref"))
    assert len(ref) == 5 and np.all(np.isfinite(ref))
    for backend, losses in result.pop("kernels").items():
        np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=0, err_msg=backend)
    assert len(result) == 3
    for name, r in result.items():
        np.testing.assert_allclose(r["losses"], ref, rtol=1e-5, atol=0, err_msg=name)
        for kind in ("params", "mu", "nu", "ema"):
            assert r["specs"][kind] == r["want"], (name, kind, r["specs"][kind], r["want"])
        assert r["scalars_replicated"], name
        assert r["batch_shards"] == 8, name


def test_gradient_accumulation_matches_one_shot(run):
    """optim.grad_accum_steps=2 over the 2-pack batch: same loss terms and the same update as one shot."""
    import copy

    cfg = copy.deepcopy(run.cfg)
    cfg.optim.grad_accum_steps = 2
    tx = make_optimizer(cfg, run.tables)
    params = jax.tree.map(jnp.asarray, run.states[0].params)
    step = jax.jit(make_train_step(run.graphdef, run.rest, tx, run.tables, cfg))
    state, m = step(init_train_state(params, tx), run.batch, run.key)
    for name in ("loss", "ce", "mse", "grad_norm"):
        np.testing.assert_allclose(np.asarray(m[name]), run.metrics[0][name], rtol=1e-5, err_msg=name)
    got, want = flat(to_host(state.params)), flat(run.states[1].params)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-7, err_msg=path)
    cfg.optim.grad_accum_steps = 3
    bad = jax.jit(make_train_step(run.graphdef, run.rest, make_optimizer(cfg, run.tables), run.tables, cfg))
    with pytest.raises(ValueError, match="not divisible by optim.grad_accum_steps=3"):
        bad(init_train_state(params, tx), run.batch, run.key)


@pytest.mark.parametrize("backend", ["chunked", "blocksparse"])
def test_train_step_loss_and_grads_equal_across_attention_backends(backend):
    """One real train step (VAE encode, ViT, MoT LLM, CE + MSE) gives the dense backend's loss and gradients
    (docs/packed_sequence.md §4.7). Plain SGD with lr 1 makes the parameter update the (masked) gradient itself."""
    results = {}
    for name in ("dense", backend):
        cfg = small_cfg()
        cfg.model.attention_backend = name
        cfg.model.attention_block_size = 16
        graphdef, params, rest = nnx.split(make_model(cfg), nnx.Param, ...)
        tables = make_tables(cfg, params)
        tx = optax.sgd(1.0)
        step = jax.jit(make_train_step(graphdef, rest, tx, tables, cfg))
        state = init_train_state(params, tx).replace(step=jnp.asarray(STAGE_STEPS[0], jnp.int32))  # all-trainable
        new_state, metrics = step(state, make_batch(cfg.model, 2), jax.random.key(KEY_SEED))
        grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params, new_state.params)
        results[name] = float(metrics["loss"]), flat(grads)
    (loss_ref, grads_ref), (loss, grads) = results["dense"], results[backend]
    assert loss == pytest.approx(loss_ref, abs=1e-5)
    moved = [p for p, g in grads_ref.items() if np.abs(g).max() > 0]
    assert {group(p) for p in moved} >= {"language_model", "vit_model", "connector", "vae2llm", "llm2vae"}
    for path, g_ref in grads_ref.items():
        np.testing.assert_allclose(grads[path], g_ref, atol=1e-5, rtol=0, err_msg=path)


def test_adam_first_moment_in_bf16(run):
    """optim.mu_dtype='bfloat16': Adam's mu leaves are bf16 (nu and params fp32) before and after steps, and the
    steps follow the fp32-moment trajectory within bf16 precision of the first moment."""
    import copy

    cfg = copy.deepcopy(run.cfg)
    cfg.optim.mu_dtype = "bfloat16"
    tx = make_optimizer(cfg, run.tables)
    state = init_train_state(jax.tree.map(jnp.asarray, run.states[0].params), tx)
    step = jax.jit(make_train_step(run.graphdef, run.rest, tx, run.tables, cfg))
    for k in range(2):
        adam = adam_state(state.opt_state)
        assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
        assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
        state, m = step(state, run.batch, run.key)
        assert bool(m["finite"])
        np.testing.assert_allclose(float(m["loss"]), run.metrics[k]["loss"], rtol=1e-2 if k else 1e-6)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(adam_state(state.opt_state).mu)} == {jnp.dtype(jnp.bfloat16)}
    got, want, start = flat(to_host(state.params)), flat(run.states[2].params), flat(run.states[0].params)
    moved = [p for p in want if np.abs(want[p] - start[p]).max() > 0]
    assert len(moved) > 20
    for path in moved:
        step_size = np.abs(want[path] - start[path]).max()
        assert np.abs(got[path] - want[path]).max() <= 0.05 * step_size, path
