"""The UniMedVL paper's own numbers, shown next to ours in every evaluation report for reference.

Source: the UniMedVL paper's result tables as transcribed in docs/evaluation.md §8.2 (VQA accuracy in %,
text-to-image gFID / BiomedCLIP score averaged over eight modalities, interleaved tasks PSNR / SSIM). The paper's
protocol details (prompts, answer matching, open/closed split, FID feature extractor and sample counts, the
paired tasks' data) are UNVERIFIED (docs/evaluation.md §8.1), so a difference to these numbers is not by itself a
bug of the port.
"""

from __future__ import annotations

SOURCE = "UniMedVL paper (as transcribed in docs/evaluation.md §8.2); protocol details unverified"

# benchmark -> metric -> value. VQA: accuracy in %.
VQA_ACCURACY = {"vqa-rad": 61.9, "slake": 75.4, "pathvqa": 53.5, "omnimedvqa": 85.8, "gmai": 60.75}
# Text-to-image, averaged over eight modalities (CFP, CXR, CT, HIS, MRI, OCT, ultrasound, endoscopy).
GENERATION = {"gfid": 96.29, "biomedclip": 0.706}
# Interleaved tasks: our task name (a PairedItem's `task` category) -> (paper's name, PSNR dB, SSIM).
PAIRED = {
    "he-to-ihc": ("H&E→IHC virtual staining", 20.27, 0.456),
    "mri-sr-4x": ("MRI 4× super-resolution", 27.29, 0.890),
    "t2-flair": ("T2↔FLAIR translation", 25.07, 0.882),
}


def paper_reference(benchmark: str) -> dict:
    """The paper's numbers for a report: {"accuracy": % or None (a benchmark the paper does not report, e.g. our
    manifest)} for VQA, {"gfid", "biomedclip"} for fid, {task: {"name", "psnr", "ssim"}} for paired."""
    if benchmark == "fid":
        return dict(GENERATION)
    if benchmark == "paired":
        return {task: {"name": name, "psnr": db, "ssim": s} for task, (name, db, s) in PAIRED.items()}
    return {"accuracy": VQA_ACCURACY.get(benchmark)}
