"""Training throughput: compile time, forward + backward, the full train step, tokens/s, TFLOP/s per device, MFU.

    python bench/train_throughput.py [--config configs/small.py] [--backends dense chunked ...] [--packs N]
                                     [--pack-lengths 512 2048 8192] [--dtype float32|bfloat16] [--repeats 5]
                                     [--steps-only | --fwd-bwd-only] [--peak-tflops X] [--json FILE]

Workload: every pack cycles a text→image sample (30 text ids + a 128×128 noised target), a VQA sample (a 112×112
image through the ViT, 24 question + 40 answer ids with CE) and an edit sample (a clean 64×64 VAE image, the
112×112 image through the ViT, 20 instruction ids, a noised 64×64 target) while another one fits, then one text
sample with CE fills it to the pack length exactly (each text item adds its two markers, each image its two). They
are built with random ids, pixels, latents and noise through unimedvl_jax.testing.build_packed_batch (the data
pipeline's planner and packer). The MoT / CE / ViT / VAE-token capacities are what the packs need rounded up to a
multiple of 128 (at most the pack length); every pack of a global batch has the same layout.

Rows (one per attention backend × pack length, on every JAX device, batch over the trainer's mesh):
  fwd+bwd   jit(value_and_grad) of the global batch's loss (the model forward on given latents, packed_loss with
            the global counts, backward): no VAE encode, optimizer or EMA
  step      the trainer's step (train/step.py make_train_step: VAE encode + fwd/bwd + AdamW + EMA), built and jitted
            as train/loop.py does it (build_model_and_state, compile_train_step: shardings, state donated)
  compile   lower + compile time of each; warm times are the median of --repeats calls after a first call,
            each ended with block_until_ready
  tokens/s  real tokens of the global batch / step time (fwd+bwd time with --fwd-bwd-only)
  TFLOP/s   per device, analytic (unimedvl_jax/train/metrics.py FlopModel): 'model' = real tokens through one MoT
            expert each, attention over the pairs the packed mask allows; 'capacity' = the linear FLOPs of the
            static buffers the step runs (padding slots included), same attention; 'MaxText' = model FLOPs with
            the packing-unaware causal-halved T²/2 attention
  MFU       model FLOP/s / (devices · peak); peak = --peak-tflops or the dense bf16 peak of jax.devices()[0]
            (metrics.PEAK_BF16_TFLOPS: H100 / H200 989, v5p 459, v6e 918); n/a when unknown (CPU)

For configs/small.py in fp32 with one pack the official PyTorch code's CPU times (2 cores) are printed alongside.
A single-H200 run of configs/unimedvl_1p5b.py with 8,192-token packs in bf16: bench/h200_train_throughput.sh.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The official code on 2 CPU cores, fp32, configs/small.py geometry (docs/quirks.md §10.9): pack length ->
# (fwd+bwd s, train step s).
OFFICIAL_SMALL_CPU = {512: ("0.14–0.15", "–"), 2048: ("0.48–0.58", "1.08–1.15")}
CAPACITY_MULTIPLE = 128


def load_config(path: str):
    """get_config() of an experiment config file (configs/*.py); a missing file or one without get_config() exits
    with one line naming it."""
    if not pathlib.Path(path).is_file():
        raise SystemExit(f"config file not found: {path}")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(f"bench_config_{pathlib.Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise SystemExit(f"config file {path} has no get_config()")
    return module.get_config()


def workload_samples(model_cfg, length: int, rng: np.random.Generator) -> list:
    """One pack's samples: text→image, VQA, edit, ... while the next one fits, then a text sample filling to
    `length`."""
    from unimedvl_jax.testing import Text, VaeImage, VitImage

    vocab = int(model_cfg.llm.vocab_size)
    stride = int(model_cfg.vae.downsample) * int(model_cfg.latent_patch_size)
    vit_side = 112 // int(model_cfg.vit.patch_size)

    def ids(n):
        return rng.integers(0, vocab, n).tolist()

    def vae(pixels, noised):
        side = pixels // stride
        return VaeImage((side, side), noised=noised, timestep=float(rng.standard_normal()) if noised else 0.0)

    makers = (lambda: [Text(ids(30)), vae(128, True)],
              lambda: [VitImage((vit_side, vit_side)), Text(ids(24)), Text(ids(40), loss=True)],
              lambda: [vae(64, False), VitImage((vit_side, vit_side)), Text(ids(20)), vae(64, True)])

    def tokens(item):  # each item adds two markers: [bos] / [eos] or the image's start / end
        if isinstance(item, Text):
            return len(item.ids) + 2
        h, w = item.patches_hw if isinstance(item, VitImage) else item.latent_hw
        return h * w + 2

    samples, used = [], 0
    while True:
        sample = makers[len(samples) % len(makers)]()
        size = sum(tokens(item) for item in sample)
        if used + size + 3 > length:  # leave the filler text at least one id
            break
        samples.append(sample)
        used += size
    if length - used < 3:
        raise ValueError(f"pack length {length} is too short for a text sample (3 tokens)")
    return samples + [[Text(ids(length - used - 2), loss=True)]]


def build_packs(model_cfg, length: int, packs: int, seed: int = 0):
    """(stacked numpy PackedBatch, latents, flow noise, per-pack batches, capacities) of `packs` workload packs."""
    from unimedvl_jax.testing import build_packed_batch
    from unimedvl_jax.train.loop import stack_packs

    def build(p, capacities=None):
        rng = np.random.default_rng(seed + p)
        return build_packed_batch(workload_samples(model_cfg, length, rng), model_cfg, pad_to=length,
                                  capacities=capacities, rng=rng)

    need = build(0)[0]
    sizes = dict(und=need.und_index, gen=need.gen_index, ce=need.ce_index, vit=need.vit_token_index,
                 vae=need.vae_token_index)
    capacities = {k: min(-(-v.shape[0] // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE, length) for k, v in sizes.items()}
    capacities["vae_images"] = need.vae_images.shape[0]
    built = [build(p, capacities) for p in range(packs)]
    batches = [b.to_numpy() for b, _, _ in built]
    return (stack_packs(batches), np.stack([lat for _, lat, _ in built]), np.stack([n for _, _, n in built]),
            batches, capacities)


def make_setup(cfg):
    """The trainer's ModelSetup (train/loop.py build_model_and_state) and initial TrainState for `cfg`."""
    import jax

    from unimedvl_jax.curriculum import StageSchedule
    from unimedvl_jax.train.loop import Run, build_model_and_state
    from unimedvl_jax.train.step import init_train_state
    from unimedvl_jax.train.train_config import total_steps

    run = Run(cfg, tempfile.gettempdir(), lambda *_: None, StageSchedule.from_config(cfg.curriculum),
              total_steps(cfg))
    setup = build_model_and_state(run)
    params, setup.params = setup.params, None
    state = jax.jit(lambda p: init_train_state(p, setup.tx), out_shardings=setup.state_shardings,
                    donate_argnums=0)(params)
    return setup, state


def make_fwd_bwd(setup):
    """jit(value_and_grad) over the params of the global batch's loss, each pack normalised by the global counts."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unimedvl_jax.models.unimedvl import loss_counts, packed_loss

    def pack_loss(params, pack, latents, noise, counts):
        model = nnx.merge(setup.graphdef, params, setup.rest)
        return packed_loss(model(pack, latents, noise), pack.ce_weight, counts=counts)[0]

    def loss(params, batch, latents, noise):
        per_pack = jax.vmap(pack_loss, in_axes=(None, 0, 0, 0, None))(params, batch, latents, noise,
                                                                       loss_counts(batch))
        return jnp.sum(per_pack)

    data = setup.batch_sharding
    return jax.jit(jax.value_and_grad(loss), in_shardings=(setup.state_shardings.params, data, data, data))


def timed(jitted, args, repeats: int, carry=None):
    """(compile s, median warm s, last output): AOT compile, one first call, then `repeats` timed calls; `carry`
    (output, args) -> args feeds donated outputs back in."""
    import jax

    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    seconds = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        if i:
            seconds.append(time.perf_counter() - start)
        if carry is not None:
            args = carry(out, args)
    return compile_s, statistics.median(seconds), out


def bench_length(cfg, setup, state, length: int, args, peak):
    """One table row for pack length `length`; returns (row dict, the state after the timed steps)."""
    import jax

    from unimedvl_jax.train.metrics import sample_lengths
    from unimedvl_jax.train.step import compile_train_step, make_train_step

    batch, latents, noise, packs, capacities = build_packs(cfg.model, length, args.packs, args.seed)
    put = lambda x: jax.device_put(x, setup.batch_sharding)  # noqa: E731
    batch_dev = jax.tree.map(put, batch)
    row = dict(backend=cfg.model.attention_backend, dtype=cfg.model.dtype, packs=args.packs, pack_length=length,
               real_tokens=int(sum(sample_lengths(p).sum() for p in packs)),
               capacities=capacities, devices=jax.device_count())
    if not args.steps_only:
        fwd_bwd = make_fwd_bwd(setup)
        compile_s, seconds, (loss, grads) = timed(fwd_bwd, (state.params, batch_dev, put(latents), put(noise)),
                                                  args.repeats)
        row.update(fwd_bwd_compile_s=compile_s, fwd_bwd_s=seconds, fwd_bwd_loss=float(loss))
        del grads
    if not args.fwd_bwd_only:
        step = compile_train_step(make_train_step(setup.graphdef, setup.rest, setup.tx, setup.tables, cfg),
                                  setup.state_shardings, setup.batch_sharding)
        key = jax.random.key(int(cfg.train.seed))
        compile_s, seconds, (state, metrics) = timed(step, (state, batch_dev, key), args.repeats,
                                                     carry=lambda out, a: (out[0],) + a[1:])
        row.update(step_compile_s=compile_s, step_s=seconds, step_loss=float(metrics["loss"]),
                   step_finite=bool(metrics["finite"]))
    flops = {}
    for name, attention, capacity in (("model", "mask", False), ("capacity", "mask", True),
                                      ("maxtext", "maxtext", False), ("causal", "causal", False),
                                      ("full", "full", True)):
        terms = [setup.flops.pack_flop_terms(p, attention=attention, capacity=capacity) for p in packs]
        flops[name] = {k: float(sum(t[k] for t in terms)) for k in terms[0]}
        flops[name]["total"] = float(sum(flops[name].values()))
    row["flops"] = flops
    seconds = row.get("step_s", row.get("fwd_bwd_s"))
    row["tokens_per_s"] = row["real_tokens"] / seconds
    for name in ("model", "capacity", "maxtext"):
        row[f"{name}_tflops_per_device"] = flops[name]["total"] / seconds / row["devices"] / 1e12
    row["mfu"] = row["model_tflops_per_device"] / peak if peak else None
    return row, state


def _cell(value, spec):
    """`value` formatted with `spec`, or a dash when missing."""
    return "–" if value is None else format(value, spec)


def markdown(rows, header: dict) -> str:
    """The caption lines and the Markdown table of `rows`."""
    lines = [f"{header['config']} ({header['params'] / 1e6:,.1f} M params), {header['devices']} × "
             f"{header['device_kind']}, peak {header['peak_text']}, repeats {header['repeats']} (median after the "
             f"first call); capacities (what the packs need, rounded up to a multiple of {CAPACITY_MULTIPLE}):"]
    for length, caps in header["capacities"].items():
        lines.append(f"  T={length}: " + ", ".join(f"{k} {v}" for k, v in caps.items()))
    lines.append(f"Host load average at the end: {header['load_average']:.1f} on {os.cpu_count()} CPUs; "
                 f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}.")
    lines.append("TFLOP/s are per device: model = real tokens, one MoT expert each, attention over the mask's "
                 "allowed pairs; capacity = linear FLOPs of the static buffers the step runs; MaxText = causal-"
                 "halved T²/2 attention. Official = the PyTorch code on 2 CPU cores (fp32, configs/small.py).")
    lines.append("")
    cols = ("backend", "dtype", "packs × T", "real tok", "compile s f+b / step", "fwd+bwd s", "official f+b s",
            "step s", "official step s", "tokens/s", "model TFLOP/s", "MFU", "capacity TFLOP/s", "MaxText TFLOP/s")
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join(":--" if i < 3 else "--:" for i in range(len(cols))) + "|")
    for r in rows:
        official = r.get("official", ("–", "–"))
        compile_cell = f"{_cell(r.get('fwd_bwd_compile_s'), '.1f')} / {_cell(r.get('step_compile_s'), '.1f')}"
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        cells = (r["backend"], r["dtype"], f"{r['packs']} × {r['pack_length']}", str(r["real_tokens"]), compile_cell,
                 _cell(r.get("fwd_bwd_s"), ".3f"), official[0], _cell(r.get("step_s"), ".3f"), official[1],
                 f"{r['tokens_per_s']:,.0f}", f"{r['model_tflops_per_device']:.4g}", mfu,
                 f"{r['capacity_tflops_per_device']:.4g}", f"{r['maxtext_tflops_per_device']:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    """Parse the command line, run every (backend, pack length) row, print the table (and write --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "small.py"))
    p.add_argument("--backends", nargs="+", default=["dense", "chunked"])
    p.add_argument("--packs", type=int, default=None, help="packs per step (default: one per device)")
    p.add_argument("--pack-lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: the "
                   "config's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: by device)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--steps-only", action="store_true", help="skip the fwd+bwd timing")
    only.add_argument("--fwd-bwd-only", action="store_true", help="skip the train-step timing")
    p.add_argument("--json", default=None, help="also write the rows (with every FLOP term) to this file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    import jax
    from flax import nnx

    from unimedvl_jax.config import validate_model_config
    from unimedvl_jax.train.metrics import peak_tflops

    nnx.use_eager_sharding(False)  # the trainer places variables with sharding.shard_model
    base = load_config(args.config)
    configs = []
    for backend in args.backends:  # fail on a bad backend before any work
        cfg = load_config(args.config)
        cfg.model.attention_backend = backend
        if args.dtype:
            cfg.model.dtype = args.dtype
        validate_model_config(cfg.model)
        configs.append(cfg)
    args.packs = args.packs or jax.device_count()
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or peak_tflops(kind)
    peak_text = "n/a" if not peak else f"{peak:g} bf16 TFLOP/s per device" + (
        " (--peak-tflops)" if args.peak_tflops else f" ({kind})")
    official = (os.path.basename(args.config) == "small.py" and args.packs == 1
                and (args.dtype or base.model.dtype) == "float32")
    rows, header = [], dict(config=os.path.relpath(args.config, ROOT), devices=jax.device_count(), device_kind=kind,
                            peak_text=peak_text, repeats=args.repeats, capacities={})
    for cfg in configs:
        cfg.train.batch_packs = args.packs
        cfg.optim.grad_accum_steps = 1
        print(f"building {header['config']} with attention_backend={cfg.model.attention_backend}", file=sys.stderr,
              flush=True)
        setup, state = make_setup(cfg)
        header["params"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        for length in args.pack_lengths:
            print(f"  pack length {length}", file=sys.stderr, flush=True)
            row, state = bench_length(cfg, setup, state, length, args, peak)
            if official and length in OFFICIAL_SMALL_CPU:
                row["official"] = OFFICIAL_SMALL_CPU[length]
            header["capacities"][length] = row["capacities"]
            rows.append(row)
        del setup, state
    header["load_average"] = os.getloadavg()[0]
    print(markdown(rows, header))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(header, rows=rows), indent=2, default=str))
    return rows


if __name__ == "__main__":
    main()
