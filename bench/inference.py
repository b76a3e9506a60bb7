"""Inference speed of a config's model with random weights: prefill, KV-cache decode and text-to-image.

Prints Markdown tables. Timings are warm (the first call of each shape compiles and is reported separately):
prefill and images are the best of --repeats runs; decode is the median step over --repeats rounds, each decoding
every context length at batch 1 and then at --batch (so load spikes of a shared machine hit both alike: medians,
and still noisy). Every context length uses one cache size, so the decode table shows whether a step's cost follows
the context (block-sparse backends visit the key blocks up to the fill) or the cache size (`dense` attends over
every slot, docs/inference.md §5.2). Each row also shows the K / V bytes a batch step must read (every row's filled
slots, all layers) and the time that takes at the host's memory bandwidth (a sum over a 512 MB array, measured
before the table): a step cannot be faster than that once its K / V no longer fit in the CPU's last-level cache, which
bounds batch / batch 1.
Usage:  python bench/inference.py [--config configs/tiny.py] [--backend blocksparse] [--contexts 128 512 2048]
                                  [--decode-tokens 32] [--batch 8] [--image-size 64] [--steps 25 50] [--skip-images]
"""

from __future__ import annotations

import argparse
import time


def build_model(config_path: str, backend: str | None):
    """The model of the config file's get_config(), random weights, fp32; `backend` overrides
    model.attention_backend."""
    from flax import nnx
    from train_throughput import load_config  # bench/train_throughput.py: this directory is on sys.path

    from unimedvl_jax.models.unimedvl import UniMedVL

    cfg = load_config(config_path).model
    if backend is not None:
        cfg.attention_backend = backend
    nnx.use_eager_sharding(False)
    return UniMedVL(cfg, rngs=nnx.Rngs(0))


def timed(fn, repeats: int):
    """(seconds of the first call (compile + run), best seconds of `repeats` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best


def host_read_gbps(megabytes: int = 512, repeats: int = 5) -> float:
    """GB/s of the best jitted sum over a `megabytes` float32 array: the host's memory read bandwidth (the array is
    larger than any CPU cache)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(megabytes * 2**20 // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = timed(lambda: total(x).block_until_ready(), repeats)[1]
    return x.nbytes / seconds / 1e9


def kv_bytes_per_slot(ctx) -> int:
    """Bytes of K and V of one cache slot over all layers."""
    import jax

    return sum(leaf.nbytes // leaf.shape[-3] for leaf in jax.tree.leaves((ctx.cache.keys, ctx.cache.values)))


def text_prompt(length: int):
    """Token ids of a text segment filling `length` cache slots (its two markers included)."""
    return [(7 * i) % 1000 for i in range(length - 2)]


def bench_text(model, contexts, decode_tokens: int, batch: int, repeats: int):
    """(rows (context, prefill compile s, prefill ms, decode ms per step at batch 1 and at `batch`, K / V MB a
    `batch` step reads), cache size, cache size when decoding)."""
    import jax
    import numpy as np

    from unimedvl_jax.inference.context import Context
    from unimedvl_jax.inference.decoding import decode_step, min_rows, stack_rows
    from unimedvl_jax.inference.kv_cache import split_model

    # One cache size for every context length: the decode step compiles once per batch size.
    max_len = max(contexts) + decode_tokens + 128
    structure, params = split_model(model)
    key = jax.random.key(0)

    def decode_seconds(ctxs, rows):
        """Per context: seconds of each of `decode_tokens` consecutive steps of a `rows`-row batch (padded with
        inactive rows to decoding.min_rows, as decoding.decode does; the host syncs each step, as it does too).
        Each context's steps run back to back, as in decoding: taking turns step by step would evict one batch's
        cache from the CPU caches between its own steps (a batch-8 step at context 2,048 reads 34 MB)."""
        total = max(rows, min_rows(structure.backend))
        active = np.arange(total) < rows
        seconds = {n: [] for n in ctxs}
        for n, ctx in ctxs.items():
            cache = stack_rows([ctx.cache] * total, block_size=structure.block_size)
            tokens = np.full(total, 5, np.int32)
            for step in range(decode_tokens):
                start = time.perf_counter()
                cache, _, chosen = decode_step(structure, params, cache, tokens, np.full(total, ctx.rope + step,
                                               np.int32), active, key, np.int32(step), np.float32(0.0),
                                               np.float32(1.0))
                tokens = np.asarray(chosen)
                seconds[n].append(time.perf_counter() - start)
        return seconds

    prefill, ctxs = {}, {}
    for length in contexts:
        ids = text_prompt(length)
        prefill[length] = timed(lambda ids=ids: jax.block_until_ready(Context.new(model, max_len).add_text(ids).cache),
                                repeats)
        ctxs[length] = Context.new(model, max_len).add_text(ids)
    decode_seconds(ctxs, 1), decode_seconds(ctxs, batch)  # compile (once per batch size)
    single, batched = {n: [] for n in contexts}, {n: [] for n in contexts}
    for _ in range(repeats):
        for n, sec in decode_seconds(ctxs, 1).items():
            single[n] += sec
        for n, sec in decode_seconds(ctxs, batch).items():
            batched[n] += sec
    slot_bytes = kv_bytes_per_slot(ctxs[contexts[0]])
    rows = [(n, prefill[n][0], prefill[n][1] * 1e3, np.median(single[n]) * 1e3, np.median(batched[n]) * 1e3,
             batch * (n + decode_tokens / 2) * slot_bytes / 1e6) for n in contexts]
    return rows, max_len, stack_rows([ctxs[contexts[0]].cache], block_size=structure.block_size).max_len


class ByteTokenizer:
    """UTF-8 bytes as token ids (< 256): enough to condition a random-weight model."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def text_to_image(model, tokenizer, prompt: str, *, image_size: int, num_timesteps: int, cfg: bool):
    """One (image_size²) text-to-image sample through the image-generation API (decoded to uint8).

    cfg=False sets the text scale to 1, which turns guidance off entirely (docs/inference.md §5.3); cfg=True keeps the
    `interleave_inference` T2I defaults (text 3.0, image 1.5, interval (0.4, 1], docs/inference.md §5.5).
    """
    from unimedvl_jax.inference.interleave import text_to_image as generate

    scales = {} if cfg else dict(cfg_text_scale=1.0, cfg_img_scale=1.0)
    return generate(model, tokenizer, prompt, image_shape=(image_size, image_size), num_timesteps=num_timesteps,
                    **scales).image


def bench_images(model, image_size: int, steps, repeats: int):
    """Rows (steps, CFG, compile s, seconds per image)."""
    tokenizer, rows = ByteTokenizer(), []
    for num_timesteps in steps:
        for cfg in (False, True):
            first, best = timed(lambda n=num_timesteps, cfg=cfg: text_to_image(
                model, tokenizer, "a chest x-ray", image_size=image_size, num_timesteps=n, cfg=cfg), repeats)
            rows.append((num_timesteps, cfg, first, best))
    return rows


def markdown(header, rows) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py", help="config file with get_config()")
    parser.add_argument("--backend", default=None, help="override model.attention_backend")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-images", action="store_true")
    args = parser.parse_args()

    import jax

    from unimedvl_jax.models.attention import resolve_backend

    model = build_model(args.config, args.backend)
    backend = model.cfg.attention_backend
    print(f"{args.config}, random weights, fp32, attention {backend} ({resolve_backend(backend)}), "
          f"{jax.default_backend()} ({jax.device_count()} device(s))\n")
    gbps = host_read_gbps()
    rows, max_len, decode_len = bench_text(model, args.contexts, args.decode_tokens, args.batch, args.repeats)
    print(f"Text (KV cache of {max_len} slots, {decode_len} when decoding, for every context length; decode over "
          f"{args.decode_tokens} tokens, median step; host memory read bandwidth {gbps:.1f} GB/s)\n")
    b = args.batch
    print(markdown(["context", "prefill compile s", "prefill ms", "decode ms/step (batch 1)", f"(batch {b})",
                    "tokens/s (batch 1)", f"(batch {b})", f"batch {b} / batch 1", f"K/V MB per batch-{b} step",
                    "its read at host bandwidth, ms", f"batch {b} / batch 1 at that floor"],
                   [(n, f"{c:.1f}", f"{p:.1f}", f"{d1:.2f}", f"{db:.2f}", f"{1e3 / d1:.0f}", f"{b * 1e3 / db:.0f}",
                     f"{b * d1 / db:.2f}x", f"{mb:.1f}", f"{mb / gbps:.2f}", f"{b * d1 / (mb / gbps):.2f}x")
                    for n, c, p, d1, db, mb in rows]))
    print(f"\ndecode ms/step, longest / shortest context: {rows[-1][3] / rows[0][3]:.2f}x (batch 1), "
          f"{rows[-1][4] / rows[0][4]:.2f}x (batch {b})\n")
    if not args.skip_images:
        print(f"Text-to-image {args.image_size}x{args.image_size} (prompt + VAE decode included)\n")
        print(markdown(["steps", "CFG", "first call s (compile)", "s / image"],
                       [(n, "text 3.0, img 1.5" if cfg else "off", f"{f:.1f}", f"{b:.2f}")
                        for n, cfg, f, b in bench_images(model, args.image_size, args.steps, args.repeats)]))


if __name__ == "__main__":
    main()
