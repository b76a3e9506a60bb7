"""Forward + backward and VAE encode on this machine, same weights and inputs: ours next to the official code's.

    python bench/official_reference.py --official-src UniMedVL/codes --torch-python VENV/bin/python
                                       [--config configs/small.py] [--backend cpu_ffi] [--pack-lengths 512 2048]
                                       [--vae-images 16] [--vae-size 128] [--repeats 5] [--threads 2] [--keep DIR]

The official UniMedVL code (github.com/uni-medical/UniMedVL, `codes/`) is run, not copied: this script builds the
config's model with random weights, exports them in the official layout (unimedvl_jax.interop.export_official, fp32),
builds the bench/train_throughput.py workload packs, converts each to the official training forward's kwargs
(interop.official_batch.packed_batch_to_official) and times jit(value_and_grad) of our loss on it. Then it runs
itself under --torch-python (a venv with torch==2.13.0, transformers==4.49.0, accelerate, safetensors, einops,
pillow; no unimedvl_jax needed there), which builds the official Bagel from the exported files, loads the weights
strictly, and times `loss.backward()` of the official forward on the same kwargs and the same flow noise, with
torch on --threads threads. The losses of both are printed next to each other: equal to fp32 rounding, so both sides
did the same work.

It also times the VAE encode of --vae-images random images of --vae-size pixels (part of every train step) on both
sides: ours as the trainer calls it (bench/vae_t2i.py), the official AutoEncoder loaded strictly from the exported
ae.safetensors, under torch.no_grad.

Running the official training forward in fp32 on a CPU needs three stand-ins, all outside its own code:
  flash_attn        not installable without CUDA; its varlen function (used by the ViT) is replaced by per-image
                    torch SDPA over the same cu_seqlens
  sdpa_kernel       the official code asks for EFFICIENT_ATTENTION only, which has no CPU kernel; torch picks its
                    CPU kernel instead (the math kernel for the per-sample float masks it passes)
  torch.bfloat16    the attention of the LLM and the ViT casts to bf16 (for flash-attn, under bf16 autocast in
                    training, docs/quirks.md §9.9); in those two modules the name resolves to float32, as in the fp32
                    fixtures of tests/fixtures/official
Everything else (the per-sample masks from `prepare_attention_mask_per_sample`, MoT routing, losses) is the official
code as published. Run on a quiet machine: both sides share its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
LIST_KEYS = ("sample_lens", "split_lens")  # the official forward takes these as Python lists
VAE_ROW = "vae"


# ----------------------------------------------------------------------------------------------- our side (JAX)

def export_and_time_ours(args, out_dir: pathlib.Path) -> list[dict]:
    """Export the weights and the packs to `out_dir`; per pack length: our fwd+bwd seconds and loss."""
    sys.path.insert(0, str(HERE))
    import jax
    from flax import nnx
    from train_throughput import build_packs, load_config, make_fwd_bwd, make_setup, timed

    from unimedvl_jax.interop.checkpoint_export import export_official
    from unimedvl_jax.interop.official_batch import packed_batch_to_official

    nnx.use_eager_sharding(False)  # the trainer places variables with sharding.shard_model
    cfg = load_config(args.config)
    if args.backend:
        cfg.model.attention_backend = args.backend
    setup, state = make_setup(cfg)
    model = nnx.merge(setup.graphdef, state.params, setup.rest)
    export_official(model, cfg.model, out_dir / "ckpt", dtype="float32", overwrite=True)
    fwd_bwd = make_fwd_bwd(setup)
    rows = [time_our_vae_encode(model, args)]
    for length in args.pack_lengths:
        batch, latents, noise, packs, _ = build_packs(cfg.model, length, 1, args.seed)
        kwargs, modes = packed_batch_to_official(packs[0], latents[0])
        vae = np.asarray(packs[0].vae_token_index) < length
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
        arrays["flow_noise"] = noise[0][vae]
        np.savez(out_dir / f"pack_{length}.npz", **arrays)
        meta = dict(sequence_length=kwargs["sequence_length"], attn_modes=modes,
                    split_lens_per_sample=[s.tolist() for s in kwargs["split_lens_per_sample"]])
        (out_dir / f"pack_{length}.json").write_text(json.dumps(meta))
        put = lambda x: jax.device_put(x, setup.batch_sharding)  # noqa: E731
        compile_s, seconds, (loss, _) = timed(fwd_bwd, (state.params, jax.tree.map(put, batch), put(latents),
                                                        put(noise)), args.repeats)
        rows.append(dict(length=length, ours_s=seconds, ours_compile_s=compile_s, ours_loss=float(loss)))
        print(f"  ours, T={length}: fwd+bwd {seconds:.3f} s (median of {args.repeats}), loss {float(loss):.5f}",
              flush=True)
    return rows


def time_our_vae_encode(model, args) -> dict:
    """Our VAE encode of the bench's images (bench/vae_t2i.py's call): median seconds."""
    from vae_t2i import vae_calls

    encode = next(iter(vae_calls(model, args.vae_images, args.vae_size).values()))[0]
    encode()
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        encode()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    print(f"  ours, VAE encode of {args.vae_images} images {args.vae_size}x{args.vae_size}: {median:.3f} s", flush=True)
    return dict(length=VAE_ROW, ours_s=median)


# ------------------------------------------------------------------------------------ official side (PyTorch)

def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                     softmax_scale=None, causal=False, **_):
    """flash_attn_varlen_func's contract ((tokens, heads, dim) packed by cu_seqlens) with torch SDPA per segment."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for i in range(len(cu_seqlens_q) - 1):
        a, b, c, d = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        qi, ki, vi = (x.transpose(0, 1) for x in (q[a:b], k[c:d], v[c:d]))
        if groups > 1:
            ki, vi = ki.repeat_interleave(groups, 0), vi.repeat_interleave(groups, 0)
        out[a:b] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=softmax_scale).transpose(0, 1)
    return out


def install_stand_ins():
    """The three stand-ins of the module docstring."""
    import contextlib
    import importlib.machinery

    flash_attn = types.ModuleType("flash_attn")
    flash_attn.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # transformers probes it, finds no dist
    flash_attn.flash_attn_varlen_func = varlen_attention
    sys.modules["flash_attn"] = flash_attn
    import torch
    from modeling.unimedvl import qwen2_navit, siglip_navit

    qwen2_navit.sdpa_kernel = lambda *a, **k: contextlib.nullcontext()

    class Float32Torch(types.ModuleType):
        bfloat16 = torch.float32

        def __getattr__(self, name):
            return getattr(torch, name)

    qwen2_navit.torch = siglip_navit.torch = Float32Torch("torch")


def build_official(ckpt: pathlib.Path):
    """The official Bagel of an exported checkpoint directory, fp32, weights loaded strictly (VAE not needed)."""
    from modeling import unimedvl as official
    from safetensors.torch import load_file

    llm_config = official.Qwen2Config.from_json_file(ckpt / "llm_config.json")
    vit_config = official.SiglipVisionConfig.from_json_file(ckpt / "vit_config.json")
    vit_config.num_hidden_layers -= 1  # the official loaders' rule (docs/model.md §1.2)
    bagel = json.loads((ckpt / "bagel_config.json").read_text())
    vae = types.SimpleNamespace(**bagel["vae_params"])
    config = official.BagelConfig(llm_config=llm_config, vit_config=vit_config, vae_config=vae, **bagel["bagel_config"],
                         **{k: v for k, v in bagel["bagel_config_fixed"].items() if k in ("visual_gen", "visual_und")})
    model = official.Bagel(official.Qwen2ForCausalLM(llm_config), official.SiglipVisionModel(vit_config), config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    missing, unexpected = model.load_state_dict(load_file(ckpt / "ema.safetensors"), strict=False)
    if missing or unexpected:
        raise SystemExit(f"official model vs {ckpt / 'ema.safetensors'}: missing {missing}, unexpected {unexpected}")
    return model.float().train()


def official_fwd_bwd(model, kwargs: dict, noise) -> float:
    """Loss (mean CE + mean MSE) of the official training forward on `kwargs`, its flow noise draw replaced by
    `noise`, after its backward pass."""
    import torch

    model.zero_grad(set_to_none=True)
    randn_like = torch.randn_like
    torch.randn_like = lambda x, **_: noise.to(x.dtype)
    try:
        out = model(**kwargs)
    finally:
        torch.randn_like = randn_like
    loss = sum(out[k].mean() for k in ("ce", "mse") if out[k] is not None)
    loss.backward()
    return loss.item()


def time_official_vae_encode(ckpt: pathlib.Path, args) -> None:
    """Time the official AutoEncoder's encode of random images; print one JSON line."""
    import torch
    from modeling import autoencoder
    from safetensors.torch import load_file

    params = json.loads((ckpt / "bagel_config.json").read_text())["vae_params"]
    fields = autoencoder.AutoEncoderParams.__dataclass_fields__
    ae = autoencoder.AutoEncoder(autoencoder.AutoEncoderParams(**{k: v for k, v in params.items() if k in fields}))
    ae.load_state_dict(load_file(ckpt / "ae.safetensors"), strict=True)
    pixels = torch.rand(args.vae_images, 3, args.vae_size, args.vae_size) * 2 - 1
    seconds = []
    with torch.no_grad():
        ae.eval().encode(pixels)
        for _ in range(args.repeats):
            start = time.perf_counter()
            ae.encode(pixels)
            seconds.append(time.perf_counter() - start)
    print(json.dumps(dict(length=VAE_ROW, official_s=statistics.median(seconds))), flush=True)


def time_official(args) -> None:
    """Time the official VAE encode and fwd+bwd on each exported pack; print one JSON line per row."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(pathlib.Path(args.official_src).resolve()))
    install_stand_ins()
    from data.data_utils import prepare_attention_mask_per_sample

    root = pathlib.Path(args.time_official)
    time_official_vae_encode(root / "ckpt", args)
    model = build_official(root / "ckpt")
    for length in args.pack_lengths:
        meta = json.loads((root / f"pack_{length}.json").read_text())
        with np.load(root / f"pack_{length}.npz") as f:
            t = {k: torch.from_numpy(f[k]) for k in f.files}
        noise = t.pop("flow_noise")
        kwargs = {k: (v.tolist() if k in LIST_KEYS or k == "patchified_vae_latent_shapes" else v)
                  for k, v in t.items()}
        kwargs["nested_attention_masks"] = [prepare_attention_mask_per_sample(s, m) for s, m in
                                            zip(meta["split_lens_per_sample"], meta["attn_modes"])]
        kwargs["sequence_length"] = meta["sequence_length"]
        loss, seconds = official_fwd_bwd(model, kwargs, noise), []
        for _ in range(args.repeats):
            start = time.perf_counter()
            official_fwd_bwd(model, kwargs, noise)
            seconds.append(time.perf_counter() - start)
        print(json.dumps(dict(length=length, official_s=statistics.median(seconds), official_loss=loss)), flush=True)


# ----------------------------------------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-src", required=True, help="the official repository's codes/ directory")
    parser.add_argument("--torch-python", help="python of a venv with torch==2.13.0 and transformers==4.49.0")
    parser.add_argument("--config", default=str(HERE.parent / "configs" / "small.py"))
    parser.add_argument("--backend", default=None, help="override model.attention_backend")
    parser.add_argument("--pack-lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--vae-images", type=int, default=16)
    parser.add_argument("--vae-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="export directory to keep (default: a temporary one)")
    parser.add_argument("--time-official", help=argparse.SUPPRESS)  # internal: the torch side
    args = parser.parse_args()
    if args.time_official:
        return time_official(args)
    if not (pathlib.Path(args.official_src) / "modeling" / "unimedvl" / "bagel.py").is_file():
        raise SystemExit(f"--official-src {args.official_src}: no modeling/unimedvl/bagel.py (give the codes/ "
                         "directory of github.com/uni-medical/UniMedVL)")
    if not args.torch_python or not os.access(args.torch_python, os.X_OK):
        raise SystemExit(f"--torch-python {args.torch_python}: not an executable python (a venv with "
                         "torch==2.13.0 transformers==4.49.0 accelerate safetensors einops pillow)")
    out_dir = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="official-reference-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{args.config}: our side (export to {out_dir}, then fwd+bwd)", flush=True)
    rows = {r["length"]: r for r in export_and_time_ours(args, out_dir)}  # the VAE row first
    print("official side (PyTorch)", flush=True)
    cmd = [args.torch_python, __file__, "--official-src", args.official_src, "--time-official", str(out_dir),
           "--pack-lengths", *map(str, args.pack_lengths), "--repeats", str(args.repeats), "--threads",
           str(args.threads), "--vae-images", str(args.vae_images), "--vae-size", str(args.vae_size)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"the official side failed (exit {proc.returncode}): {' '.join(cmd)}")
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows[r["length"]].update(r)
    print(f"\nfp32 weights, median of {args.repeats} warm calls (torch threads {args.threads}); fwd+bwd: one pack\n")
    print("| work | ours s | official s | ours vs official speed | our loss | official loss |")
    print("|:--|--:|--:|--:|--:|--:|")
    for length, r in rows.items():
        work = (f"VAE encode, {args.vae_images} images {args.vae_size}x{args.vae_size}" if length == VAE_ROW
                else f"fwd+bwd, T={length}")
        losses = "| – | – |" if length == VAE_ROW else f"| {r['ours_loss']:.5f} | {r['official_loss']:.5f} |"
        print(f"| {work} | {r['ours_s']:.3f} | {r['official_s']:.3f} | {r['official_s'] / r['ours_s']:.2f}x {losses}")


if __name__ == "__main__":
    main()
