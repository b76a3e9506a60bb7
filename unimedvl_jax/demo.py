"""unimedvl-demo: the whole product on one machine, end to end, with progress throughout.

    unimedvl-demo --workdir runs/demo [--config=configs/tiny.py] [--config.curriculum.stage_steps=(300,300,300)]

1. builds unimed-mini into config.data.data_dir (when missing);
2. trains the tiny FLUX-architecture VAE on the train split's images (<workdir>/vae, train/vae_training.py);
3. trains the tiny UniMedVL through the three curriculum stages with that VAE installed and frozen
   (<workdir>/train, resumable: rerunning the command continues where it stopped);
4. asks the test split's questions whose answer is visible in the image (modality, plane, region, view, colour)
   and scores each question type, overall and per modality, next to the majority-answer baseline;
5. generates images for one training prompt per modality and asks the model which modality each one shows
   (cycle check);
6. runs 2× super-resolution on held-out images and compares PSNR with the bicubic input;
7. writes <workdir>/samples.png (grid), <workdir>/report.md and report.json;
8. exports the EMA weights to the official PyTorch layout (<workdir>/export, bf16, with the tokenizer).
Steps 2-3 are skipped when their outputs exist.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from data_pipelines.loader import open_split
from data_pipelines.pipeline import source_records
from data_pipelines.prepare import ensure_dataset
from data_pipelines.schema import decode_image
from data_pipelines.sources.medical_text import QUESTIONS
from unimedvl_jax import entry_point
from unimedvl_jax.errors import UserError, read_json
from unimedvl_jax.eval.vqa import answer_image, evaluate, family_items, normalize, vqa_items
from unimedvl_jax.image_metrics import psnr
from unimedvl_jax.inference.interleave import edit_image, text_to_image
from unimedvl_jax.inference.loading import load_for_inference
from unimedvl_jax.interop.checkpoint_export import export_official
from unimedvl_jax.train.loop import train
from unimedvl_jax.train.train_config import total_steps
from unimedvl_jax.train.vae_training import train_vae

# Question types whose answer is visible in the image (data_pipelines/sources/medical_text.py QUESTIONS).
VISIBLE_FAMILIES = ("modality_name", "plane", "region", "view", "color")
MAX_QUESTIONS_PER_SCAN = 8  # per question type and source scan: a volume's slices are not independent questions
# What the default demo run should reach (the learning check of the report): modality macro-accuracy over the
# modalities with >= 2 test scans (at least 4 of them), plane accuracy, and the cycle check.
TARGETS = {"modality macro-accuracy": 0.6, "plane accuracy": 0.8, "cycle check": 0.5}
MIN_MACRO_MODALITIES = 4

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", "runs/demo", "demo directory (vae/, train/, export/, report, grid)", flag_values=fv)
    flags.DEFINE_integer("images_per_prompt", 2, "generated images per modality prompt", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("sr_images", 4, "held-out images for the super-resolution check", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_integer("gen_steps", 50, "Euler steps of the image sampler", lower_bound=1, flag_values=fv)


COMMAND = entry_point.Command(
    "unimedvl-demo", __doc__, _define,
    config=entry_point.ConfigFile(default=_DEFAULT_CONFIG, help="experiment config file", lock=False,
                                  example="--config.curriculum.stage_steps=(300,300,300)"))


MODALITY_QUESTION = "What imaging modality is this?"


class Progress:
    """Prints numbered steps with elapsed wall time."""

    def __init__(self, total: int):
        self.start, self.total, self.n, self.timings = time.time(), total, 0, {}

    def step(self, title: str) -> None:
        self.n += 1
        self._mark = time.time()
        self._title = title
        print(f"\n[{self.n}/{self.total}] {title}  (t = {self.elapsed():.0f}s)", flush=True)

    def done(self) -> None:
        self.timings[self._title] = round(time.time() - self._mark, 1)

    def elapsed(self) -> float:
        return time.time() - self.start

    def say(self, text: str) -> None:
        print(f"    {text}", flush=True)


def _resize(image: np.ndarray, hw) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BICUBIC))


def _rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def modality_answers(train_source) -> dict[str, str]:
    """Record modality code -> the train split's most common answer to the modality question."""
    votes = collections.defaultdict(collections.Counter)
    for item in vqa_items(train_source, QUESTIONS["modality_name"]):
        votes[item.modality][item.answer] += 1
    return {m: c.most_common(1)[0][0] for m, c in votes.items()}


def generation_prompts(train_source) -> list[dict]:
    """The first text→image record of every modality in the train split: prompt, modality, reference image."""
    chosen = {}
    for record in source_records(train_source, name="train"):
        if record.task == "generation" and record.modality not in chosen:
            prompt = next(s.text for s in record.segments if s.kind == "text")
            chosen[record.modality] = {"modality": record.modality, "prompt": prompt, "record": record.id,
                                       "reference": _rgb(decode_image(record.images[0], record_id=record.id))}
    return [chosen[m] for m in sorted(chosen)]


def sr_records(sources: list, limit: int) -> list:
    """Up to `limit` held-out 2× super-resolution records, at most one per source scan."""
    out, scans = [], set()
    for name, source in sources:
        for record in source_records(source, name=name):
            if record.meta.get("kind") == "sr2" and record.source_scan not in scans:
                out.append(record)
                scans.add(record.source_scan)
            if len(out) >= limit:
                return out
    return out


def sample_grid(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], cell: int = 128) -> np.ndarray:
    """A labelled grid image: one row per (title, [(caption, image)]), each image fitted into a cell² square."""
    label_h, title_w = 14, 150
    cols = max(len(items) for _, items in rows)
    grid = Image.new("RGB", (title_w + cols * (cell + 4), len(rows) * (cell + label_h + 6)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (title, items) in enumerate(rows):
        y = r * (cell + label_h + 6)
        draw.text((4, y + cell // 2), title[:22], fill="black")
        for c, (caption, image) in enumerate(items):
            scale = cell / max(image.shape[:2])
            im = Image.fromarray(image).resize((max(1, round(image.shape[1] * scale)),
                                                max(1, round(image.shape[0] * scale))), Image.BICUBIC)
            x = title_w + c * (cell + 4)
            grid.paste(im, (x, y))
            draw.text((x, y + cell + 1), caption[:22], fill="black")
    return np.asarray(grid)


def learning_checks(report: dict) -> dict:
    """TARGETS -> {'value', 'target', 'met'} from a report's VQA and cycle results."""
    vqa = report["vqa"]["test"]
    modality = vqa.get("modality_name", {})
    enough = len(modality.get("macro_modalities", [])) >= MIN_MACRO_MODALITIES
    values = {"modality macro-accuracy": modality.get("macro_accuracy") if enough else None,
              "plane accuracy": vqa.get("plane", {}).get("accuracy"),
              "cycle check": report["generation"]["cycle_accuracy"]}
    checks = {k: {"value": v, "target": TARGETS[k], "met": v is not None and v == v and v >= TARGETS[k]}
              for k, v in values.items()}
    if not enough:
        names = modality.get("macro_modalities", [])
        checks["modality macro-accuracy"]["why"] = (
            f"{len(names)} modalities with >= 2 test scans ({', '.join(names) or 'none'}); the check needs "
            f"{MIN_MACRO_MODALITIES}")
    return checks


def _check_value(check: dict) -> str:
    """A learning check's value, or '—' and why it has none."""
    return _f(check["value"]) + (f" ({check['why']})" if "why" in check else "")


def _f(x) -> str:
    return "—" if x is None or x != x else f"{x:.3f}"


def _markdown(report: dict) -> str:
    vqa, gen, sr = report["vqa"]["test"], report["generation"], report["super_resolution"]
    lines = ["# unimedvl_jax demo report", "",
             f"Config `{report['config']}`; {report['train_steps']} train steps; total wall time "
             f"{report['seconds_total']:.0f} s.", "", "## Timings (s)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["timings"].items()]
    lines += ["", "## Learning checks", "", "| check | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {k} | {_check_value(c)} | {c['target']} | {'yes' if c['met'] else '**no**'} |"
              for k, c in learning_checks(report).items()]
    lines += ["", f"## Held-out VQA (test split; at most {MAX_QUESTIONS_PER_SCAN} questions per type and source scan)",
              "", "Macro = mean of the per-modality accuracies over modalities with ≥ 2 test scans; the majority "
              "columns score always giving the most common answer.", "",
              "| question type | n | accuracy | majority answer | majority baseline | macro (modalities) | "
              "majority macro |", "|---|---|---|---|---|---|---|"]
    for family, r in vqa.items():
        lines.append(f"| {family} | {r['n']} | {_f(r['accuracy'])} | {r['majority_answer']} | "
                     f"{_f(r['majority_baseline'])} | {_f(r['macro_accuracy'])} ({len(r['macro_modalities'])}) | "
                     f"{_f(r['majority_macro'])} |")
    modalities = sorted({m for r in vqa.values() for m in r["per_modality"]})
    lines += ["", "Per modality: accuracy (questions / scans), majority baseline in brackets.", "",
              "| modality | " + " | ".join(vqa) + " |", "|---|" + "---|" * len(vqa)]
    for m in modalities:
        cells = []
        for r in vqa.values():
            c = r["per_modality"].get(m)
            cells.append("" if c is None else
                         f"{c['accuracy']:.2f} ({c['n']}/{c['scans']}) [{c['majority_baseline']:.2f}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Text → image, cycle check (the model names the modality of its own images)", "",
              f"Correct: {gen['cycle_correct']} / {gen['n']} = {gen['cycle_accuracy']:.3f}", "",
              "| modality | prompt | expected | model's answers |", "|---|---|---|---|"]
    for p in gen["prompts"]:
        lines.append(f"| {p['modality']} | {p['prompt']} | {p['expected']} | {'; '.join(p['answers'])} |")
    lines += ["", "## 2× super-resolution on held-out images (PSNR vs the full-resolution target, dB)", "",
              "| record | bicubic input | model |", "|---|---|---|"]
    for s in sr["items"]:
        lines.append(f"| {s['record']} | {s['psnr_bicubic']:.2f} | {s['psnr_model']:.2f} |")
    lines += [f"| mean | {sr['mean_psnr_bicubic']:.2f} | {sr['mean_psnr_model']:.2f} |", "",
              f"VAE reconstruction PSNR (val centre crops): {report['vae']['psnr_db']['val']:.2f} dB — an upper "
              "bound for anything generated.", "", f"Exported: `{report['export']}`", "",
              "![samples](samples.png)", ""]
    return "\n".join(lines)


def run_demo(cfg, workdir: str, *, images_per_prompt: int = 2, sr_images: int = 4, gen_steps: int = 50) -> dict:
    """Run the demo (module docstring) and return the report."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    progress = Progress(8)
    vae_dir, train_dir = os.path.join(workdir, "vae"), os.path.join(workdir, "train")

    progress.step(f"dataset unimed-mini in {cfg.data.data_dir}")
    ensure_dataset(cfg.data, console=progress.say)
    progress.done()

    progress.step(f"VAE ({cfg.vae_training.steps} steps) -> {vae_dir}")
    if os.path.exists(os.path.join(vae_dir, "config.json")):
        progress.say("exists: reusing it")
    else:
        train_vae(cfg, vae_dir, console=progress.say)
    vae_config = read_json(os.path.join(vae_dir, "config.json"), what="VAE checkpoint config (JSON)")
    if not isinstance(vae_config, dict) or not isinstance(vae_config.get("report"), dict):
        raise UserError(f"{vae_dir}/config.json: no training report; delete {vae_dir} to train the VAE again")
    vae_report = vae_config["report"]
    progress.done()

    progress.step(f"UniMedVL through the 3 curriculum stages ({total_steps(cfg)} steps) -> {train_dir}")
    cfg.train.init_vae_from = vae_dir
    if os.path.exists(os.path.join(train_dir, "final", "config.json")):
        progress.say("final/ exists: reusing it")
    else:
        train(cfg, train_dir, console=progress.say)
    progress.done()

    progress.step("held-out VQA: questions answerable from the image, test split")
    loaded = load_for_inference(train_dir)
    model, tok = loaded.model, loaded.tokenizer
    items = family_items(open_split(cfg.data, "test"), {f: QUESTIONS[f] for f in VISIBLE_FAMILIES},
                         max_per_scan=MAX_QUESTIONS_PER_SCAN)
    vqa = {"test": {}}
    for family, family_questions in items.items():
        if not family_questions:
            progress.say(f"{family}: no test questions")
            continue
        r = vqa["test"][family] = evaluate(model, tok, loaded.vit_transform, family_questions)
        progress.say(f"{family}: {r['n']} questions, accuracy {r['accuracy']:.3f} (majority {r['majority_answer']!r} "
                     f"{r['majority_baseline']:.3f}); macro over {len(r['macro_modalities'])} modalities "
                     f"{_f(r['macro_accuracy'])} (majority {_f(r['majority_macro'])})")
    progress.done()

    progress.step(f"text → image: one train prompt per modality × {images_per_prompt}, then the cycle check")
    train_source = open_split(cfg.data, cfg.data.train_split)
    expected = modality_answers(train_source)
    prompts, grid_rows, correct, total = [], [], 0, 0
    for p in generation_prompts(train_source):
        answers, cells = [], [("train image", p["reference"])]
        for seed in range(images_per_prompt):
            image = text_to_image(model, tok, p["prompt"], image_shape=loaded.image_size, seed=seed,
                                  num_timesteps=gen_steps).image
            said = answer_image(model, tok, loaded.vit_transform, image, MODALITY_QUESTION)
            ok = p["modality"] in expected and normalize(said) == normalize(expected[p["modality"]])
            correct, total = correct + ok, total + 1
            answers.append(said)
            cells.append((f"seed {seed}: {said}", image))
            Image.fromarray(image).save(os.path.join(workdir, f"generated_{p['modality']}_{seed}.png"))
        progress.say(f"{p['modality']}: {p['prompt']!r} -> model says {answers} (expected "
                     f"{expected.get(p['modality'])!r})")
        prompts.append({k: p[k] for k in ("modality", "prompt", "record")} |
                       {"expected": expected.get(p["modality"]), "answers": answers})
        grid_rows.append((f"T2I {p['modality']}", cells))
    generation = {"n": total, "cycle_correct": correct, "cycle_accuracy": correct / max(total, 1),
                  "prompts": prompts}
    progress.say(f"cycle check: {correct}/{total}")
    progress.done()

    progress.step(f"image → image: 2× super-resolution on {sr_images} held-out images")
    sr_items = []
    for record in sr_records([(s, open_split(cfg.data, s)) for s in ("test", "val")], sr_images):
        low, target = (_rgb(decode_image(b, record_id=record.id)) for b in record.images)
        instruction = next(s.text for s in record.segments if s.kind == "text")
        out = edit_image(model, tok, low, instruction, seed=0, vae_transform=loaded.vae_transform,
                         vit_transform=loaded.vit_transform, num_timesteps=gen_steps).image
        reference = _resize(target, out.shape[:2])
        row = {"record": record.id, "instruction": instruction,
               "psnr_bicubic": psnr(_resize(low, out.shape[:2]), reference, peak=255.0),
               "psnr_model": psnr(out, reference, peak=255.0)}
        sr_items.append(row)
        grid_rows.append((f"SR {record.modality}", [("input (bicubic)", low), ("model", out), ("target", target)]))
        progress.say(f"{record.id}: PSNR bicubic {row['psnr_bicubic']:.2f} dB, model {row['psnr_model']:.2f} dB")
    super_resolution = {"items": sr_items,
                        "mean_psnr_bicubic": float(np.mean([s["psnr_bicubic"] for s in sr_items] or [np.nan])),
                        "mean_psnr_model": float(np.mean([s["psnr_model"] for s in sr_items] or [np.nan]))}
    progress.done()

    progress.step("sample grid and report")
    Image.fromarray(sample_grid(grid_rows)).save(os.path.join(workdir, "samples.png"))
    progress.done()

    export_dir = os.path.join(workdir, "export")
    progress.step(f"export to the official PyTorch layout -> {export_dir}")
    exported = export_official(model, loaded.cfg, export_dir, dtype="bfloat16",
                               tokenizer_dir=os.path.join(train_dir, "tokenizer"), overwrite=True)
    progress.say(", ".join(f"{name}: {n} tensors" for name, n in exported.tensors.items()) + f" ({exported.dtype})")
    progress.done()

    report = {"config": cfg.get("name", "tiny"), "train_steps": total_steps(cfg), "vae": vae_report, "vqa": vqa,
              "generation": generation, "super_resolution": super_resolution, "export": export_dir,
              "timings": progress.timings, "seconds_total": round(progress.elapsed(), 1)}
    report["learning_checks"] = learning_checks(report)
    for name, check in report["learning_checks"].items():
        progress.say(f"{name}: {_check_value(check)} (target {check['target']}: "
                     f"{'met' if check['met'] else 'NOT met'})")
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(_markdown(report))
    print(f"\ndone in {progress.elapsed():.0f}s: {workdir}/report.md, report.json, samples.png, export/", flush=True)
    return report


def run(args) -> None:
    entry_point.start("unimedvl-demo")
    run_demo(args.config, args.workdir, images_per_prompt=args.images_per_prompt, sr_images=args.sr_images,
             gen_steps=args.gen_steps)


def main(argv=None) -> int:
    """Console-script entry point; `argv`: the arguments after the program name (default sys.argv[1:])."""
    return COMMAND.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
