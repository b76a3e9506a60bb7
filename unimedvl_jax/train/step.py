"""One jitted train step with the curriculum inside it (docs/architecture.md "Curriculum is data").

stage = searchsorted(boundaries, step, 'right') is computed in the step; per-stage values (loss weights,
trainable masks) are arrays indexed by it; the learning rate is optax.join_schedules of per-stage pieces. So a run
through every stage compiles the step once. A frozen group keeps its parameters, both Adam moments and its EMA
bit-identical while frozen (weight decay included: the update is discarded, not scaled). A non-finite step is
skipped (state kept, counted); the optimizer's LR-schedule count is pinned to the global step, so skipped steps do
not delay the learning rate relative to the stage.

Global batch = B packs, each a static-shape PackedBatch (leading axis B). Per docs/packed_sequence.md §4.6 the loss is
  ce_weight[stage] · Σce / N_ce + mse_weight[stage] · Σmse / N_mse
with the counts taken over the whole global batch (all micro-batches when accumulating).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from unimedvl_jax.curriculum import StageSchedule
from unimedvl_jax.models.unimedvl import loss_counts, packed_loss
from unimedvl_jax.packed_batch import PackedBatch
from unimedvl_jax.sharding import BATCH_AXES, activation_rules, constrain_state


@struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; checkpointed as one item)."""

    step: jax.Array
    params: nnx.State
    opt_state: Any
    ema: nnx.State
    skipped: jax.Array               # total non-finite steps skipped
    consecutive_skipped: jax.Array   # non-finite steps in a row (reset by a good step)


@dataclasses.dataclass(frozen=True)
class TrainTables:
    """Per-stage tables and static pieces shared by init and the step."""

    boundaries: np.ndarray   # (S-1,) first step of stages 1..S-1
    ce_weight: np.ndarray    # (S,)
    mse_weight: np.ndarray   # (S,)
    trainable: Any           # params-shaped pytree of (S,) bool arrays
    lr: Any                  # optax schedule over the global step


def param_path(path) -> str:
    """'a.b.0.c' from a jax key path into an nnx.State of Variables."""
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        if name != "value":
            parts.append(str(name))
    return ".".join(parts)


def stage_lr_schedule(cur, schedule: StageSchedule):
    """optax.join_schedules of one piece per stage: linear warmup then constant or cosine to min_lr."""
    pieces = []
    for s, steps in enumerate(schedule.steps):
        peak, warm, kind, floor = float(cur.lr[s]), int(cur.warmup_steps[s]), cur.schedule[s], float(cur.min_lr[s])
        if kind == "constant":
            body = optax.constant_schedule(peak)
        elif kind == "cosine":
            body = optax.cosine_decay_schedule(peak, max(steps - warm, 1), alpha=floor / peak if peak else 0.0)
        else:
            raise ValueError(f"curriculum.schedule[{s}]={kind!r} not in ('constant', 'cosine')")
        pieces.append(optax.join_schedules([optax.linear_schedule(0.0, peak, warm), body], [warm]) if warm
                      else body)
    return optax.join_schedules(pieces, [int(b) for b in schedule.boundaries[:-1]])


def make_tables(cfg, params: nnx.State) -> TrainTables:
    """Per-stage loss weights, trainable masks and the LR schedule from cfg.curriculum."""
    cur = cfg.curriculum
    schedule = StageSchedule.from_config(cur)
    n = len(schedule.steps)
    for field in ("lr", "warmup_steps", "schedule", "min_lr", "ce_weight", "mse_weight", "trainable"):
        if len(tuple(cur[field])) != n:
            raise ValueError(f"curriculum.{field} has {len(tuple(cur[field]))} entries for {n} stages")
    patterns = [re.compile(p) for p in cur.trainable]
    trainable = jax.tree_util.tree_map_with_path(
        lambda path, _: np.array([bool(p.search(param_path(path))) for p in patterns]), params)
    if not any(bool(m.any()) for m in jax.tree.leaves(trainable)):
        raise ValueError(f"curriculum.trainable {tuple(cur.trainable)} matches no parameter")
    return TrainTables(boundaries=np.asarray(schedule.boundaries[:-1], np.int32),
                       ce_weight=np.asarray(cur.ce_weight, np.float32),
                       mse_weight=np.asarray(cur.mse_weight, np.float32),
                       trainable=trainable, lr=stage_lr_schedule(cur, schedule))


def make_optimizer(cfg, tables: TrainTables) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the joined per-stage LR schedule (docs/training.md §7.2 defaults in
    cfg.optim; Adam's first moment in optim.mu_dtype when set)."""
    o = cfg.optim
    mu_dtype = o.get("mu_dtype") or None
    return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                       optax.adamw(tables.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                   mu_dtype=None if mu_dtype is None else jnp.dtype(mu_dtype)))


def init_train_state(params: nnx.State, tx) -> TrainState:
    """TrainState for `params` (e.g. nnx.split(model, nnx.Param, ...)[1]); EMA starts as a copy of them."""
    ema = jax.tree.map(jnp.copy, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=ema,
                      skipped=jnp.zeros((), jnp.int32), consecutive_skipped=jnp.zeros((), jnp.int32))


def _params_like(params_treedef):
    """Predicate: is a subtree shaped like the parameters (an optimizer moment such as Adam's mu / nu)?"""
    def is_params_like(x):
        try:
            return jax.tree.structure(x) == params_treedef
        except TypeError:
            return False

    return is_params_like


def train_state_shardings(abstract_state: TrainState, param_shardings, mesh):
    """Shardings of a TrainState: params and EMA from the rules, optimizer moments mirror the params,
    scalars (step, counters, Adam count) replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    is_params_like = _params_like(jax.tree.structure(abstract_state.params))
    opt = jax.tree.map(lambda x: param_shardings if is_params_like(x) else jax.tree.map(lambda _: replicated, x),
                       abstract_state.opt_state, is_leaf=is_params_like)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt, ema=param_shardings,
                      skipped=replicated, consecutive_skipped=replicated)


def compile_train_step(step_fn, state_shardings, batch_sharding):
    """jax.jit of the step with in/out shardings (pjit semantics) and the old state donated; traced inside the mesh
    context so that kernel attention backends run per device (docs/packed_sequence.md §4.7)."""
    mesh = batch_sharding.mesh

    def step_on_mesh(state, batch, key):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step_fn(state, batch, key)

    return jax.jit(step_on_mesh, in_shardings=(state_shardings, batch_sharding, None),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def _select_params_like(keep_new, new, old, params_treedef):
    """where(keep_new, new, old) on every params-shaped subtree of an optimizer state (mu, nu, ...)."""
    is_params_like = _params_like(params_treedef)

    def pick(n, o):
        if is_params_like(n):
            return jax.tree.map(lambda m, a, b: jnp.where(m, a, b), keep_new, n, o)
        return n

    return jax.tree.map(pick, new, old, is_leaf=is_params_like)


def _with_schedule_count(opt_state, count):
    """opt_state with every LR-schedule count set to `count`: the learning rate follows the global step (skipped
    steps included), like the stage, the loss weights and the reported lr. The Adam count (bias correction) still
    counts only the steps taken."""
    def is_sched(x):
        return isinstance(x, optax.ScaleByScheduleState)

    return jax.tree.map(lambda s: s._replace(count=jnp.asarray(count, s.count.dtype)) if is_sched(s) else s,
                        opt_state, is_leaf=is_sched)


def compute_weights(params: nnx.State, dtype, rules=None) -> nnx.State:
    """The float parameters cast to `dtype` (None = unchanged), each constrained to its master copy's sharding
    under `rules` (so FSDP all-gathers move `dtype`); other leaves untouched. Differentiable: gradients come back in
    the master dtype."""
    if dtype is None:
        return params
    cast = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
    return constrain_state(cast, rules)


def make_train_step(graphdef, rest_state, tx, tables: TrainTables, cfg):
    """The pure step function (state, batch, key) -> (state, metrics); jit it with shardings and donation.

    With a `mesh` section, the model's activation constraints use the mesh.rules table (off with
    mesh.constrain_activations=False); optim.compute_weights_dtype runs the forward/backward on parameters cast to
    that dtype while the state keeps (and updates) the master copy."""
    ema_decay = float(cfg.optim.ema_decay)
    accum = int(cfg.optim.get("grad_accum_steps", 1))
    mesh_cfg = cfg.get("mesh")
    rules = None if mesh_cfg is None else mesh_cfg.rules
    act_rules = rules if mesh_cfg is not None and mesh_cfg.get("constrain_activations", True) else None
    weights_dtype = cfg.optim.get("compute_weights_dtype") or None
    weights_dtype = None if weights_dtype is None else jnp.dtype(weights_dtype)
    boundaries = jnp.asarray(tables.boundaries)
    ce_w, mse_w = jnp.asarray(tables.ce_weight), jnp.asarray(tables.mse_weight)
    patch_dim = cfg.model.latent_patch_size ** 2 * cfg.model.vae.z_channels

    def pack_loss(params, pack: PackedBatch, key, stage, counts):
        """One pack's share of the global-batch loss (packed_loss normalised by the global counts)."""
        model = nnx.merge(graphdef, params, rest_state)
        k_vae, k_noise = jax.random.split(key)
        # Frozen VAE: latents of the zero-padded images with a posterior sample (docs/model.md §3.10,
        # docs/quirks.md §9.1, docs/quirks.md §9.2).
        latents = jax.lax.stop_gradient(model.vae_model.encode(pack.vae_images, key=k_vae))
        noise = jax.random.normal(k_noise, (pack.vae_token_index.shape[0], patch_dim), jnp.float32)
        loss, terms = packed_loss(model(pack, latents, noise), pack.ce_weight, counts=counts,
                                  ce_loss_weight=ce_w[stage], mse_loss_weight=mse_w[stage])
        return loss, (terms["ce"], terms["mse"])

    def loss_fn(params, batch: PackedBatch, keys, stage, counts):
        """This (micro-)batch's share of the docs/packed_sequence.md §4.6 loss: the sum of its packs' shares."""
        # Under a mesh the pack axis is split over the batch axes, also inside per-device kernels (shard_map) and
        # in every activation constraint (sharding.constrain) inside the model.
        spmd = None if jax.sharding.get_abstract_mesh().empty else BATCH_AXES
        params = compute_weights(params, weights_dtype, rules)
        with activation_rules(act_rules, batch_axes=spmd or ()):
            loss, (ce, mse) = jax.vmap(pack_loss, in_axes=(None, 0, 0, None, None), spmd_axis_name=spmd)(
                params, batch, keys, stage, counts)
        return jnp.sum(loss), (jnp.sum(ce), jnp.sum(mse))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def loss_and_grads(params, batch: PackedBatch, key, stage, counts):
        """Loss terms and gradients of the global batch, in `accum` sequential micro-batches if configured.

        Each micro-batch is normalised by the global counts, so the accumulated sums equal the one-shot values."""
        num_packs = batch.text_ids.shape[0]
        keys = jax.random.split(key, num_packs)
        if accum == 1:
            return grad_fn(params, batch, keys, stage, counts)
        if num_packs % accum:
            raise ValueError(f"{num_packs} packs per batch not divisible by optim.grad_accum_steps={accum}")
        split = lambda x: x.reshape((accum, num_packs // accum) + x.shape[1:])  # noqa: E731

        def micro_step(carry, xs):
            (loss, (ce, mse)), grads = grad_fn(params, xs[0], xs[1], stage, counts)
            return jax.tree.map(jnp.add, carry, ((loss, (ce, mse)), grads)), None

        zero = ((jnp.zeros(()), (jnp.zeros(()), jnp.zeros(()))), jax.tree.map(jnp.zeros_like, params))
        total, _ = jax.lax.scan(micro_step, zero, (jax.tree.map(split, batch), split(keys)))
        return total

    def step_fn(state: TrainState, batch: PackedBatch, key):
        stage = jnp.searchsorted(boundaries, state.step, side="right")
        key = jax.random.fold_in(key, state.step)
        counts = loss_counts(batch)
        (loss, (ce, mse)), grads = loss_and_grads(state.params, batch, key, stage, counts)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        mask = jax.tree.map(lambda m: jnp.asarray(m)[stage], tables.trainable)
        grads = jax.tree.map(lambda g, m: jnp.where(m & finite, g, jnp.zeros_like(g)), grads, mask)
        grad_norm = optax.tree.norm(grads)  # of the trainable parameters, before clipping
        updates, opt_state = tx.update(grads, _with_schedule_count(state.opt_state, state.step), state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = jax.tree.map(lambda m: m & finite, mask)
        params = jax.tree.map(lambda m, a, b: jnp.where(m, a, b), keep, new_params, state.params)
        treedef = jax.tree.structure(state.params)
        opt_state = _select_params_like(keep, opt_state, state.opt_state, treedef)
        opt_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), opt_state, state.opt_state)
        opt_state = _with_schedule_count(opt_state, state.step + 1)
        ema = jax.tree.map(lambda m, e, p: jnp.where(m, ema_decay * e + (1 - ema_decay) * p, e), keep, state.ema,
                           params)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                               skipped=state.skipped + (~finite).astype(jnp.int32),
                               consecutive_skipped=jnp.where(finite, 0, state.consecutive_skipped + 1))
        metrics = {"loss": loss, "ce": ce, "mse": mse, "grad_norm": grad_norm, "lr": tables.lr(state.step),
                   "stage": stage, "finite": finite, "n_ce": counts[0], "n_mse": counts[1]}
        return new_state, metrics

    return step_fn
