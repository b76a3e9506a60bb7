"""Ahead-of-time compilation of the trainer's step for a target topology, on a machine without it (docs/compile.md).

`compile_report(cfg, target)` builds what the trainer builds (train/loop.py: the mesh of cfg.mesh, the logical rules,
the TrainState layout and its shardings, the jitted step of `compiled_train_step`) for the target's devices, with no
parameter allocated (`build_model_and_state(..., abstract=True)`), feeds it an abstract global batch of
train.batch_packs packs of the config's static pack shapes, and lowers and compiles it. The report holds:

  per_device   memory_analysis() of one device: argument / output / alias / temp / generated-code bytes and
               total_bytes = argument + output - alias + temp + generated_code (donated state buffers are counted
               once), hbm_bytes of the chip, headroom_bytes = hbm_bytes - total_bytes, and fits = total_bytes <=
               hbm_fraction * hbm_bytes
  flops        compiled FLOPs per device and step (hlo_stats.hlo_flops: the optimized HLO's dots and convolutions, loops
               times their trip count; XLA's cost_analysis beside it, which counts a loop body once and on GPU gives
               nothing) next to the trainer's FlopModel (train/metrics.py) for the static pack shapes
  collectives  all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute ops of the optimized HLO
               (hlo_stats.hlo_collectives)
  compile_s    trace + lower, and XLA compile seconds

Targets (TARGETS): Cloud TPU slices compiled through libtpu's compile-only client
(jax.experimental.topologies.get_topology_desc), NVIDIA GPU hosts through jaxlib's deviceless CUDA client with a
GpuTargetConfigProto from gpu_targets/ (needs the jax-cuda plugin installed), or `local` (this machine's devices).
The process must run with JAX_PLATFORMS=cpu for a TPU or GPU target, set before jax is imported (compile_cli.py
TARGET_ENV).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re
import time

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines.packing import Packer, assemble_pack
from unimedvl_jax.config import remat_policy
from unimedvl_jax.hlo_stats import hlo_collectives, hlo_flops, kernel_calls, parse_oom
from unimedvl_jax.models.attention import resolve_backend
from unimedvl_jax.packed_batch import PackedBatch
from unimedvl_jax.train import checkpointing
from unimedvl_jax.train.loop import build_model_and_state, compiled_train_step, new_run, train_mesh
from unimedvl_jax.train.metrics import peak_tflops

GIB = 2 ** 30

# HBM per device (bytes) by target family. v5p: 95.74 GiB = the limit XLA:TPU checks against ("exceeds available
# HBM (95.74G)" in its RESOURCE_EXHAUSTED message, libtpu 0.0.42; Cloud TPU docs list 95 GiB per chip). v6e:
# 31.25 GiB, the same message for a v6e target (docs: 32 GiB per chip). GPUs: device_memory_size of the XLA target
# description (gpu_targets/*.txtpb, from openxla/xla's specs): H100 SXM 84,942,979,072 B (79.1 GiB of the 80 GB),
# H200 151,397,597,184 B (141 GiB).
TPU_HBM_BYTES = {"v5p": int(95.74 * GIB), "v6e": int(31.25 * GIB)}


@dataclasses.dataclass(frozen=True)
class Target:
    """A named compile target: `platform` tpu (libtpu topology_name, chip config, host bounds, wraparound), cuda
    (gpu_spec file, topology '<partitions>x<hosts>x<gpus per host>') or local."""

    name: str
    platform: str
    topology: str = ""
    chip_config: str = ""
    chips_per_host: tuple = ()
    wrap: tuple = ()
    gpu_spec: str = ""

    @property
    def family(self) -> str:
        return self.name.split("-")[0] if self.platform == "tpu" else self.gpu_spec


def _tpu_targets() -> dict[str, Target]:
    """v5p-N (N/2 chips of 2 TensorCores as one megacore device; 3-D torus, wraparound on whole 4-cubes) and
    v6e-N (N chips of one core; 2-D, 8 chips on a v6e-8 host, 4 on the hosts of larger slices)."""
    out = {}
    for cores, dims in ((8, (2, 2, 1)), (16, (2, 2, 2)), (32, (2, 2, 4)), (64, (2, 4, 4)), (128, (4, 4, 4)),
                        (256, (4, 4, 8))):
        out[f"v5p-{cores}"] = Target(f"v5p-{cores}", "tpu", "v5:" + "x".join(map(str, dims)), "megacore", (2, 2, 1),
                                     tuple(min(dims) >= 4 for _ in dims))
    for chips, dims in ((8, (2, 4)), (16, (4, 4)), (32, (4, 8)), (64, (8, 8)), (128, (8, 16)), (256, (16, 16))):
        out[f"v6e-{chips}"] = Target(f"v6e-{chips}", "tpu", "v6e:" + "x".join(map(str, dims)), "default",
                                     (2, 4, 1) if chips == 8 else (2, 2, 1),
                                     (chips == 256, chips == 256, False))
    return out


def _gpu_targets() -> dict[str, Target]:
    """One H100 / H200, an 8-GPU host, and N such hosts (one NVLink domain each: N partitions of 1 host × 8)."""
    out = {}
    for gpu in ("h100", "h200"):
        out[f"1x{gpu}"] = Target(f"1x{gpu}", "cuda", "1x1x1", gpu_spec=gpu)
        out[f"8x{gpu}"] = Target(f"8x{gpu}", "cuda", "1x1x8", gpu_spec=gpu)
        for hosts in (2, 4, 8):
            out[f"{hosts}x8x{gpu}"] = Target(f"{hosts}x8x{gpu}", "cuda", f"{hosts}x1x8", gpu_spec=gpu)
    return out


TARGETS = {**_tpu_targets(), **_gpu_targets(), "local": Target("local", "local")}


class TargetError(ValueError):
    """A target or config the command line got wrong: an unknown topology, a mesh the devices cannot hold, a batch
    that does not split over the mesh."""


def parse_target(name: str) -> Target:
    """The Target named `name`; TargetError listing the valid names otherwise."""
    if name not in TARGETS:
        raise TargetError(f"unknown --topology {name!r}; valid: {', '.join(TARGETS)}")
    return TARGETS[name]


def gpu_target_config(gpu_spec: str) -> str:
    """The GpuTargetConfigProto text of gpu_targets/<gpu_spec>.txtpb."""
    return importlib.resources.files("unimedvl_jax").joinpath("gpu_targets", f"{gpu_spec}.txtpb").read_text()


def target_devices(target: Target, num_slices: int = 1) -> list:
    """The devices of `target` (num_slices TPU slices joined over DCN); compile-only devices for tpu / cuda."""
    if target.platform == "local":
        if num_slices != 1:
            raise ValueError("--num-slices needs a TPU --topology")
        return jax.devices()
    if target.platform == "tpu":
        return topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                            chip_config_name=target.chip_config,
                                            chips_per_host_bounds=target.chips_per_host, num_slices=num_slices,
                                            wrap=target.wrap).devices
    if num_slices != 1:
        raise ValueError(f"--num-slices is for TPU slices; GPU hosts are part of the topology name (e.g. "
                         f"{num_slices}x8x{target.gpu_spec})")
    try:
        return topologies.get_topology_desc(platform="cuda", topology_name=target.gpu_spec, topology=target.topology,
                                            target_config=gpu_target_config(target.gpu_spec)).devices
    except NotImplementedError as e:  # jax without its CUDA plugin
        raise ValueError(f"--topology {target.name} needs JAX's CUDA plugin in this environment (pip install "
                         f"'jax-cuda13-plugin[with-cuda]=={jax.__version__}'; docs/compile.md 'GPU targets'): "
                         f"{e}") from e


def hbm_bytes(target: Target, devices) -> int | None:
    """Memory per device: TPU_HBM_BYTES, the GPU target description's device_memory_size, or a local device's
    bytes_limit (None when unknown, e.g. CPU)."""
    if target.platform == "tpu":
        return TPU_HBM_BYTES[target.family]
    if target.platform == "cuda":
        return int(re.search(r"device_memory_size:\s*(\d+)", gpu_target_config(target.gpu_spec)).group(1))
    try:
        return int((devices[0].memory_stats() or {})["bytes_limit"])
    except (KeyError, TypeError, NotImplementedError, jax.errors.JaxRuntimeError):
        return None


def multi_slice_config(cfg, devices, num_slices: int) -> None:
    """For num_slices > 1: cfg.mesh.shape describes one slice; the data axis is multiplied by the slices and
    mesh.dcn_shape set to (num_slices, 1, 1), so that data parallelism crosses slices (in place)."""
    if num_slices == 1:
        return
    if tuple(int(d) for d in cfg.mesh.get("dcn_shape", (1, 1, 1))) != (1, 1, 1):
        raise ValueError("--num-slices sets mesh.dcn_shape; leave --config.mesh.dcn_shape at (1, 1, 1)")
    per_slice = len(devices) // num_slices
    shape = [int(s) for s in cfg.mesh.shape]
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if per_slice % known:
            raise ValueError(f"mesh.shape {tuple(shape)} does not divide the {per_slice} devices of one slice")
        shape[shape.index(-1)] = per_slice // known
    shape[0] *= num_slices
    cfg.mesh.shape = tuple(shape)
    cfg.mesh.dcn_shape = (num_slices, 1, 1)


# ----------------------------------------------------------------------------------------------------------
# the abstract global batch
# ----------------------------------------------------------------------------------------------------------
def empty_pack(cfg) -> PackedBatch:
    """A numpy pack of the config's static shapes (data.max_tokens and the capacities) holding no sample: what
    the data pipeline's Packer pads every pack to (data_pipelines/packing.py assemble_pack)."""
    packer = Packer.from_config(cfg.data, cfg.model)
    return assemble_pack([], packer.budgets, packer.vit_patch_dim).batch


def abstract_global_batch(pack: PackedBatch, batch_packs: int, sharding) -> PackedBatch:
    """ShapeDtypeStructs of `batch_packs` packs shaped like `pack` stacked on a leading axis (as the trainer's
    stack_packs), on `sharding` (sharding.data_sharding: packs over data·fsdp)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_packs,) + np.shape(x), np.asarray(x).dtype,
                                                       sharding=sharding), pack)


# ----------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------
class OutOfMemory(Exception):
    """The compiler rejected the step for lack of device memory; `.report` holds what is known."""

    def __init__(self, report: dict):
        super().__init__("out of memory")
        self.report = report


def memory_figures(memory, hbm: int | None, hbm_fraction: float) -> dict:
    """The per-device memory section from a CompiledMemoryStats (see module docstring for total_bytes)."""
    fig = {"argument_bytes": int(memory.argument_size_in_bytes), "output_bytes": int(memory.output_size_in_bytes),
           "alias_bytes": int(memory.alias_size_in_bytes), "temp_bytes": int(memory.temp_size_in_bytes),
           "generated_code_bytes": int(memory.generated_code_size_in_bytes)}
    fig["total_bytes"] = (fig["argument_bytes"] + fig["output_bytes"] - fig["alias_bytes"] + fig["temp_bytes"]
                          + fig["generated_code_bytes"])
    host = {k: int(getattr(memory, f"host_{k.removesuffix('_bytes')}_size_in_bytes", 0) or 0)
            for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")}
    if any(host.values()):
        fig["host"] = host
    return {**fig, **_headroom(fig["total_bytes"], hbm, hbm_fraction)}


def _headroom(total: int | None, hbm: int | None, hbm_fraction: float) -> dict:
    known = hbm is not None and total is not None
    return {"hbm_bytes": hbm, "hbm_fraction": hbm_fraction,
            "headroom_bytes": hbm - total if known else None,
            "fits": (total <= hbm_fraction * hbm) if known else None}


def analytic_flops(flop_model, pack: PackedBatch, batch_packs: int, num_devices: int) -> dict:
    """The trainer's FlopModel (train/metrics.py) for packs of the static shapes, two conventions:

      capacity_full        every static buffer full (capacity=True: MoT experts over C_und + C_gen rows, head over
                           C_ce, ViT over P, latent bridges over V) and every (query, key) pair of the pack
                           (attention='full': T² in the LLM, P² in the ViT) — the work of the dense and chunked
                           attention backends
      capacity_one_sample  the same buffers, attention as the trainer logs it (causal-halved per sample) for one
                           sample filling all T tokens (T²/2; no ViT attention: no ViT image is laid out)
    """
    length = pack.text_ids.shape[-1]
    out = {}
    for name, kwargs in (("capacity_full", dict(attention="full")),
                         ("capacity_one_sample", dict(attention="causal", sample_tokens=[length]))):
        terms = flop_model.pack_flop_terms(pack, capacity=True, **kwargs)
        per_step = batch_packs * sum(terms.values())
        out[name] = {"per_step": per_step, "per_device": per_step / num_devices,
                     "terms_per_pack": {k: float(v) for k, v in terms.items()}}
    return out


def _cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def _resolved_on(mesh, backend: str) -> str:
    """The attention backend the step uses on `mesh`'s devices ('auto' resolves by the traced-for platform)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return resolve_backend(backend)


def compile_report(cfg, target: Target, *, num_slices: int = 1, hbm: int | None = None,
                   hbm_fraction: float = 0.9, console=print, dump_hlo: str | None = None) -> dict:
    """Lower and compile the trainer's step for `target` (see module docstring); returns the report.

    `hbm` overrides the per-device memory of the target. Raises OutOfMemory when XLA rejects the program for lack
    of memory (its report holds the parsed figures) and TargetError for a config the target cannot hold."""
    try:
        devices = target_devices(target, num_slices)
        multi_slice_config(cfg, devices, num_slices)
        train_mesh(cfg, devices)  # checked before the model is built
    except ValueError as e:
        raise TargetError(str(e)) from e
    hbm = hbm_bytes(target, devices) if hbm is None else hbm
    run = new_run(cfg, None, console)
    setup = build_model_and_state(run, devices=devices, abstract=True)
    mesh = setup.mesh
    pack = empty_pack(cfg)
    batch = abstract_global_batch(pack, run.batch_packs, setup.batch_sharding)
    state = checkpointing.abstract_target(setup.abstract_state, setup.state_shardings)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    report = {
        "topology": target.name, "num_slices": num_slices, "platform": target.platform,
        "device_kind": devices[0].device_kind, "num_devices": len(devices),
        "mesh": dict(mesh.shape), "dcn_shape": list(cfg.mesh.get("dcn_shape", (1, 1, 1))),
        "rules": cfg.mesh.rules, "batch_packs": run.batch_packs, "max_tokens": int(cfg.data.max_tokens),
        "packs_per_device": run.batch_packs / (mesh.shape["data"] * mesh.shape["fsdp"]),
        "peak_tflops_per_device": peak_tflops(devices[0].device_kind),
        "attention_backend": cfg.model.attention_backend,
        "attention_backend_resolved": _resolved_on(mesh, cfg.model.attention_backend),
        "scan_layers": bool(cfg.model.get("scan_layers", False)), "remat_policy": remat_policy(cfg.model),
        "dtype": cfg.model.dtype,
        "flop_model": str(setup.flops),
        "notes": [],
    }
    flops = analytic_flops(setup.flops, pack, run.batch_packs, len(devices))
    start = time.perf_counter()
    lowered = compiled_train_step(run, setup).trace(state, batch, key).lower()
    lowered_s = time.perf_counter() - start
    console(f"lowered in {lowered_s:.1f} s; compiling for {len(devices)} × {devices[0].device_kind} ...")
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report["compile_s"] = {"lower": lowered_s, "compile": time.perf_counter() - start}
        oom = parse_oom(str(e))
        # the bytes the compiler found it needs: all of them ("Used X"), else at least the temporaries
        total = oom.get("used_bytes", oom.get("temp_bytes"))
        figures = {k: v for k, v in oom.items() if k != "largest_buffers"}
        report["per_device"] = {**figures, "total_bytes": total, "total_is_lower_bound": "used_bytes" not in oom,
                                **_headroom(total, oom.get("hbm_bytes", hbm), hbm_fraction), "fits": False}
        report["largest_buffers"] = oom["largest_buffers"]
        report["error"] = str(e)
        raise OutOfMemory(report) from e
    report["compile_s"] = {"lower": lowered_s, "compile": time.perf_counter() - start}
    report["per_device"] = memory_figures(compiled.memory_analysis(), hbm, hbm_fraction)
    hlo = compiled.as_text()
    cost_flops, hlo_matmul = _cost_flops(compiled), hlo_flops(hlo)
    report["flops"] = {
        "compiled_per_device": hlo_matmul["executed"],
        "hlo_matmul_static_per_device": hlo_matmul["static"],
        "cost_analysis_per_device": cost_flops,
        "compiled_note": "compiled_per_device: dot / convolution FLOPs of the optimized HLO, loops times their trip "
                         "count (VAE convolutions included); cost_analysis_per_device: XLA's count, a while body "
                         "once" + ("" if cost_flops else " (none reported: XLA:GPU gives no FLOP count)"),
        "analytic": flops,
        "compiled_over_capacity_full": hlo_matmul["executed"] / flops["capacity_full"]["per_device"]}
    report["collectives"] = hlo_collectives(hlo)
    report["kernel_calls"] = kernel_calls(hlo)
    if report["attention_backend_resolved"] in ("splash", "pallas_gpu") and not report["kernel_calls"]:
        report["notes"].append(f"the {report['attention_backend_resolved']} attention kernel was compiled in "
                               f"interpret mode (no Pallas kernel in the HLO: the models choose interpret by "
                               f"jax.default_backend()); memory and FLOPs are not those of the kernel")
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        with open(os.path.join(dump_hlo, "train_step.optimized.hlo.txt"), "w") as f:
            f.write(hlo)
        with open(os.path.join(dump_hlo, "train_step.stablehlo.mlir"), "w") as f:
            f.write(lowered.as_text())
    return report
