"""unimedvl-compile: compile the trainer's step for a TPU slice or GPU hosts from this machine; print its memory,
FLOPs and collectives (docs/compile.md).

    unimedvl-compile --config configs/unimedvl_14b.py --topology v5p-32 --json r.json [--config.a.b=v ...]
    unimedvl-compile --config configs/unimedvl_14b.py --topology v5p-128 --num-slices 2
    unimedvl-compile --config configs/tiny.py --topology 8xh200          # needs jax-cuda13-plugin installed
    unimedvl-compile --config configs/tiny.py --topology local           # this machine's own devices

Takes the config and overrides of `unimedvl-train`, builds the target's devices (compile-only: no TPU or GPU is
needed), the trainer's mesh, rules, abstract TrainState and an abstract global batch of train.batch_packs packs of
the config's static shapes, and lowers and compiles the very step function the trainer runs
(train/loop.py compiled_train_step). Prints per-device memory (arguments, outputs, aliased, temporaries, total
against the chip's HBM), compiled FLOPs next to the trainer's FLOP model, the collectives of the optimized HLO and
the compile time; --json writes the same as JSON (per_device.total_bytes, per_device.hbm_bytes, ...).

Exit status: 0 the step compiles and total_bytes <= --hbm-fraction × HBM; 1 it does not fit (the compiler ran out
of memory: per-device figures and the largest buffers it names are printed, or the total exceeds the fraction);
2 a bad command line (unknown topology, a config the mesh cannot hold).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import jax
from absl import flags
from flax import nnx

from unimedvl_jax import aot, entry_point
from unimedvl_jax.hlo_stats import COLLECTIVES

# The environment of a compile-only TPU / GPU target; main() sets it before any JAX backend starts.
TARGET_ENV = {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
PROG = "unimedvl-compile"


def _topology_arg(argv) -> str | None:
    """The --topology value of a raw command line (before flags are parsed: the environment depends on it)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--topology="):
            return arg.split("=", 1)[1]
        if arg == "--topology" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("topology", None, "target: v5p-8 ... v5p-256, v6e-8 ... v6e-256, 1xh100 / 1xh200 (one GPU), "
                        "8xh100 / 8xh200 (one host), Nx8xh100 / Nx8xh200 (N = 2, 4, 8 hosts), or local (this "
                        "machine's devices)",
                        flag_values=fv)
    flags.DEFINE_integer("num-slices", 1, "TPU slices joined over DCN; mesh.shape then describes one slice and "
                         "the data axis spans the slices (mesh.dcn_shape = (N, 1, 1))", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_string("json", None, "write the report as JSON to this file", flag_values=fv)
    flags.DEFINE_float("hbm-fraction", 0.9, "the step fits when total_bytes <= this fraction of the HBM",
                       lower_bound=0.0, upper_bound=1.0, flag_values=fv)
    flags.DEFINE_integer("hbm-bytes", None, "per-device memory to check against instead of the chip's",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_string("dump-hlo", None, "write the optimized HLO and the StableHLO of the step to this directory",
                        flag_values=fv)


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2 ** 30:.2f} GiB"


def _print_report(r: dict) -> None:
    m = r["per_device"]
    print(f"{PROG}: {r['topology']}" + (f" × {r['num_slices']} slices" if r["num_slices"] > 1 else "")
          + f": {r['num_devices']} × {r['device_kind']}, mesh {r['mesh']} dcn {tuple(r['dcn_shape'])}, rules "
          f"{r['rules']!r}; {r['batch_packs']} packs × {r['max_tokens']} tokens ({r['packs_per_device']:g} per "
          f"data-parallel device); attention {r['attention_backend_resolved']}, scan_layers {r['scan_layers']}, "
          f"remat {r['remat_policy']}")
    if "compile_s" in r:
        print(f"  compile: lower {r['compile_s']['lower']:.1f} s, XLA {r['compile_s']['compile']:.1f} s")
    parts = [f"{k.removesuffix('_bytes')} {_gib(m[k])}" for k in
             ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "generated_code_bytes") if k in m]
    print("  memory per device: " + ", ".join(parts))
    at_least = "at least " if m.get("total_is_lower_bound") else ""
    print(f"  total {at_least}{_gib(m['total_bytes'])} of HBM {_gib(m['hbm_bytes'])} (headroom "
          f"{_gib(m['headroom_bytes'])}; "
          f"fits within {m['hbm_fraction']:.0%}: {m['fits']})")
    for i, b in enumerate(r.get("largest_buffers", [])[:10], 1):
        print(f"  largest buffer {i}: {_gib(b['bytes'])} {b['shape'] or ''} {b['op'] or ''}".rstrip())
    if "flops" in r:
        f, a = r["flops"], r["flops"]["analytic"]
        cost = "n/a" if f["cost_analysis_per_device"] is None else f"{f['cost_analysis_per_device']:.4g}"
        print(f"  FLOPs per device and step: compiled {f['compiled_per_device']:.4g} (HLO dots and convolutions, "
              f"loops counted; XLA cost_analysis {cost}, a loop body once); FLOP model "
              f"{a['capacity_full']['per_device']:.4g} (capacity, all pairs), "
              f"{a['capacity_one_sample']['per_device']:.4g} (capacity, one causal sample)")
    for note in r.get("notes", []):
        print(f"  note: {note}")
    if "collectives" in r:
        c = r["collectives"]
        print("  collectives (ops in the HLO / executed per step, bytes executed per device): " + ", ".join(
            f"{k} {c[k]['count']}/{c[k]['executed_count']} {_gib(c[k]['executed_bytes'])}" for k in COLLECTIVES)
            + (f" ({c['unknown_trip_counts']} loop(s) of unknown trip count counted once)"
               if c["unknown_trip_counts"] else ""))


def run(args) -> int:
    """The command after flag parsing."""
    try:
        target = aot.parse_target(args.topology)
    except aot.TargetError as e:
        raise entry_point.UsageError(str(e)) from e
    if target.platform != "local" and jax.default_backend() != "cpu":
        raise entry_point.UsageError(f"--topology {target.name} compiles on the CPU backend; JAX already started "
                                     f"{jax.default_backend()!r} in this process (set JAX_PLATFORMS=cpu)")
    logging.getLogger().setLevel(logging.WARNING)
    nnx.use_eager_sharding(False)  # as every command (entry_point.start), without joining a multi-process job
    try:
        report = aot.compile_report(args.config, target, num_slices=args.num_slices, hbm=args.hbm_bytes,
                                    hbm_fraction=args.hbm_fraction, dump_hlo=args.dump_hlo,
                                    console=lambda s: print(s, flush=True))
        status = 0 if report["per_device"]["fits"] in (True, None) else 1
    except aot.OutOfMemory as e:
        report, status = e.report, 1
        print(f"{PROG}: out of memory: the compiler rejected the step for lack of device memory", file=sys.stderr)
    except aot.TargetError as e:  # a config the target cannot hold (mesh, batch split, slices)
        raise entry_point.UsageError(str(e)) from e
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    _print_report(report)
    if status:
        print(f"{PROG}: does not fit: total {_gib(report['per_device']['total_bytes'])} per device > "
              f"{report['per_device']['hbm_fraction']:.0%} of {_gib(report['per_device']['hbm_bytes'])}",
              file=sys.stderr, flush=True)
    return status


COMMAND = entry_point.Command(PROG, __doc__, _define, required=("config", "topology"),
                              config=entry_point.ConfigFile(example="--config.train.batch_packs=16"))


def main(argv=None) -> int:
    """Console-script entry point; `argv`: the arguments after the program name (default sys.argv[1:])."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if _topology_arg(argv) not in (None, "local"):  # before any JAX backend starts (none does at import)
        os.environ.update(TARGET_ENV)
        jax.config.update("jax_platforms", "cpu")
    return COMMAND.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
