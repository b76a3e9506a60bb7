"""Command-line entry points (see README): unimedvl-import, unimedvl-export and unimedvl-eval-vqa."""

from __future__ import annotations

import argparse
import sys
import time

from unimedvl_jax import entry_point


def import_main(argv=None) -> int:
    """unimedvl-import: official checkpoint directory -> params checkpoint (orbax)."""
    p = argparse.ArgumentParser(
        prog="unimedvl-import",
        description="Import an official UniMedVL/BAGEL checkpoint directory (llm_config.json, vit_config.json, "
                    "ema.safetensors, ae.safetensors) into an orbax params checkpoint usable for fine-tuning, "
                    "inference and export. Strict: every missing, unexpected or mis-shaped key is reported.")
    p.add_argument("--official", required=True, help="official checkpoint directory to read")
    p.add_argument("--out", required=True, help="params checkpoint directory to create (must not exist)")
    p.add_argument("--weights-file", default="ema.safetensors",
                   help="LLM/ViT/bridge weights file inside --official: ema.safetensors (default), "
                        "model.safetensors (raw, non-EMA) or ema_bf16.safetensors")
    p.add_argument("--allow-optional-extras", action="store_true",
                   help="skip the documented optional keys (UniMedVL's vae_model.* copy inside the weights "
                        "file) instead of failing on them")
    p.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of the imported master weights (default: the config's, float32)")
    p.add_argument("--config-override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field after reading the JSON files, e.g. "
                        "attention_backend=chunked (repeatable; values parsed as JSON when possible)")
    args = p.parse_args(argv)
    entry_point.start("unimedvl-import")
    from unimedvl_jax.interop.checkpoint_import import import_official
    from unimedvl_jax.interop.official_config import model_config_from_official
    from unimedvl_jax.interop.params_checkpoint import save_params_checkpoint

    cfg = model_config_from_official(args.official)
    for item in args.config_override:
        _override(cfg, item)
    if args.param_dtype:
        cfg.param_dtype = args.param_dtype
    start = time.time()
    model, cfg, report = import_official(args.official, cfg=cfg, weights_file=args.weights_file,
                                         allow_optional_extras=args.allow_optional_extras)
    print(f"read {report.loaded} tensors in {time.time() - start:.1f}s"
          + (f"; skipped {len(report.skipped_optional)} optional keys" if report.skipped_optional else ""))
    save_params_checkpoint(args.out, model, cfg)
    print(f"wrote params checkpoint {args.out}")
    return 0


def export_main(argv=None) -> int:
    """unimedvl-export: params checkpoint -> official checkpoint directory."""
    p = argparse.ArgumentParser(
        prog="unimedvl-export",
        description="Export a params checkpoint to the official UniMedVL/BAGEL layout: ema.safetensors (exactly the "
                    "official key set), ae.safetensors, llm_config.json, vit_config.json (+ bagel_config.json and "
                    "tokenizer files). Tensors are streamed one at a time; the directory appears only when "
                    "complete.")
    p.add_argument("--checkpoint", required=True, help="params checkpoint directory (from unimedvl-import or training)")
    p.add_argument("--out", required=True, help="official-layout directory to create")
    p.add_argument("--weights", default="ema", choices=["ema", "params"],
                   help="which weights to export: EMA (default; falls back to raw params when the checkpoint has "
                        "no EMA) or the raw params")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="tensor dtype in the safetensors files (default bfloat16, as released)")
    p.add_argument("--tokenizer-dir", default=None,
                   help="directory with tokenizer files (vocab.json, merges.txt, tokenizer.json, ...) to copy")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    entry_point.start("unimedvl-export")
    from unimedvl_jax.interop.checkpoint_export import export_official
    from unimedvl_jax.interop.params_checkpoint import load_params_checkpoint

    start = time.time()
    model, cfg = load_params_checkpoint(args.checkpoint, weights=args.weights)
    report = export_official(model, cfg, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer_dir,
                             overwrite=args.overwrite)
    print(f"exported {report.tensors} ({report.dtype}) to {report.out_dir} in {time.time() - start:.1f}s")
    return 0


def _override(cfg, item: str):
    import json
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--config-override {item!r}: expected KEY=VALUE")
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    if leaf not in node:
        raise SystemExit(f"--config-override {item!r}: unknown config field {key!r}")
    node[leaf] = value


def eval_vqa_main(argv=None) -> int:
    """unimedvl-eval-vqa: accuracy on held-out questions with ground-truth answers (e.g. modality questions)."""
    p = argparse.ArgumentParser(
        prog="unimedvl-eval-vqa",
        description="Ask a trained model the held-out VQA questions of a built dataset split (default: the "
                    "imaging-modality questions of unimed-mini's test split), decode greedily with the KV cache and "
                    "report normalised exact-match accuracy per modality next to the majority-answer baseline.")
    p.add_argument("--checkpoint", required=True, help="params checkpoint (e.g. <workdir>/final)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json (e.g. <workdir>/tokenizer)")
    p.add_argument("--data-dir", default="data", help="TFDS data dir holding the built dataset")
    p.add_argument("--dataset", default="unimed_mini", help="built dataset config name")
    p.add_argument("--split", action="append", default=None, help="split(s) to evaluate (repeatable; default test)")
    p.add_argument("--questions", default="modality_name",
                   help="question family from data_pipelines/sources/medical_text.py QUESTIONS (default modality_name)")
    p.add_argument("--weights", default="ema", choices=["ema", "params"], help="EMA (default) or raw weights")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions per split")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", default=None, help="write the full report (every answer) as JSON here")
    args = p.parse_args(argv)
    entry_point.start("unimedvl-eval-vqa")
    import json

    from data_pipelines.loader import open_split
    from data_pipelines.sources.medical_text import QUESTIONS
    from data_pipelines.transforms import ImageTransform
    from unimedvl_jax.eval.vqa import evaluate, vqa_items
    from unimedvl_jax.interop.params_checkpoint import load_params_checkpoint
    from unimedvl_jax.tokenizers import load_tokenizer

    if args.questions not in QUESTIONS:
        raise SystemExit(f"--questions {args.questions!r} not in {sorted(QUESTIONS)}")
    model, cfg = load_params_checkpoint(args.checkpoint, weights=args.weights)
    data_cfg = _data_section(args)
    tokenizer = load_tokenizer(args.tokenizer)
    transform = ImageTransform.from_config(data_cfg.vit_transform)
    report = {}
    for split in args.split or ["test"]:
        items = vqa_items(open_split(data_cfg, split), QUESTIONS[args.questions], limit=args.limit)
        res = evaluate(model, tokenizer, transform, items, max_new_tokens=args.max_new_tokens)
        report[split] = res
        print(f"{split}: {res['n']} questions, accuracy {res['accuracy']:.3f} "
              f"(majority answer {res['majority_answer']!r}: {res['majority_baseline']:.3f})")
        for modality, r in res["per_modality"].items():
            print(f"  {modality:6s} n={r['n']:4d} accuracy {r['accuracy']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _data_section(args):
    """Data settings for evaluation: the ViT transform of the training run (<workdir>/config.json next to final/)
    when present, else the defaults; data dir and dataset from the command line."""
    import json
    import os

    from unimedvl_jax.data_config import data_config

    data_cfg = data_config()
    run_config = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "config.json")
    if os.path.exists(run_config):
        with open(run_config) as f:
            data_cfg.vit_transform.update(json.load(f).get("data", {}).get("vit_transform", {}))
    data_cfg.data_dir, data_cfg.dataset = args.data_dir, args.dataset
    return data_cfg


if __name__ == "__main__":
    sys.exit(import_main())
