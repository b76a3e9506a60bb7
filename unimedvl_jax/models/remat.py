"""Rematerialisation policies by name (docs/memory.md "Remat policies").

A policy decides which activations of one layer the backward pass keeps; everything else is recomputed from the
layer's input. Projections are tagged with `checkpoint_name` where they are computed (models/layers.Linear
`save_name`), so a policy can name them; untagged code (norms, RoPE, attention scores) is never saved by a named
policy. Outside jax.checkpoint the tags are the identity.

  none                  no rematerialisation: autodiff keeps what it needs (most memory, no recompute)
  full                  keep only each layer's input; the backward reruns the whole layer forward
  minimal               keep the outputs of every weight matmul (q/k/v/o projections, MLP gate/up/down: the "dots
                        without batch dimensions" of MaxText's minimal policy); rerun norms, RoPE and attention
  save_qkv_proj         keep the q/k/v projections; rerun the rest
  save_attention_out    keep the attention output (the context before o_proj); rerun the rest
  offload_qkv_proj      as save_qkv_proj, the saved tensors held in pinned host memory until the backward
  offload_attention_out as save_attention_out, offloaded to pinned host memory
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

from unimedvl_jax.config import REMAT_POLICY_NAMES

# checkpoint_name tags (models/layers.Linear save_name and the attention context)
QUERY, KEY, VALUE, ATTENTION_OUT, OUT_PROJ = "query_proj", "key_proj", "value_proj", "attention_out", "out_proj"
MLP_GATE, MLP_UP, MLP_DOWN = "mlp_gate", "mlp_up", "mlp_down"
QKV = (QUERY, KEY, VALUE)
PROJECTIONS = QKV + (OUT_PROJ, MLP_GATE, MLP_UP, MLP_DOWN)

_policies = jax.checkpoint_policies


def _offload(names):
    return _policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(names), offload_src="device",
        offload_dst="pinned_host")


# name -> jax.checkpoint policy; None = no jax.checkpoint at all
REMAT_POLICIES = {
    "none": None,
    "full": _policies.nothing_saveable,
    "minimal": _policies.save_only_these_names(*PROJECTIONS),
    "save_qkv_proj": _policies.save_only_these_names(*QKV),
    "save_attention_out": _policies.save_only_these_names(ATTENTION_OUT),
    "offload_qkv_proj": _offload(QKV),
    "offload_attention_out": _offload((ATTENTION_OUT,)),
}
assert tuple(REMAT_POLICIES) == REMAT_POLICY_NAMES, "config.REMAT_POLICY_NAMES lists these policies"


def tag(x, name: str | None):
    """x tagged for the remat policies (identity when name is None or outside jax.checkpoint)."""
    return x if name is None else checkpoint_name(x, name)


def check_policy(name: str) -> str:
    """The policy name, or a ValueError listing the known ones."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat policy {name!r} not in {tuple(REMAT_POLICIES)}")
    return name


def remat(fn, policy: str, *, prevent_cse: bool = True):
    """`fn` under jax.checkpoint with the named policy ('none': fn itself). prevent_cse may be False inside a
    scan body, where XLA cannot merge the recomputation with the forward anyway."""
    chosen = REMAT_POLICIES[check_policy(policy)]
    return fn if chosen is None else jax.checkpoint(fn, policy=chosen, prevent_cse=prevent_cse)
