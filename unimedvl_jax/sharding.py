"""Device mesh and the logical-axis → mesh-axis rules tables (docs/architecture.md "Sharding is a table").

Every parameter carries logical axis names (models/layers.annotated_param). A rules table maps each logical name
to a mesh axis (or None = replicated along that dim). `partition_spec` resolves one parameter: a mesh axis is used
at most once per parameter (first dim wins) and only where it divides the dimension — otherwise that dim stays
replicated, so every table works for every shape (tiny configs included).

Activations carry logical names too (the `act_*` names below), in the same tables: the model calls
`constrain(x, axes)` at layer boundaries, which is jax.lax.with_sharding_constraint to the spec the active table
resolves, or nothing when no table is active (`activation_rules`) or no mesh is set. A name a table leaves out is
replicated. The pack (batch) axis has no logical name: the train step vmaps the model over packs with
spmd_axis_name=BATCH_AXES, which prepends the batch axes to every constraint inside, so inside the model an
activation is (length, ...) and the batch axes are kept out of its spec.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names of activations (inside one pack, see the module docstring):
#   act_length        token axis of the residual stream (LLM and ViT layer inputs/outputs, expert token buffers);
#                     mapping it to a mesh axis is sequence parallelism
#   act_block_length  token axis inside attention and MLP blocks (q / k / v) and of the CE logits
#   act_embed         hidden (model) dimension of the residual stream
#   act_heads         query / ViT attention heads;  act_kv_heads  key / value heads (GQA)
#   act_mlp           MLP hidden dimension;  act_vocab  vocabulary of the logits
# Megatron-style tensor parallelism of the activations: heads, MLP hidden and vocab over tensor.
RESIDUAL = ("act_length", "act_embed")  # the residual stream (tokens, hidden) of the LLM and the ViT
TENSOR_ACTIVATIONS = {"act_heads": "tensor", "act_kv_heads": "tensor", "act_mlp": "tensor", "act_vocab": "tensor"}

# The rules tables: logical name (of a parameter or an activation) → mesh axis; names left out are replicated.
RULES = {
    # Pure data parallelism: every parameter replicated, activations split over the batch only.
    "dp": {},
    # ZeRO-3 style: shard the model (hidden) dimension of every matrix and table over fsdp; activations split over
    # the batch only (never along embed).
    "fsdp": {"embed": "fsdp", "vit_embed": "fsdp", "embed_in": "fsdp", "vocab": "fsdp", "vae_in": "fsdp"},
    # FSDP on the hidden dimension + Megatron-style tensor parallelism on heads / MLP / vocab, parameters and
    # activations (length and embed of the residual stream replicated over tensor).
    "fsdp_tensor": {"embed": "fsdp", "vit_embed": "fsdp", "embed_in": "fsdp", "vae_in": "fsdp",
                    "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
                    "vit_heads": "tensor", "vit_mlp": "tensor", **TENSOR_ACTIVATIONS},
}
# fsdp_tensor + sequence parallelism: the residual stream (and the norms on it) split along tokens over tensor
# between the tensor-parallel attention / MLP blocks (Megatron-SP).
RULES["fsdp_tensor_sp"] = {**RULES["fsdp_tensor"], "act_length": "tensor"}


BATCH_AXES = ("data", "fsdp")  # mesh axes the global batch (packs) is split over


def make_mesh(shape, devices=None, *, dcn_shape=None) -> Mesh:
    """Mesh over (data, fsdp, tensor); one entry may be -1 (= the remaining devices). Axis types are Auto.

    `dcn_shape` (multi-slice TPU, or multi-host GPU where processes stand for slices): how many slices each axis
    spans; the per-slice (ICI) shape is shape / dcn_shape, and devices are laid out by
    mesh_utils.create_hybrid_device_mesh so that only the dcn axes cross slices (e.g. data parallelism over DCN,
    fsdp / tensor inside a slice). Devices without a `slice_index` use their process as the slice."""
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    devices = list(devices if devices is not None else jax.devices())
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape}: {len(devices)} devices not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}")
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    dcn = [1] * len(MESH_AXES) if dcn_shape is None else [int(d) for d in dcn_shape]
    if math.prod(dcn) == 1:
        return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(hybrid_device_grid(shape, dcn, devices), MESH_AXES, axis_types=axis_types)


def hybrid_device_grid(shape, dcn_shape, devices):
    """Device array of `shape` whose `dcn_shape` outer blocks are whole slices (see make_mesh)."""
    if len(dcn_shape) != len(MESH_AXES) or any(d < 1 or s % d for s, d in zip(shape, dcn_shape)):
        raise ValueError(f"mesh.dcn_shape {tuple(dcn_shape)} must divide mesh.shape {tuple(shape)} axis by axis")
    ici = [s // d for s, d in zip(shape, dcn_shape)]
    # compile-only GPU devices all say slice 0: slices are then the processes (hosts)
    by_slice = len({getattr(d, "slice_index", None) for d in devices} - {None}) > 1
    granules = len({(d.slice_index if by_slice else d.process_index) for d in devices})
    if granules != math.prod(dcn_shape):
        raise ValueError(f"mesh.dcn_shape {tuple(dcn_shape)} needs {math.prod(dcn_shape)} "
                         f"{'slices' if by_slice else 'processes (these devices share one slice_index)'}, "
                         f"have {granules}")
    return mesh_utils.create_hybrid_device_mesh(ici, dcn_shape, devices, process_is_granule=not by_slice)


def rules_table(name_or_table) -> dict:
    """A rules table by name ('dp', 'fsdp', 'fsdp_tensor') or given as a mapping."""
    if isinstance(name_or_table, str):
        if name_or_table not in RULES:
            raise ValueError(f"unknown sharding rules {name_or_table!r}; choose from {sorted(RULES)}")
        return RULES[name_or_table]
    return dict(name_or_table)


def partition_spec(axes, shape, rules, mesh, reserved=()) -> PartitionSpec:
    """The PartitionSpec of one parameter (or activation) with logical `axes` and `shape` under `rules` on `mesh`
    (a Mesh or AbstractMesh); mesh axes in `reserved` (already used by an enclosing vmap) are never used."""
    spec, used = [], set(reserved)
    for name, dim in zip(axes, shape):
        axis = rules.get(name)
        if axis is None or axis in used or dim % mesh.shape[axis]:
            spec.append(None)
            continue
        spec.append(axis)
        used.add(axis)
    return PartitionSpec(*spec)


_ACTIVE_RULES = contextvars.ContextVar("activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(rules, *, batch_axes=()):
    """Inside this context (at trace time) `constrain` resolves activation specs with `rules` (a table or its name;
    None = constraints off). `batch_axes`: mesh axes an enclosing vmap's spmd_axis_name already splits the batch
    over (the train step passes BATCH_AXES); they are kept out of every activation spec, since with_sharding_constraint
    rejects a spec that names them again."""
    token = _ACTIVE_RULES.set(None if rules is None else (rules_table(rules), tuple(batch_axes)))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def constrain(x, logical_axes):
    """with_sharding_constraint of activation `x` to the spec of its `logical_axes` (one per dim, None = no name)
    under the active rules and the current (abstract) mesh; a no-op without either. The values never change."""
    active = _ACTIVE_RULES.get()
    if active is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rules, batch_axes = active
    return jax.lax.with_sharding_constraint(x, partition_spec(logical_axes, x.shape, rules, mesh, batch_axes))


def constrain_state(state: nnx.State, rules):
    """with_sharding_constraint of every variable of `state` to its parameter sharding under `rules` on the current
    (abstract) mesh (e.g. parameters cast to a compute dtype inside the step keep the master copy's sharding, so FSDP
    gathers the cast values); a no-op without a mesh or with rules None."""
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return state
    rules = rules_table(rules)

    def one(var):
        value = var.get_value()
        axes = var.get_metadata().get("out_sharding") or (None,) * len(value.shape)
        return var.replace(jax.lax.with_sharding_constraint(value, partition_spec(axes, value.shape, rules, mesh)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, rules, mesh: Mesh):
    """NamedShardings for every variable of an (abstract or concrete) nnx.State, from its logical axes."""
    rules = rules_table(rules)

    def one(var):
        value = var.get_value()
        axes = var.get_metadata().get("out_sharding") or (None,) * len(value.shape)
        return var.replace(NamedSharding(mesh, partition_spec(axes, value.shape, rules, mesh)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model, rules, mesh: Mesh):
    """Place every variable of `model` on its sharding (one tensor at a time) and return the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, rules, mesh)
    placed = jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s.get_value())), state, shardings,
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, placed)
    return model


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a (batch, ...) input: the batch axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def trace_platform() -> str:
    """The platform the computation being traced is for: that of the devices of the active mesh context (the train
    step traces inside its mesh, which for `unimedvl-compile` holds compile-only TPU / GPU devices of a machine
    whose own backend is the CPU), else jax.default_backend(). 'gpu' for CUDA / ROCm devices."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform
