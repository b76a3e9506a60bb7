"""`train` and `mesh` sections of the experiment config (shared by configs/*.py; used by train/loop.py).

train.steps                      total train steps; -1 = sum(curriculum.stage_steps) (resolved at run time, so it
                                 follows command-line overrides of the stage lengths)
train.batch_packs                B: packs per global batch (stacked on a leading axis, split over data × fsdp;
                                 must be divisible by data·fsdp and by the number of JAX processes)
train.log_every                  console line / TensorBoard / clu aggregation period (steps)
train.checkpoint_every           orbax save_interval_steps (a checkpoint is also written at the end and on SIGTERM)
train.keep_checkpoints           orbax max_to_keep (the disk must hold keep_checkpoints + 1 checkpoints: the run
                                 warns at start when it cannot)
train.restore_step               -1 = restore the newest intact checkpoint; N = restore checkpoint N (an error if it
                                 is missing or damaged; newer checkpoints are moved aside to <step>.abandoned)
train.on_corrupt_checkpoint      'fallback': a damaged checkpoint (missing commit marker, unreadable array) is moved
                                 aside to <step>.corrupt and the next older one is restored; 'fail': stop with an
                                 error naming it (exit status 4)
train.async_checkpointing        orbax enable_async_checkpointing
train.max_consecutive_nonfinite  K: stop with an error after K non-finite (skipped) steps in a row
train.peak_flops                 peak FLOP/s of ONE device, for MFU (0 = unknown: MFU not reported)
train.seed                       model init and step RNG seed
train.data_shards                S: the global batch is filled by S data shards, shard s reading records
                                 source[s::S] into rows [s·B/S, (s+1)·B/S) (data_pipelines/data_shards.py
                                 DataShardLayout). Each process runs the iterators of the shards its devices hold,
                                 so the batches depend on (S, B) only, not on the number of processes. 0 = the
                                 checkpoint's S when resuming, else the fewest shards the process layout allows
                                 (= the number of processes on GPU/CPU device orders)
train.log_record_ids             per-step JSONL rows list the record ids each pack consumed (audits exact resume;
                                 ~B·samples·60 bytes per step, so off for the 14B config). With several processes,
                                 process k>0 writes its rows to metrics.process<k>.jsonl
train.write_final                write <workdir>/final/ (config.json + params/ + ema/) at the end of training
train.init_vae_from              a VAE checkpoint (unimedvl-train-vae) installed into the model before training
                                 starts: its weights and fitted latent scale/shift ('' = keep the initialised VAE)

mesh.shape      (data, fsdp, tensor); one entry may be -1 (= the remaining devices)
mesh.dcn_shape  multi-slice (DCN) split of mesh.shape: slices along each axis (default (1, 1, 1)); e.g. shape
                (4, 16, 1) with dcn_shape (2, 1, 1) = 2 slices of (2, 16, 1) joined over data (sharding.make_mesh)
mesh.rules      logical-axis rules table for parameters and activations (unimedvl_jax/sharding.py RULES):
                'dp'             parameters replicated; activations split over the batch (packs) only
                'fsdp'           hidden dim of parameters over fsdp; activations split over the batch only
                'fsdp_tensor'    fsdp + Megatron tensor parallelism: heads / kv heads / MLP / vocab of parameters
                                 and of activations (q/k/v, MLP hidden, logits) over tensor; residual stream
                                 (length, embed) replicated over tensor
                'fsdp_tensor_sp' fsdp_tensor + sequence parallelism: the residual stream's tokens over tensor
                                 (act_length → tensor) between the tensor-parallel blocks
mesh.constrain_activations  apply the table's activation constraints (sharding.constrain) inside the train step;
                False = only parameters and the batch are placed, XLA propagates the rest
"""

from __future__ import annotations

import ml_collections


def train_config(**overrides) -> ml_collections.ConfigDict:
    """The `train` section (see module docstring)."""
    c = ml_collections.ConfigDict(dict(
        steps=-1,
        batch_packs=1,
        log_every=10,
        checkpoint_every=1000,
        keep_checkpoints=3,
        restore_step=-1,
        on_corrupt_checkpoint="fallback",
        async_checkpointing=True,
        max_consecutive_nonfinite=20,
        peak_flops=0.0,
        seed=0,
        write_final=True,
        init_vae_from="",
        data_shards=0,
        log_record_ids=True,
    ))
    c.update(overrides)
    return c


def mesh_config(shape=(-1, 1, 1), rules="dp", dcn_shape=(1, 1, 1),
                constrain_activations=True) -> ml_collections.ConfigDict:
    """The `mesh` section: device mesh shape over (data, fsdp, tensor), its multi-slice (DCN) split, the
    sharding rules table name and whether the step applies its activation constraints (module docstring)."""
    return ml_collections.ConfigDict(dict(shape=tuple(shape), rules=rules, dcn_shape=tuple(dcn_shape),
                                          constrain_activations=bool(constrain_activations)))


def add_train_sections(cfg: ml_collections.ConfigDict, *, mesh_shape=(-1, 1, 1), rules="dp",
                       **train_overrides) -> ml_collections.ConfigDict:
    """Add `train` and `mesh` sections to an experiment config (in place; returns it)."""
    cfg.train = train_config(**train_overrides)
    cfg.mesh = mesh_config(mesh_shape, rules)
    return cfg


def total_steps(cfg) -> int:
    """train.steps, or the sum of the curriculum stage lengths when it is -1."""
    steps = int(cfg.train.steps)
    return sum(int(s) for s in cfg.curriculum.stage_steps) if steps < 0 else steps
