"""The README's memory plan: compile configs for TPU / GPU targets with `unimedvl-compile` and print one Markdown table.

    python bench/memory_plan.py                      # every row of PLAN (the 14B rows take minutes each here)
    python bench/memory_plan.py --only v5p-32 --out runs/plan   # rows whose target contains 'v5p-32'; JSONs kept

Each row runs `unimedvl-compile --json` in a subprocess (a compile-only target needs its environment before JAX
starts) and reads back per-device memory, compile time and compiled FLOPs. Step time at 40 % / 55 % MFU is the
trainer's analytic model FLOPs per device per step (FlopModel, packs filled to capacity, one sample per pack,
causal-halved attention: the `capacity_one_sample` figure of the report) over the chip's dense bf16 peak
(train/metrics.py PEAK_BF16_TFLOPS). A GPU row needs `jax-cuda13-plugin` (docs/compile.md); without it the row
says why it was not compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 2 ** 30

TPU = GPU = []  # the configs' attention_backend 'auto' resolves for the target (splash / pallas_gpu)

# (config, topology, extra unimedvl-compile arguments, what the row is for)
PLAN = [
    ("configs/unimedvl_14b.py", "v5p-32", TPU, "2 packs per chip"),
    ("configs/unimedvl_14b.py", "v5p-32", TPU + ["--config.train.batch_packs=64"], "4 packs per chip"),
    ("configs/unimedvl_14b.py", "v5p-32", TPU + ["--config.train.batch_packs=80"], "5 packs per chip"),
    ("configs/unimedvl_14b.py", "v5p-32", TPU + ["--config.model.scan_layers=False"], "loop instead of scan"),
    ("configs/unimedvl_14b.py", "v5p-32", TPU + ["--config.model.scan_layers=False", "--config.data.max_tokens=8192",
                                                "--config.data.und_capacity=8192"], "loop, shorter packs"),
    ("configs/unimedvl_14b.py", "v5p-64", TPU + ["--config.train.batch_packs=64"], "2 packs per chip"),
    ("configs/unimedvl_14b.py", "v5p-64", TPU + ["--config.train.batch_packs=160"], "5 packs per chip"),
    ("configs/unimedvl_14b.py", "v5p-128", TPU + ["--config.train.batch_packs=128"], "2 packs per chip"),
    ("configs/unimedvl_14b.py", "v5p-128", TPU + ["--config.train.batch_packs=320"], "5 packs per chip"),
    ("configs/unimedvl_14b.py", "v5p-32", TPU + ["--num-slices=2", "--config.train.batch_packs=64"],
     "2 slices over DCN"),
    ("configs/unimedvl_14b.py", "v5p-32", TPU + ["--num-slices=2", "--config.train.batch_packs=128"],
     "2 slices, 4 packs per chip"),
    ("configs/unimedvl_14b.py", "8xh200", GPU + ["--config.train.batch_packs=16"], "2 packs per GPU"),
    ("configs/unimedvl_14b.py", "8xh200", GPU + ["--config.train.batch_packs=48"], "6 packs per GPU"),
    ("configs/unimedvl_14b.py", "8xh200", GPU + ["--config.train.batch_packs=72"], "9 packs per GPU"),
    ("configs/unimedvl_14b.py", "2x8xh200", GPU + ["--config.train.batch_packs=32"], "2 packs per GPU"),
    ("configs/unimedvl_14b.py", "2x8xh200", GPU + ["--config.train.batch_packs=112"], "7 packs per GPU"),
    ("configs/unimedvl_14b.py", "2x8xh200", GPU + ["--config.train.batch_packs=176"], "11 packs per GPU"),
    ("configs/unimedvl_1p5b.py", "v5p-8", TPU + ["--config.train.batch_packs=8",
                                                 "--config.optim.grad_accum_steps=2"],
     "2 packs per chip, 2 micro-batches"),
    ("configs/unimedvl_1p5b.py", "1xh200", GPU, "8 packs, 8 micro-batches"),
]


def compile_row(config: str, topology: str, extra: list, out_dir: pathlib.Path, index: int) -> dict:
    """Run unimedvl-compile for one row; its JSON report, or {'error': ...} when it produced none."""
    out = out_dir / f"row{index}_{pathlib.Path(config).stem}_{topology}.json"
    args = [sys.executable, "-m", "unimedvl_jax.compile_cli", "--config", config, "--topology", topology,
            "--json", str(out), *extra]
    res = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if out.exists():
        report = json.loads(out.read_text())
        report["exit_status"] = res.returncode
        return report
    tail = (res.stderr or res.stdout).strip().splitlines()
    return {"error": tail[-1] if tail else f"exit status {res.returncode}", "exit_status": res.returncode}


def _gib(x) -> str:
    return "—" if x is None else f"{x / GIB:.1f}"


def table_row(config: str, topology: str, extra: list, note: str, r: dict) -> str:
    """One Markdown row of the plan."""
    name = f"{pathlib.Path(config).stem}" + (f" ({note})" if note else "")
    if "error" in r:
        return f"| {name} | {topology} | not compiled: {r['error']} | | | | | | | |"
    dev, flops = r["per_device"], r["flops"]
    peak = r.get("peak_tflops_per_device")
    model = flops["analytic"]["capacity_one_sample"]["per_device"]
    steps = ["—", "—"] if not peak else [f"{model / (peak * 1e12 * mfu):.2f} s" for mfu in (0.40, 0.55)]
    compiled = flops.get("compiled_per_device")
    compiled_tf = "—" if compiled is None else f"{compiled * r['num_devices'] / 1e12:,.0f}"
    fits = "yes" if dev["fits"] else "**no**"
    compile_s = sum(r["compile_s"].values())
    target = r["topology"] if r["num_slices"] == 1 else f"{r['num_slices']} × {r['topology']}"
    return (f"| {name} | {target} | "
            f"{_gib(dev['total_bytes'])} of {_gib(dev['hbm_bytes'])} | {fits} | {r.get('remat_policy', '?')} | "
            f"{r['packs_per_device']:g} × {r['max_tokens']:,} | {compile_s:.0f} s | {compiled_tf} | "
            f"{steps[0]} | {steps[1]} |")


HEADER = ("| config | target | per-device GiB (of HBM) | fits (≤ 90 %) | remat | packs per device × tokens | "
          "compile | compiled TFLOPs / step | step @ 40 % MFU | step @ 55 % MFU |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="run the rows whose topology contains this string")
    p.add_argument("--rows", default="", help="run these rows of PLAN (comma-separated indices)")
    p.add_argument("--out", default=None, help="directory for the per-row JSON reports (default: a temp dir)")
    p.add_argument("--from-json", nargs="*", default=None, metavar="ROW=FILE",
                   help="render rows from existing unimedvl-compile JSON reports instead of compiling (ROW: index in "
                        "PLAN)")
    args = p.parse_args(argv)
    if args.from_json is not None:
        print(HEADER)
        for item in args.from_json:
            index, _, path = item.partition("=")
            report = json.loads(pathlib.Path(path).read_text())
            print(table_row(*PLAN[int(index)], report))
        return 0
    out_dir = pathlib.Path(args.out or tempfile.mkdtemp(prefix="memory-plan-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (config, topology, extra, note) in enumerate(PLAN):
        if (args.only and args.only not in topology) or (args.rows and str(i) not in args.rows.split(",")):
            continue
        print(f"[{i}] {config} on {topology} {' '.join(extra)}", file=sys.stderr, flush=True)
        rows.append(table_row(config, topology, extra, note, compile_row(config, topology, extra, out_dir, i)))
    print(HEADER)
    print("\n".join(rows))
    print(f"\nJSON reports: {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
