"""Export params to the official UniMedVL/BAGEL directory layout (docs/model.md §2.1–2.4), one tensor at a time.

Output: ema.safetensors (exactly the docs/model.md §2.1 key set for the config), ae.safetensors (docs/model.md §2.2
names), llm_config.json and vit_config.json with the fields the official loaders read (the loader overrides written out
too), bagel_config.json (Bagel-level fields + VAE params, read back by our import; ignored by the official code) and
tokenizer files when given. Everything is written to a temporary sibling directory that is renamed into place only when
complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from unimedvl_jax.interop.name_map import AE_FILE, EMA_FILE, TO_OFFICIAL, build_name_map
from unimedvl_jax.interop.official_config import VAE_PARAM_KEYS, VIT_LAYERS_DROPPED
from unimedvl_jax.interop.safetensors_io import write_streaming
from unimedvl_jax.models.bridges import PositionTable

EXPORT_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                   "spm.model", "spm_tokenizer.json")  # the last two: a SentencePiece model trained by unimedvl-train


@dataclasses.dataclass
class ExportReport:
    """Where the export went and how many tensors each file got."""

    out_dir: str
    tensors: dict
    dtype: str


def official_config_files(cfg, dtype: str = "bfloat16") -> dict[str, dict]:
    """llm_config.json / vit_config.json / bagel_config.json contents for a model config."""
    llm, vit, tok = cfg.llm, cfg.vit, cfg.special_tokens
    llm_json = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads, "vocab_size": llm.vocab_size, "hidden_act": "silu",
        "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta, "rope_scaling": None, "use_sliding_window": False,
        "sliding_window": llm.max_position_embeddings, "max_window_layers": llm.num_layers,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "torch_dtype": dtype,
        # The loader overrides of docs/model.md §1.1, written out so the file is self-describing.
        "qk_norm": llm.qk_norm, "tie_word_embeddings": False,
        "layer_module": {"dense": "Qwen2DecoderLayer", "moe": "Qwen2MoEDecoderLayer",
                         "mot": "Qwen2MoTDecoderLayer"}[llm.layer_module],
    }
    vit_json = {
        "model_type": "siglip_vision_model", "hidden_size": vit.hidden_size,
        "intermediate_size": vit.intermediate_size, "num_attention_heads": vit.num_heads,
        # Official loaders instantiate num_hidden_layers - 1 layers (docs/model.md §1.2, docs/quirks.md §9.15).
        "num_hidden_layers": vit.num_layers + VIT_LAYERS_DROPPED, "num_channels": vit.num_channels,
        "patch_size": vit.patch_size, "image_size": vit.image_size, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": vit.layer_norm_eps, "attention_dropout": 0.0, "rope": False,
    }
    vae = cfg.vae
    bagel_json = {
        "bagel_config": {k: cfg[k] for k in ("latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side",
                                             "connector_act", "interpolate_pos", "timestep_shift")},
        "bagel_config_fixed": {"visual_gen": True, "visual_und": True, "freeze_vae": True, "enable_e2e_vae": False},
        "vae_params": {k: (list(vae[k]) if k == "ch_mult" else vae[k]) for k in VAE_PARAM_KEYS},
        "special_token_ids": tok.to_dict(),
    }
    return {"llm_config.json": llm_json, "vit_config.json": vit_json, "bagel_config.json": bagel_json}


def host_array(x) -> np.ndarray:
    """One tensor on the host: gathered across processes when it is sharded over several hosts."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def export_official(source, cfg, out_dir, *, dtype: str = "bfloat16", tokenizer_dir=None,
                    overwrite: bool = False) -> ExportReport:
    """Write `source` (a UniMedVL or its nnx.State of params + tables) as an official checkpoint directory."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} not in {sorted(EXPORT_DTYPES)}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    state = source if isinstance(source, nnx.State) else nnx.state(source, nnx.Any(nnx.Param, PositionTable))
    values = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}
    entries = build_name_map(state)
    np_dtype = EXPORT_DTYPES[dtype]
    writer = jax.process_index() == 0
    by_file = {EMA_FILE: [], AE_FILE: []}
    for e in entries:
        by_file[e.file].append(e)

    tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(out_dir)) if writer else None
    try:
        for file, file_entries in by_file.items():
            by_key = {e.key: e for e in file_entries}

            def produce(key, by_key=by_key):
                e = by_key[key]
                return TO_OFFICIAL[e.transform](host_array(e.select(values[e.path]))).astype(np_dtype)

            specs = [(e.key, e.official_shape, np_dtype) for e in file_entries]
            if writer:
                write_streaming(os.path.join(tmp, file), specs, produce, metadata={"format": "pt"})
            else:  # other processes take part in each per-tensor gather
                for key, _, _ in specs:
                    produce(key)
        if writer:
            for name, content in official_config_files(cfg, dtype).items():
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(content, f, indent=2)
            if tokenizer_dir is not None:
                found = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, n))]
                if not found:
                    raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
                for name in found:
                    shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
            if os.path.exists(out_dir):
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
            tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            shutil.rmtree(tmp)
    return ExportReport(out_dir=out_dir, tensors={f: len(v) for f, v in by_file.items()}, dtype=dtype)
