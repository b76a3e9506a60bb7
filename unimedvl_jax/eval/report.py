"""The evaluation report: `<out>/report.json` (everything) and `<out>/report.md` (the tables), with the UniMedVL
paper's numbers in the same tables for reference (docs/evaluation.md "Running an evaluation").

A report is a dict with `kind` ("vqa", "paired" or "fid"), `benchmark`, `settings`, `run` (throughput),
`reading` (what the reader kept and skipped), `scores` (scoring.summarize / image_to_image.summarize_paired /
generation_fid's summary) and `paper` (paper_results).
"""

from __future__ import annotations

import json
import math
import os
import pathlib

from unimedvl_jax.eval import paper_results

KINDS = ("vqa", "paired", "fid")


def _num(value, digits: int = 3, *, scale: float = 1.0) -> str:
    """A table cell: the number rounded, '—' for None / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value * scale:.{digits}f}"


def _counts(counts: dict) -> str:
    """'a: 2, b: 1', or 'none'."""
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _run_lines(report: dict) -> list[str]:
    run = report["run"]
    rate = run.get("items_per_s")
    return [f"Run: {run['done_this_run']} item(s) done in this run, {run['done_earlier']} by an earlier run "
            f"(resumed), {run['processes']} process(es) × {run['devices_per_process']} device(s), "
            f"batch size {run['batch_size']}, {run['seconds']:.1f} s, "
            f"{'—' if rate is None else f'{rate:.3f}'} items/s (model loading excluded, compilation included)."]


def _reading_lines(report: dict) -> list[str]:
    reading = report.get("reading")
    if not reading:
        return []
    lines = [f"Data: {reading['items']} item(s) read from `{reading['source']}`; {reading['bad_rows']} bad row(s) "
             f"skipped ({_counts(reading['bad_by_reason'])}); left out by option: {_counts(reading['filtered'])}; "
             f"notes: {_counts(reading['notes'])}."]
    if report["settings"].get("limit") is not None:
        lines.append(f"Limited to the first {report['settings']['limit']} item(s) (--limit).")
    return lines


def _vqa_lines(report: dict) -> list[str]:
    scores, paper = report["scores"], report["paper"]
    rows = [["accuracy (%)", str(scores["n"]), _num(scores["accuracy"], 2, scale=100),
             _num(paper.get("accuracy"), 2)]]
    for kind, s in scores["by_answer_type"].items():
        metric = "exact match (%)" if kind == "open" else "accuracy (%)"
        value = s["exact_match"] if kind == "open" else s["accuracy"]
        rows.append([f"{kind} questions: {metric}", str(s["n"]), _num(value, 2, scale=100), "—"])
        if kind == "open":
            rows.append(["open questions: token recall (%)", str(s["n"]), _num(s["mean_recall"], 2, scale=100), "—"])
        if kind == "closed" and s["llava_med"]["accuracy"] is not None:
            rows.append([f"closed, LLaVA-Med rule (%, {s['llava_med']['counted']} counted)",
                         str(s["n"]), _num(s["llava_med"]["accuracy"], 2, scale=100), "—"])
    lines = _table(["metric", "n", "ours", "UniMedVL (paper)"], rows)
    lines += ["", f"Missing predictions: {scores['missing_predictions']}; unparseable answers: "
              + ", ".join(f"{k} {s['unparseable']}" for k, s in scores["by_answer_type"].items()) + "."]
    for column, groups in scores["by_category"].items():
        lines += ["", f"### By {column}", ""]
        lines += _table([column, "n", "accuracy (%)"],
                        [[value, str(g["n"]), _num(g["accuracy"], 2, scale=100)] for value, g in groups.items()])
    return lines


def _paired_lines(report: dict) -> list[str]:
    scores, paper = report["scores"], report["paper"]
    tasks = scores["by_category"].get("task", {})
    rows = [["all", str(scores["scored"]), _num(scores["psnr"], 2), _num(scores["ssim"]), "—", "—"]]
    for task, g in tasks.items():
        ref = paper.get(task)
        rows.append([task, str(g["n"]), _num(g["psnr"], 2), _num(g["ssim"]),
                     "—" if ref is None else f"{ref['psnr']:.2f}", "—" if ref is None else f"{ref['ssim']:.3f}"])
    for task, ref in paper.items():
        if task not in tasks:
            rows.append([f"{task} ({ref['name']}; not in this run)", "—", "—", "—", f"{ref['psnr']:.2f}",
                         f"{ref['ssim']:.3f}"])
    lines = _table(["task", "n", "PSNR (dB)", "SSIM", "UniMedVL PSNR (paper)", "UniMedVL SSIM (paper)"], rows)
    lines += ["", f"Images compared at the output's size (data range 255); {scores['target_resized']} target(s) "
              f"resized to it; {scores['missing_results']} item(s) without a result; identical pairs (infinite "
              f"PSNR, left out of the PSNR mean): {scores['identical']}."]
    for column, groups in scores["by_category"].items():
        if column == "task":
            continue
        lines += ["", f"### By {column}", ""]
        lines += _table([column, "n", "PSNR (dB)", "SSIM"],
                        [[v, str(g["n"]), _num(g["psnr"], 2), _num(g["ssim"])] for v, g in groups.items()])
    return lines


def _fid_lines(report: dict) -> list[str]:
    scores, paper = report["scores"], report["paper"]
    rows = [[m, str(s["generated"]), str(s["reference"]), _num(s["fid"], 2)] for m, s in scores["by_modality"].items()]
    rows.append([f"average over {len(scores['by_modality'])} modalities", "—", "—", _num(scores["average_fid"], 2)])
    lines = _table(["modality", "generated", "reference", "FID"], rows)
    lines += ["", f"UniMedVL (paper): gFID {paper['gfid']} / BiomedCLIP score {paper['biomedclip']}, averaged over "
              "eight modalities (BiomedCLIP score not computed here)."]
    if scores.get("unused_reference_modalities"):
        lines.append(f"Reference folders without prompts (not evaluated): {scores['unused_reference_modalities']}.")
    return lines


def render_markdown(report: dict) -> str:
    """report.md: title, settings, the score table(s) with the paper's numbers, breakdowns, throughput."""
    kind = report["kind"]
    if kind not in KINDS:
        raise ValueError(f"report kind {kind!r} not in {KINDS}")
    settings = report["settings"]
    lines = [f"# unimedvl-eval: {report['benchmark']}", "",
             f"Checkpoint `{settings['checkpoint']}` ({report['model']}), data `{settings['data']}`.", ""]
    lines += _reading_lines(report) + _run_lines(report) + [""]
    lines += {"vqa": _vqa_lines, "paired": _paired_lines, "fid": _fid_lines}[kind](report)
    lines += ["", f"Paper numbers: {paper_results.SOURCE}.", "",
              "Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())), ""]
    return "\n".join(lines)


def write_report(out_dir, report: dict) -> tuple[pathlib.Path, pathlib.Path]:
    """Write report.json and report.md into out_dir (each atomically); returns their paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "report.json", out / "report.md")
    texts = (json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n", render_markdown(report))
    for path, text in zip(paths, texts):
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return paths
