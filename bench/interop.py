"""Export/import time and peak RSS for a ~1B-parameter UniMedVL config (CPU).

Each phase runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own:
  export: build the model with random weights, then export_official (fp32 and bf16)
  import: import_official of the fp32 export into a fresh process
Usage:  python bench/interop.py [--workdir DIR] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def bench_config(layers: int):
    """~1B parameters: MoT LLM hidden 1536 × `layers`, vocab 64000, ViT-B sized, FLUX AE."""
    from unimedvl_jax import config as C

    return C.model_config(
        llm=C.llm_config(hidden_size=1536, num_layers=layers, num_heads=12, num_kv_heads=2,
                         intermediate_size=4096, vocab_size=64000),
        vit=C.vit_config(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, image_size=980))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_phase(phase: str, workdir: str, layers: int) -> dict:
    from flax import nnx
    nnx.use_eager_sharding(False)
    import jax
    import numpy as np

    from unimedvl_jax.interop.checkpoint_export import export_official
    from unimedvl_jax.interop.checkpoint_import import import_official
    from unimedvl_jax.models.unimedvl import UniMedVL

    cfg = bench_config(layers)
    result = {"phase": phase}
    if phase.startswith("export"):
        dtype = phase.split("-")[1]
        model = UniMedVL(cfg, rngs=nnx.Rngs(0))
        jax.block_until_ready(nnx.state(model))
        n = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model)))
        result.update(params=n, rss_before_gb=peak_rss_gb())
        start = time.perf_counter()
        export_official(model, cfg, os.path.join(workdir, dtype), dtype=dtype, overwrite=True)
        result["seconds"] = time.perf_counter() - start
    else:
        result["rss_before_gb"] = peak_rss_gb()
        start = time.perf_counter()
        model, _, _ = import_official(os.path.join(workdir, "float32"))
        jax.block_until_ready(nnx.state(model))
        result["seconds"] = time.perf_counter() - start
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def ckpt_gb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**30


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.workdir, args.layers)))
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="unimedvl-bench-")
    rows = []
    for phase in ("export-float32", "export-bfloat16", "import"):
        out = subprocess.run([sys.executable, __file__, "--phase", phase, "--workdir", workdir,
                              "--layers", str(args.layers)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"... {phase} done", file=sys.stderr)
    params = rows[0]["params"]
    print(f"\nparameters: {params / 1e9:.3f}B   checkpoint: fp32 {ckpt_gb(os.path.join(workdir, 'float32')):.2f} GiB, "
          f"bf16 {ckpt_gb(os.path.join(workdir, 'bfloat16')):.2f} GiB\n")
    print(f"| {'phase':16} | {'seconds':>8} | {'RSS before (GiB)':>16} | {'peak RSS (GiB)':>14} | "
          f"{'peak / ckpt size':>16} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 18}|{'-' * 16}|{'-' * 18}|")
    for r in rows:
        size = ckpt_gb(os.path.join(workdir, "bfloat16" if r["phase"] == "export-bfloat16" else "float32"))
        print(f"| {r['phase']:16} | {r['seconds']:8.1f} | {r['rss_before_gb']:16.2f} | {r['peak_rss_gb']:14.2f} | "
              f"{r['peak_rss_gb'] / size:16.2f} |")


if __name__ == "__main__":
    main()
