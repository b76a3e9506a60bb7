"""A stack of identical layers, run as a Python loop over separate modules or as one scanned body over stacked
parameters (docs/memory.md "Scanned layers").

Loop form: `nnx.List` of layers, parameter paths `layers.<i>.<...>` — XLA compiles one copy of the layer per
layer. Scanned form: one module whose every variable has a leading layer axis (logical axis name `layers`,
replicated by every rules table), parameter paths `layers.<...>`; `jax.lax.scan` runs one compiled body L times.
Both forms are built from the same per-layer modules (so the same seed gives the same weights), run the same body
function under the same remat policy, and give the same numbers. The interop name map splits the layer axis back
into the official per-layer keys (interop/name_map.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unimedvl_jax.models.remat import remat

LAYER_AXIS = "layers"


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def stack_layers(layers) -> nnx.Module:
    """One module whose variables are those of `layers` stacked on a new leading `layers` axis."""
    graphdef, first = nnx.split(layers[0])
    states = [first] + [nnx.split(layer)[1] for layer in layers[1:]]

    def stack(*variables):
        values = jnp.stack([v.get_value() for v in variables])
        axes = variables[0].get_metadata().get("out_sharding")
        metadata = {} if axes is None else {"out_sharding": (LAYER_AXIS, *axes)}
        return variables[0].replace(values, **metadata)

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=_is_variable))


def is_stacked(layers) -> bool:
    """Whether `layers` is the scanned form (one module) rather than a list of modules."""
    return isinstance(layers, nnx.Module) and not isinstance(layers, nnx.List)


def num_layers(layers) -> int:
    """Number of layers of either form."""
    if not is_stacked(layers):
        return len(layers)
    return jax.tree.leaves(nnx.state(layers))[0].shape[0]


def _pure(module):
    """(graphdef, state of plain arrays) of a module."""
    graphdef, state = nnx.split(module)
    return graphdef, jax.tree.map(lambda v: v.get_value(), state, is_leaf=_is_variable)


def _layer_inputs(per_layer, i):
    if per_layer is None:
        return None
    if isinstance(per_layer, list):
        return per_layer[i]
    return jax.tree.map(lambda a: a[i], per_layer)


def apply_layers(layers, body, x, per_layer=None, *, remat_policy: str = "none"):
    """Run every layer on the carried activation: `x, y = body(layer, x, per_layer_i)` for each layer in order.

    `per_layer`: None, a list with one pytree per layer, or a pytree whose leaves have a leading layer axis.
    Returns (x, [y of each layer]). The body runs under jax.checkpoint with the named policy (models/remat.py).
    """
    stacked = is_stacked(layers)
    graphdef, _ = nnx.split(layers if stacked else layers[0])

    def run(state, carry, layer_inputs):
        return body(nnx.merge(graphdef, state), carry, layer_inputs)

    # Inside a scan, CSE across the forward and the recomputation is impossible anyway (prevent_cse off).
    run = remat(run, remat_policy, prevent_cse=not stacked)
    if not stacked:
        ys = []
        for i, layer in enumerate(layers):
            x, y = run(_pure(layer)[1], x, _layer_inputs(per_layer, i))
            ys.append(y)
        return x, ys
    if isinstance(per_layer, list):
        per_layer = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)
    x, ys = jax.lax.scan(lambda carry, xs: run(xs[0], carry, xs[1]), x, (_pure(layers)[1], per_layer))
    return x, [jax.tree.map(lambda a, i=i: a[i], ys) for i in range(num_layers(layers))]
