"""Command-line entry points (see README): unimedvl-import, unimedvl-export and unimedvl-eval-vqa.

Each command is an entry_point.Command (absl flags, --help); `*_main(argv)` take the arguments after the program
name (default sys.argv[1:]) and return the exit status.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

from data_pipelines.loader import open_split
from data_pipelines.sources.medical_text import QUESTIONS
from data_pipelines.transforms import ImageTransform
from unimedvl_jax import entry_point
from unimedvl_jax.data_config import data_config
from unimedvl_jax.errors import UserError, read_json
from unimedvl_jax.eval.vqa import evaluate, vqa_items
from unimedvl_jax.interop.checkpoint_export import export_official
from unimedvl_jax.interop.checkpoint_import import import_official
from unimedvl_jax.interop.official_config import model_config_from_official
from unimedvl_jax.interop.params_checkpoint import load_params_checkpoint, save_params_checkpoint
from unimedvl_jax.tokenizers import load_tokenizer


# --- unimedvl-import -----------------------------------------------------------------------------------------------
def _import_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("official", None, "official checkpoint directory to read", flag_values=fv)
    flags.DEFINE_string("out", None, "params checkpoint directory to create (must not exist)", flag_values=fv)
    flags.DEFINE_string("weights-file", "ema.safetensors", "LLM/ViT/bridge weights file inside --official: "
                        "ema.safetensors, model.safetensors (raw, non-EMA) or ema_bf16.safetensors", flag_values=fv)
    flags.DEFINE_bool("allow-optional-extras", False, "skip the documented optional keys (UniMedVL's vae_model.* "
                      "copy inside the weights file) instead of failing on them", flag_values=fv)
    flags.DEFINE_enum("param-dtype", None, ["float32", "bfloat16"], "dtype of the imported master weights "
                      "(default: the config's, float32)", flag_values=fv)
    flags.DEFINE_multi_string("config-override", [], "KEY=VALUE: override a model config field after reading the "
                              "JSON files, e.g. attention_backend=chunked (values parsed as JSON when possible)",
                              flag_values=fv)


def _import(args) -> int:
    """unimedvl-import: official checkpoint directory -> params checkpoint (orbax).

        unimedvl-import --official DIR --out CKPT [--weights-file model.safetensors] \\
            [--config-override attention_backend=chunked ...]

    Imports an official UniMedVL/BAGEL checkpoint directory (llm_config.json, vit_config.json, ema.safetensors,
    ae.safetensors) into an orbax params checkpoint usable for fine-tuning, inference and export. Strict: every
    missing, unexpected or mis-shaped key is reported.
    """
    entry_point.start("unimedvl-import")
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


IMPORT = entry_point.Command("unimedvl-import", _import.__doc__, _import_flags, required=("official", "out"))


def import_main(argv=None) -> int:
    """Console-script entry point of unimedvl-import."""
    return IMPORT.run(_import, argv)


def _override(cfg, item: str):
    key, sep, value = item.partition("=")
    if not sep:
        raise entry_point.UsageError(f"--config-override {item!r}: expected KEY=VALUE")
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
        if part not in node or not hasattr(node[part], "keys"):
            raise entry_point.UsageError(f"--config-override {item!r}: unknown config section {part!r}")
        node = node[part]
    if leaf not in node:
        raise entry_point.UsageError(f"--config-override {item!r}: unknown config field {key!r}")
    node[leaf] = value


# --- unimedvl-export -----------------------------------------------------------------------------------------------
def _export_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "params checkpoint directory (from unimedvl-import or training)",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "official-layout directory to create", flag_values=fv)
    flags.DEFINE_enum("weights", "ema", ["ema", "params"], "which weights to export: EMA (falls back to raw "
                      "params when the checkpoint has no EMA) or the raw params", flag_values=fv)
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "tensor dtype in the safetensors files "
                      "(bfloat16 as released)", flag_values=fv)
    flags.DEFINE_string("tokenizer-dir", None, "directory with tokenizer files (vocab.json, merges.txt, "
                        "tokenizer.json, ...) to copy", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace --out if it exists", flag_values=fv)


def _export(args) -> int:
    """unimedvl-export: params checkpoint -> official checkpoint directory.

        unimedvl-export --checkpoint runs/tiny/final --out export [--tokenizer-dir runs/tiny/tokenizer] \\
            [--weights params --dtype float32 --overwrite]

    Writes the official UniMedVL/BAGEL layout: ema.safetensors (exactly the official key set), ae.safetensors,
    llm_config.json, vit_config.json (+ bagel_config.json and tokenizer files). Tensors are streamed one at a
    time; the directory appears only when complete.
    """
    entry_point.start("unimedvl-export")
    start = time.time()
    model, cfg = load_params_checkpoint(args.checkpoint, weights=args.weights)
    report = export_official(model, cfg, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer_dir,
                             overwrite=args.overwrite)
    print(f"exported {report.tensors} ({report.dtype}) to {report.out_dir} in {time.time() - start:.1f}s")
    return 0


EXPORT = entry_point.Command("unimedvl-export", _export.__doc__, _export_flags, required=("checkpoint", "out"))


def export_main(argv=None) -> int:
    """Console-script entry point of unimedvl-export."""
    return EXPORT.run(_export, argv)


# --- unimedvl-eval-vqa ---------------------------------------------------------------------------------------------
def _eval_vqa_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "params checkpoint (e.g. <workdir>/final)", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer directory or tokenizer.json (e.g. <workdir>/tokenizer)",
                        flag_values=fv)
    flags.DEFINE_string("data-dir", "data", "TFDS data dir holding the built dataset", flag_values=fv)
    flags.DEFINE_string("dataset", "unimed_mini", "built dataset config name", flag_values=fv)
    flags.DEFINE_multi_string("split", ["test"], "split to evaluate", flag_values=fv)
    flags.DEFINE_enum("questions", "modality_name", sorted(QUESTIONS), "question family of "
                      "data_pipelines/sources/medical_text.py QUESTIONS", flag_values=fv)
    flags.DEFINE_enum("weights", "ema", ["ema", "params"], "EMA or raw weights", flag_values=fv)
    flags.DEFINE_integer("limit", None, "at most this many questions per split", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max-new-tokens", 16, "greedy decoding budget per answer", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("out", None, "write the full report (every answer) as JSON here", flag_values=fv)


def _eval_vqa(args) -> int:
    """unimedvl-eval-vqa: accuracy on held-out questions with ground-truth answers (e.g. modality questions).

        unimedvl-eval-vqa --checkpoint runs/tiny/final --tokenizer runs/tiny/tokenizer --data-dir data \\
            [--split test --split val --questions modality_name --out report.json]

    Asks a trained model the held-out VQA questions of a built dataset split (default: the imaging-modality
    questions of unimed-mini's test split), decodes greedily with the KV cache and reports normalised exact-match
    accuracy per modality next to the majority-answer baseline.
    """
    entry_point.start("unimedvl-eval-vqa")
    model, cfg = load_params_checkpoint(args.checkpoint, weights=args.weights)
    data_cfg = _data_section(args)
    tokenizer = load_tokenizer(args.tokenizer)
    transform = ImageTransform.from_config(data_cfg.vit_transform)
    report = {}
    for split in args.split:
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


EVAL_VQA = entry_point.Command("unimedvl-eval-vqa", _eval_vqa.__doc__, _eval_vqa_flags,
                               required=("checkpoint", "tokenizer"))


def eval_vqa_main(argv=None) -> int:
    """Console-script entry point of unimedvl-eval-vqa."""
    return EVAL_VQA.run(_eval_vqa, argv)


def _data_section(args):
    """Data settings for evaluation: the ViT transform of the training run (<workdir>/config.json next to final/)
    when present, else the defaults; data dir and dataset from the command line."""
    data_cfg = data_config()
    run_config = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "config.json")
    if os.path.exists(run_config):
        run = read_json(run_config, what="training run config (JSON)")
        transform = run.get("data", {}).get("vit_transform", {}) if isinstance(run, dict) else None
        if not isinstance(transform, dict):
            raise UserError(f"{run_config}: data.vit_transform is not a JSON object")
        data_cfg.vit_transform.update(transform)
    data_cfg.data_dir, data_cfg.dataset = args.data_dir, args.dataset
    return data_cfg


if __name__ == "__main__":
    sys.exit(import_main())
