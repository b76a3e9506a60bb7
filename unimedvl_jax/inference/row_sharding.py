"""The rows of a batched text decode spread over this process's devices (docs/evaluation.md "Batching, sharding,
resuming").

Row r of a batch of R rows lives on device r // (R / D) (contiguous blocks, the layout of NamedSharding over a
1-D mesh). Prefill of row r runs on that device, on a per-device view of the replicated parameters, so the
prefills of different devices overlap (JAX dispatches asynchronously); the decode step runs SPMD over the rows
with the parameters replicated. Rows are independent (a vmapped step over per-row caches), so the split needs no
communication between devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ROW_AXIS = "rows"


@dataclasses.dataclass(frozen=True, eq=False)
class RowSharding:
    """Rows split over `devices`: `model` has its parameters replicated over them (the decode step),
    `device_models[i]` is the same parameters as a model on devices[i] alone (prefill; views of the replicated
    buffers, no extra memory)."""

    devices: tuple
    sharding: NamedSharding
    model: object
    device_models: tuple

    @classmethod
    def over(cls, model, devices=None) -> RowSharding:
        """Replicate `model`'s state over `devices` (default: this process's local devices)."""
        devices = tuple(jax.local_devices() if devices is None else devices)
        if not devices:
            raise ValueError("RowSharding.over: no devices given")
        mesh = Mesh(np.asarray(devices, dtype=object), (ROW_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
        graphdef, state = nnx.split(model)
        replicated = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))

        def on(device):
            return jax.tree.map(lambda a: next(s.data for s in a.addressable_shards if s.device == device),
                                replicated)

        return cls(devices, NamedSharding(mesh, PartitionSpec(ROW_AXIS)), nnx.merge(graphdef, replicated),
                   tuple(nnx.merge(graphdef, on(d)) for d in devices))

    def rows(self, n: int) -> int:
        """The smallest row count ≥ n that the devices divide."""
        d = len(self.devices)
        return -(-n // d) * d

    def device_index(self, row: int, rows: int) -> int:
        """Index of the device holding `row` of a batch of `rows` rows."""
        if rows % len(self.devices):
            raise ValueError(f"{rows} rows do not split over {len(self.devices)} devices")
        return row // (rows // len(self.devices))

    def model_for_row(self, row: int, rows: int):
        """The per-device model that prefills `row`."""
        return self.device_models[self.device_index(row, rows)]

    def stack(self, trees) -> object:
        """Stack per-row pytrees (one per row, e.g. KV caches) on a leading row axis, split over the devices; each
        row is moved to its device first (a no-op when it was prefilled there)."""
        trees = list(trees)
        rows = len(trees)
        per_device = rows // len(self.devices)
        if rows % len(self.devices):
            raise ValueError(f"{rows} rows do not split over {len(self.devices)} devices")
        blocks = []
        for i, device in enumerate(self.devices):
            block = [jax.device_put(t, device) for t in trees[i * per_device:(i + 1) * per_device]]
            blocks.append(jax.tree.map(lambda *leaves: jnp.stack(leaves), *block))
        leaves_per_block = [jax.tree.flatten(b) for b in blocks]
        treedef = leaves_per_block[0][1]
        stacked = [jax.make_array_from_single_device_arrays((rows, *parts[0].shape[1:]), self.sharding, list(parts))
                   for parts in zip(*(leaves for leaves, _ in leaves_per_block))]
        return jax.tree.unflatten(treedef, stacked)

    def put(self, array) -> jax.Array:
        """A host array with a leading row axis, split over the devices."""
        return jax.device_put(np.asarray(array), self.sharding)
