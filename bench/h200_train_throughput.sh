#!/usr/bin/env bash
# Training throughput of configs/unimedvl_1p5b.py on one H200: 8,192-token packs, bf16 compute, one pack per step.
# One process per attention backend, so an out-of-memory backend does not lose the others' rows; each writes
# h200_<backend>.json next to its table. Override with BACKENDS="..." REPEATS=N OUT=dir.
#   bash bench/h200_train_throughput.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_results}
# JAX preallocates 75% of the GPU by default; the 3.6 B-parameter train state (fp32 params, Adam moments, EMA:
# ~57 GB) plus gradients and activations needs more of the 141 GB.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
mkdir -p "$OUT"
for backend in ${BACKENDS:-auto pallas_gpu blocksparse chunked}; do
  python bench/train_throughput.py --config configs/unimedvl_1p5b.py --backends "$backend" --packs 1 \
    --pack-lengths 8192 --dtype bfloat16 --repeats "${REPEATS:-5}" --json "$OUT/h200_$backend.json" \
    | tee "$OUT/h200_$backend.md" || echo "backend $backend failed (see above)" >&2
done
