"""Training metrics: per-step rows, clu aggregation over `train.log_every` steps, throughput, model FLOPs and MFU;
written to the console (process 0), TensorBoard event files (tensorboardX, <workdir>/tb) and a JSONL log
(<workdir>/metrics.jsonl).

JSONL rows (one JSON object per line, appended; a restarted run appends to the same file):

  kind="step"     one per train step:
      run, step (1-based: the number of updates done), stage, loss, ce, mse, grad_norm, lr, finite, skipped,
      consecutive_skipped, n_ce, n_mse, real_tokens, samples, model_flops, step_time_s, compile_step (the first
      step of a run: its time includes compilation),
      record_ids (one list of record ids per pack of this process, in pack order; when train.log_record_ids),
      pack_rows (the global batch row of each of those packs; with several processes or data shards)
  kind="summary"  one per log interval (and at the end of a run):
      run, step, stage, lr, loss, ce, mse, grad_norm (averages over the interval's finite steps, clu.metrics),
      steps, skipped_steps (in the interval), skipped_total, tokens_per_s, samples_per_s, model_flops_per_s,
      mfu (only when train.peak_flops > 0), elapsed_s

`run` identifies one process start (so tests can tell an interrupted run from its restart).
Only process 0 writes metrics.jsonl, TensorBoard and the console; with `process_rows` (several processes and
train.log_record_ids) process k > 0 writes its step rows (its packs' record ids) to metrics.process<k>.jsonl.
Throughput (tokens/s, samples/s, FLOPs/s) is over the interval's wall time excluding the first step of a run
(it includes compilation) whenever the interval has other steps. Tokens and samples are those of this process's
packs × process_count (each process's share of the global batch is assumed to be similar).

Model FLOPs of one step (the usual "6·N·D + attention" estimate, forward + backward = 3 × forward):

  6 · N_llm · T_real                  N_llm = LLM decoder-layer parameters used by one token: with MoT each
                                      token goes through one expert, so the *_moe_gen copies are not counted
  + 6 · H · V · N_ce                  the LM head, at CE positions only
  + 6 · (N_vit + N_connector) · P     ViT and connector per real ViT patch
  + 6 · N_latent · V_tok              vae2llm, llm2vae and the timestep embedder per real latent token
  + 12 · L · H · pairs                LLM attention: QKᵀ and AV are 2·2·H FLOPs per (query, key) pair,
                                      ×3 for fwd+bwd = 12·H per pair
  + 12 · L_vit · H_vit · Σ_i p_i²     ViT attention: full attention over the p_i patches of each image i

`pairs` follows one of ATTENTION_CONVENTIONS:
  causal   Σ_s n_s²/2 over the real tokens n_s of each sample s (causal-halved per sample; what the trainer logs)
  mask     the (query, key) pairs the docs/packed_sequence.md §4.3 mask allows between real tokens (mask_pairs):
           causal text plus full / noise image blocks, minus the noised blocks hidden from later tokens
  maxtext  T²/2 over the whole pack length T, as a packing-unaware causal-halved count (MaxText's convention)
  full     T² (and P² for the ViT): every pair the dense and chunked backends compute, masked or not

`capacity=True` counts the linear terms over the static buffers the compiled step runs instead of the real
tokens: each MoT expert over its routing buffer (C_und + C_gen rows; layers without an expert copy over all T),
the LM head over C_ce, the ViT over P and the latent bridges over V slots, padding slots included.

The frozen VAE encoder (a forward-only convolution stack), norms and the loss are not counted.
MFU = model FLOPs per second / (train.peak_flops · number of devices); omitted when train.peak_flops is 0.
PEAK_BF16_TFLOPS / peak_tflops give the dense bf16 peak of the accelerators we know by device_kind.
"""

# no `from __future__ import annotations`: clu.metrics.Collection reads its field annotations as classes

import dataclasses
import json
import os
import time

import jax
import numpy as np
from clu import metrics as clu_metrics
from flax import struct

from unimedvl_jax.packed_batch import CAUSAL, NOISE, PAD, contiguous_runs
from unimedvl_jax.train.step import param_path

STEP_FIELDS = ("run", "step", "stage", "loss", "ce", "mse", "grad_norm", "lr", "finite", "skipped",
               "consecutive_skipped", "n_ce", "n_mse", "real_tokens", "samples", "model_flops", "step_time_s",
               "compile_step", "record_ids")
SUMMARY_FIELDS = ("run", "step", "stage", "lr", "loss", "ce", "mse", "grad_norm", "steps", "skipped_steps",
                  "skipped_total", "tokens_per_s", "samples_per_s", "model_flops_per_s", "elapsed_s")


# ----------------------------------------------------------------------------------------------------------
# model FLOPs
# ----------------------------------------------------------------------------------------------------------
ATTENTION_CONVENTIONS = ("causal", "mask", "maxtext", "full")

# Dense bf16 peak TFLOP/s of one device, by a lower-cased jax device_kind (exact for TPUs, a substring for GPUs).
PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "tpu v5": 459.0, "tpu v5p": 459.0, "tpu v6 lite": 918.0,
                    "tpu v6e": 918.0}


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a device from its jax device_kind; None when unknown (e.g. CPU)."""
    kind = device_kind.lower().strip()
    if kind in PEAK_BF16_TFLOPS:
        return PEAK_BF16_TFLOPS[kind]
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if not k.startswith("tpu") and k in kind), None)


def _runs(ids: np.ndarray):
    """(first, last) position of the contiguous run of equal ids that each position belongs to."""
    starts, lengths = contiguous_runs(ids)
    return np.repeat(starts, lengths), np.repeat(starts + lengths - 1, lengths)


def sample_lengths(batch) -> np.ndarray:
    """Real tokens of each sample of one numpy PackedBatch (padding excluded; order of sample ids)."""
    real = np.asarray(batch.token_kind) != PAD
    return np.unique(np.asarray(batch.sample_id)[real], return_counts=True)[1]


def mask_pairs(batch) -> int:
    """Number of (query, key) pairs among real tokens that the §4.3 attention mask allows, for one numpy PackedBatch
    in the packer's layout (contiguous samples and splits, index = slot; models/attention_mask.py)."""
    mode = np.asarray(batch.split_mode)
    first, _ = _runs(np.asarray(batch.sample_id))
    split_first, split_last = _runs(np.asarray(batch.split_id))
    # A query sees keys from its sample's start to itself (causal) or to its split's end (full / noise), except
    # the noised-image keys of other splits; its own noise split lies wholly inside that range.
    last = np.where(mode == CAUSAL, np.arange(mode.size), split_last)
    noise_before = np.r_[0, np.cumsum(mode == NOISE)]
    seen = (last - first + 1 - (noise_before[last + 1] - noise_before[first])
            + np.where(mode == NOISE, split_last - split_first + 1, 0))
    return int(seen[np.asarray(batch.token_kind) != PAD].sum())


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Parameter counts and sizes the FLOP estimate needs (see module docstring)."""

    n_llm: int        # decoder-layer params per token (one MoT expert)
    n_head: int       # H · V
    n_vit: int        # ViT + connector params
    n_latent: int     # vae2llm + llm2vae + time embedder params
    llm_layers: int
    llm_hidden: int
    vit_layers: int
    vit_hidden: int
    n_llm_shared: int = 0  # of n_llm: params without a *_moe_gen copy, run on all T tokens (dense, MoE attention)

    @classmethod
    def from_params(cls, params, model_cfg) -> "FlopModel":
        """Count parameters by path in an nnx.State of params (abstract or concrete)."""
        n_vit = n_latent = 0
        layers = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            name, size = param_path(path), int(np.prod(leaf.shape))
            if name.startswith("language_model.model.layers."):
                layers[name] = size
            elif name.startswith(("vit_model.", "connector.")):
                n_vit += size
            elif name.startswith(("vae2llm.", "llm2vae.", "time_embedder.")):
                n_latent += size
        routed = {name.replace("_moe_gen", "") for name in layers if "_moe_gen" in name}
        one_expert = {name: size for name, size in layers.items() if "_moe_gen" not in name}
        llm, vit = model_cfg.llm, model_cfg.vit
        return cls(n_llm=sum(one_expert.values()), n_head=int(llm.hidden_size) * int(llm.vocab_size), n_vit=n_vit,
                   n_latent=n_latent, llm_layers=int(llm.num_layers), llm_hidden=int(llm.hidden_size),
                   vit_layers=int(vit.num_layers), vit_hidden=int(vit.hidden_size),
                   n_llm_shared=sum(size for name, size in one_expert.items() if name not in routed))

    def pack_flop_terms(self, batch, sample_tokens=None, *, attention: str = "causal",
                        capacity: bool = False) -> dict[str, float]:
        """The terms of pack_flops by part: llm, head, vit, latent, attention, vit_attention (see module
        docstring)."""
        if attention not in ATTENTION_CONVENTIONS:
            raise ValueError(f"attention={attention!r} not in {ATTENTION_CONVENTIONS}")
        length = batch.text_ids.shape[-1]
        n = np.asarray(sample_lengths(batch) if sample_tokens is None else sample_tokens, np.float64)
        vit_index = np.asarray(batch.vit_token_index)
        vit_real = vit_index < length
        patches = np.bincount(np.asarray(batch.vit_image_id)[vit_real]).astype(np.float64) if vit_real.any() \
            else np.zeros(0)
        if capacity:
            routed = batch.und_index.shape[-1] + batch.gen_index.shape[-1]
            llm_tokens = self.n_llm_shared * float(length) + (self.n_llm - self.n_llm_shared) * float(routed)
            n_ce, n_vit, n_lat = (float(x.shape[-1]) for x in (batch.ce_index, vit_index, batch.vae_token_index))
        else:
            llm_tokens = self.n_llm * n.sum()
            n_ce = float(np.sum(np.asarray(batch.ce_index) < length))
            n_vit, n_lat = float(vit_real.sum()), float(np.sum(np.asarray(batch.vae_token_index) < length))
        if attention == "causal":
            pairs = np.sum(n ** 2) / 2
        elif attention == "mask":
            pairs = mask_pairs(batch)
        else:
            pairs = float(length) ** 2 / (2 if attention == "maxtext" else 1)
        vit_pairs = float(vit_index.shape[-1]) ** 2 if attention == "full" else np.sum(patches ** 2)
        return {"llm": 6.0 * llm_tokens, "head": 6.0 * self.n_head * n_ce, "vit": 6.0 * self.n_vit * n_vit,
                "latent": 6.0 * self.n_latent * n_lat,
                "attention": 12.0 * self.llm_layers * self.llm_hidden * float(pairs),
                "vit_attention": 12.0 * self.vit_layers * self.vit_hidden * float(vit_pairs)}

    def pack_flops(self, batch, sample_tokens=None, *, attention: str = "causal", capacity: bool = False) -> float:
        """Model FLOPs (fwd + bwd) of one numpy PackedBatch with real tokens per sample `sample_tokens` (default:
        counted from the batch); `attention` and `capacity` as in the module docstring."""
        return float(sum(self.pack_flop_terms(batch, sample_tokens, attention=attention, capacity=capacity).values()))


# ----------------------------------------------------------------------------------------------------------
# aggregation (clu.metrics)
# ----------------------------------------------------------------------------------------------------------
@struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Averages over the finite steps of a log interval (non-finite steps are masked out; counted apart)."""

    loss: clu_metrics.Average.from_output("loss")
    ce: clu_metrics.Average.from_output("ce")
    mse: clu_metrics.Average.from_output("mse")
    grad_norm: clu_metrics.Average.from_output("grad_norm")

    @classmethod
    def from_row(cls, row: dict) -> "TrainMetrics":
        finite = bool(row["finite"])  # a non-finite value is zeroed too: masked NaN would still poison the sum
        values = {k: np.asarray([row[k] if finite else 0.0], np.float32) for k in ("loss", "ce", "mse", "grad_norm")}
        return cls.single_from_model_output(mask=np.asarray([finite]), **values)


def _average(metric: clu_metrics.Average) -> float | None:
    count = float(metric.count)
    return float(metric.total) / count if count else None


# ----------------------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------------------
class MetricsLogger:
    """Per-step rows → JSONL; every `log_every` steps a clu-aggregated summary → JSONL, TensorBoard, console.

    Only process 0 writes summaries, TensorBoard and the console (all processes call it); other processes
    write their step rows to metrics.process<k>.jsonl when `process_rows`."""

    def __init__(self, workdir: str, *, log_every: int, peak_flops: float = 0.0, num_devices: int = 1,
                 process_count: int = 1, stage_names=None, console=print, process_rows: bool = False):
        self.log_every, self.peak_flops = max(int(log_every), 1), float(peak_flops)
        self.num_devices, self.process_count = int(num_devices), int(process_count)
        self.stage_names = tuple(stage_names or ())
        self.console = console
        self.run = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        elif process_rows:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, f"metrics.process{jax.process_index()}.jsonl"), "a")
        self._reset()
        self._first_step_of_run = True

    def _reset(self):
        self._collection = None
        self._rows = []
        self._start = time.time()

    def write(self, row: dict) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()

    def log_step(self, row: dict) -> dict | None:
        """Record one step's row (host values); returns the summary when a log interval closes."""
        row = {"kind": "step", "run": self.run, **row}
        row["compile_step"] = self._first_step_of_run
        self._first_step_of_run = False
        self.write(row)
        one = TrainMetrics.from_row(row)
        self._collection = one if self._collection is None else self._collection.merge(one)
        self._rows.append(row)
        if row["step"] % self.log_every == 0:
            return self.summarise()
        return None

    def summarise(self) -> dict | None:
        """Close the current interval: write the summary everywhere and start a new one."""
        if not self._rows:
            return None
        rows, last = self._rows, self._rows[-1]
        timed = [r for r in rows if not r["compile_step"]] or rows
        seconds = max(sum(r["step_time_s"] for r in timed), 1e-9)
        agg = {k: _average(getattr(self._collection, k)) for k in ("loss", "ce", "mse", "grad_norm")}
        summary = {
            "kind": "summary", "run": self.run, "step": last["step"], "stage": last["stage"], "lr": last["lr"],
            **agg, "steps": len(rows), "skipped_steps": int(sum(not r["finite"] for r in rows)),
            "skipped_total": last["skipped"],
            "tokens_per_s": self.process_count * sum(r["real_tokens"] for r in timed) / seconds,
            "samples_per_s": self.process_count * sum(r["samples"] for r in timed) / seconds,
            "model_flops_per_s": self.process_count * sum(r["model_flops"] for r in timed) / seconds,
            "elapsed_s": time.time() - self._start,
        }
        if self.peak_flops > 0:
            summary["mfu"] = summary["model_flops_per_s"] / (self.peak_flops * self.num_devices)
        if self.enabled:
            self.write(summary)
        if self._tb is not None:
            for key, value in summary.items():
                if key not in ("kind", "run", "step") and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"train/{key}", value, summary["step"])
            self._tb.flush()
        if self.enabled and self.console is not None:
            self.console(self.format(summary))
        self._reset()
        return summary

    def format(self, s: dict) -> str:
        """One console progress line."""
        stage = self.stage_names[s["stage"]] if s["stage"] < len(self.stage_names) else str(s["stage"])

        def f(v, spec=".4f"):
            return "nan" if v is None else format(v, spec)

        line = (f"step {s['step']} [{stage}] loss {f(s['loss'])} ce {f(s['ce'])} mse {f(s['mse'])} "
                f"gnorm {f(s['grad_norm'], '.3f')} lr {s['lr']:.3g} | {s['tokens_per_s']:.0f} tok/s "
                f"{s['samples_per_s']:.2f} samples/s {s['model_flops_per_s']:.3g} FLOP/s")
        if "mfu" in s:
            line += f" MFU {100 * s['mfu']:.2f}%"
        if s["skipped_steps"] or s["skipped_total"]:
            line += f" | skipped {s['skipped_steps']} (total {s['skipped_total']})"
        return line

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._tb = self._jsonl = None
