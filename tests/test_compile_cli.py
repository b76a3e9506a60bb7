"""unimedvl-compile (unimedvl_jax/compile_cli.py, aot.py, hlo_stats.py): the optimized-HLO collectives and FLOP
counts and the out-of-memory message parser on small texts; the command compiled for a TPU v5p-8 / two v6e-8 slices
from this CPU machine (libtpu's compile-only client; skipped without libtpu), for the machine's own devices, and its
usage errors.

Each command runs in a subprocess: the environment of a compile-only target (JAX_PLATFORMS=cpu, ...) must be set
before jax is imported. The compiled configs are configs/tiny.py shrunk (one LLM and one ViT layer, 256-token packs,
dense attention) so that XLA:TPU compiles the step in ~30 s on 2 cores; the full tiny config takes ~90 s."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from unimedvl_jax.aot import TARGETS, parse_target
from unimedvl_jax.hlo_stats import hlo_collectives, hlo_flops, parse_oom, shape_bytes

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")

SMALL = ["--config", "configs/tiny.py", "--config.model.llm.num_layers=1", "--config.model.vit.num_layers=1",
         "--config.model.attention_backend=dense", "--config.data.max_tokens=256", "--config.data.und_capacity=256",
         "--config.data.gen_capacity=64", "--config.data.max_ce=128", "--config.data.max_vit_patches=64",
         "--config.data.max_vae_tokens=64", "--config.data.max_vae_images=1", "--config.data.vae_image_size=(64,64)"]

# A module in the shape XLA prints optimized HLO: a sync all-reduce and an async all-gather in ENTRY; a
# reduce-scatter and a collective-permute pair in a while body counting 0..28 by 1 (XLA:TPU form: no trip count
# written, read off the condition, the body's increment and the initial tuple); an all-to-all in a loop with a
# known_trip_count (XLA:GPU form) that is also called by a loop of unknown count; a matmul in a loop counting 0..8
# by 2 (as XLA:TPU's windowed einsums do); the async pair's -start not counted twice.
HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], bf16[64,128])) -> (s32[], bf16[64,128]) {
  %p = (s32[], bf16[64,128]{1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  %v = bf16[64,128]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %reduce-scatter.1 = bf16[16,128]{1,0:T(8,128)(2,1)} reduce-scatter(%v), channel_id=3, dimensions={0}, to_apply=%add
  %collective-permute-start.1 = (bf16[16,128]{1,0}, bf16[16,128]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%reduce-scatter.1), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %collective-permute-done.1 = bf16[16,128]{1,0} collective-permute-done(%collective-permute-start.1)
  ROOT %t = (s32[], bf16[64,128]{1,0}) tuple(%next, %v)
}

%cond (q: (s32[], bf16[64,128])) -> pred[] {
  %q = (s32[], bf16[64,128]{1,0}) parameter(0)
  %constant.7 = s32[]{:T(128)} constant(28)
  %i.1 = s32[]{:T(128)} get-tuple-element(%q), index=0
  ROOT %lt.1 = pred[]{:T(512)} compare(%i.1, %constant.7), direction=LT, metadata={op_name="while/cond"}
}

%body2 (r: (s32[], f32[4,32])) -> (s32[], f32[4,32]) {
  %r = (s32[], f32[4,32]{1,0}) parameter(0)
  %w = f32[4,32]{1,0} get-tuple-element(%r), index=1
  %all-to-all.2 = (f32[4,32]{1,0}, f32[4,32]{1,0}) all-to-all(%w, %w), channel_id=5, replica_groups={{0,1}}
  ROOT %u = (s32[], f32[4,32]{1,0}) tuple(%j, %w)
}

%cond2 (s: (s32[], f32[4,32])) -> pred[] {
  %s = (s32[], f32[4,32]{1,0}) parameter(0)
  ROOT %c = pred[] custom-call(%s), custom_call_target="dynamic_condition"
}

%fused_dot (param_0: bf16[32,256], param_1: bf16[256,64]) -> bf16[32,64] {
  %param_0 = bf16[32,256]{1,0} parameter(0)
  %param_1 = bf16[256,64]{1,0} parameter(1)
  ROOT %convolution.1 = bf16[32,64]{1,0} convolution(%param_0, %param_1), dim_labels=bf_io->bf
}

%body3 (a: (u32[], bf16[32,256], bf16[256,64])) -> (u32[], bf16[32,256], bf16[256,64]) {
  %a = (u32[], bf16[32,256]{1,0}, bf16[256,64]{1,0}) parameter(0)
  %k = u32[]{:T(128)} get-tuple-element(%a), index=0
  %two = u32[]{:T(128)} constant(2)
  %k.next = u32[]{:T(128)} add(%k, %two)
  %lhs = bf16[32,256]{1,0} get-tuple-element(%a), index=1
  %rhs = bf16[256,64]{1,0} get-tuple-element(%a), index=2
  %fusion.1 = bf16[32,64]{1,0} fusion(%lhs, %rhs), kind=kOutput, calls=%fused_dot
  ROOT %t3 = (u32[], bf16[32,256]{1,0}, bf16[256,64]{1,0}) tuple(%k.next, /*index=1*/%lhs, %rhs)
}

%cond3 (b: (u32[], bf16[32,256], bf16[256,64])) -> pred[] {
  %b = (u32[], bf16[32,256]{1,0}, bf16[256,64]{1,0}) parameter(0)
  %k.1 = u32[]{:T(128)} get-tuple-element(%b), index=0
  %eight = u32[]{:T(128)} constant(8)
  ROOT %lt.3 = pred[]{:T(512)} compare(%k.1, %eight), direction=LT
}

ENTRY %main.1 (param: f32[8]) -> f32[8] {
  %param = f32[8]{0} parameter(0)
  %all-reduce.1 = f32[8]{0} all-reduce(%param), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %all-gather-start.1 = (f32[8]{0}, f32[32]{0}) all-gather-start(%all-reduce.1), channel_id=2, dimensions={0}
  %all-gather-done.1 = f32[32]{0} all-gather-done(%all-gather-start.1)
  %zero = s32[]{:T(128)} constant(0)
  %init = (s32[], bf16[64,128]{1,0}) tuple(%zero, %big)
  %while.1 = (s32[], bf16[64,128]{1,0}) while(%init), condition=%cond, body=%body
  %while.2 = (s32[], f32[4,32]{1,0}) while(%init2), condition=%cond2, body=%body2, backend_config={"known_trip_count":{"n":"3"}}
  %while.3 = (s32[], f32[4,32]{1,0}) while(%init2), condition=%cond2, body=%body2
  %while.4 = (u32[], bf16[32,256]{1,0}, bf16[256,64]{1,0}) while(%init3), condition=%cond3, body=%body3
  %dot.1 = f32[8,16]{1,0} dot(%p8x4, %p4x16), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %p8x4 = f32[8,4]{1,0} parameter(1)
  %p4x16 = f32[4,16]{1,0} parameter(2)
  ROOT %out = f32[8]{0} slice(%all-gather-done.1), slice={[0:8]}
}
"""  # noqa: E501


def test_shape_bytes():
    assert shape_bytes("bf16[16,3584]{1,0}") == 16 * 3584 * 2
    assert shape_bytes("f32[]") == 4
    assert shape_bytes("(bf16[16,128]{1,0:T(8,128)(2,1)}, s32[4]{0}, u32[]{:S(2)})") == 16 * 128 * 2 + 16 + 4
    assert shape_bytes("pred[3]{0}") == 3 and shape_bytes("f8e4m3fn[10]") == 10 and shape_bytes("s4[3]") == 2


def test_hlo_collectives_counts_and_bytes():
    stats = hlo_collectives(HLO)
    assert stats["all-reduce"] == dict(count=1, bytes=32, executed_count=1, executed_bytes=32)
    assert stats["all-gather"] == dict(count=1, bytes=128, executed_count=1, executed_bytes=128)  # once, at -done
    rs = 16 * 128 * 2
    assert stats["reduce-scatter"] == dict(count=1, bytes=rs, executed_count=28, executed_bytes=28 * rs)
    assert stats["collective-permute"] == dict(count=1, bytes=rs, executed_count=28, executed_bytes=28 * rs)
    # body2 runs 3 times in while.2 (known_trip_count) + once in while.3 (count unknown: counted once)
    a2a = 2 * 4 * 32 * 4
    assert stats["all-to-all"] == dict(count=1, bytes=a2a, executed_count=4, executed_bytes=4 * a2a)
    assert stats["unknown_trip_counts"] == 1


def test_hlo_flops():
    """Dots and convolutions (XLA:TPU's form of a matmul), loops times their trip count: the 32×256 @ 256×64 in a
    loop of 4 iterations (0..8 by 2) and the 8×4 @ 4×16 dot once."""
    matmul, dot = 2 * 32 * 64 * 256, 2 * 8 * 16 * 4
    assert hlo_flops(HLO) == {"static": matmul + dot, "executed": 4 * matmul + dot}


@pytest.mark.parametrize("lhs, rhs, out, window, labels, taps", [
    # a matmul
    ("f32[6,8]", "f32[8,5]", "f32[6,5]", "", "bf_io->bf", 1),
    # a 3×3 'same' convolution over 4×4: 2, 3, 3, 2 taps land on the input along each spatial dim
    ("f32[2,4,4,8]", "f32[3,3,8,5]", "f32[2,4,4,5]", "window={size=3x3 pad=1_1x1_1}, ", "b01f_01io->b01f", 2.5 ** 2),
    # the two halves of a collective matmul: a window of 2 over a padded dim of 1, one tap lands
    ("f32[2,1,8]", "f32[8,2,5]", "f32[2,2,5]", "window={size=2 pad=1_1 rhs_reversal=1}, ", "b0f_i0o->b0f", 1),
    # a batch dim written as a window over a dilated input: one tap of 4 lands
    ("f32[4,1,8]", "f32[4,8,5]", "f32[4,1,5]", "window={size=4 stride=3 lhs_dilate=4}, ", "0bf_0io->0bf", 1),
])
def test_convolution_flops_count_the_taps_that_land_on_the_input(lhs, rhs, out, window, labels, taps):
    text = f"""HloModule m

ENTRY %e (a: f32[], b: f32[]) -> f32[] {{
  %a = {lhs}{{0}} parameter(0)
  %b = {rhs}{{0}} parameter(1)
  ROOT %c = {out}{{0}} convolution(%a, %b), {window}dim_labels={labels}
}}
"""
    out_elements = int(np.prod([int(d) for d in out[4:-1].split(",")]))
    assert hlo_flops(text)["static"] == pytest.approx(2 * out_elements * 8 * taps)


# The two forms of XLA:TPU's compile-time out-of-memory error: the early temporaries check (as libtpu 0.0.42 printed
# it for a v6e-8 target) and the buffer-assignment report (its layout as XLA:TPU prints it; figures made up here).
OOM_EARLY = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (136.67G) "
             "exceeds available HBM (31.25G).")
OOM_REPORT = """RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 101.50G of 95.74G hbm. Exceeded hbm capacity by 5.76G.

Total hbm usage >= 102.02G:
    reserved        530.00M
    program          87.60G
    arguments        13.90G

Output size 13.70G; shares 13.70G with arguments.

Program hbm requirement 87.60G:
    global            2.43M
    scoped           10.56M
    HLO temp         87.58G (100.0% utilization: Unpadded (87.50G) Padded (87.50G), 0.1% fragmentation (80.00M))

  Largest program allocations in hbm:

  1. Size: 4.69G
     Operator: op_name="jit(step_on_mesh)/transpose(jvp(vmap()))/dot_general" source_file="layers.py" source_line=150
     Shape: bf16[2,11520,18944]{2,1,0:T(8,128)(2,1)}
     Unpadded size: 4.69G
     XLA label: fusion.123 = fusion(param.1, param.2), kind=kOutput, calls=fused_computation.1
     Allocation type: HLO temp
     ==========================

  2. Size: 512.00M
     Shape: f32[16,8192,1024]{2,1,0}
     Unpadded size: 512.00M
     Allocation type: HLO temp
     ==========================
"""  # noqa: E501


def test_parse_oom_both_forms():
    early = parse_oom(OOM_EARLY)
    assert early == {"temp_bytes": int(136.67 * 2 ** 30), "hbm_bytes": int(31.25 * 2 ** 30), "largest_buffers": []}
    r = parse_oom(OOM_REPORT)
    g = 2 ** 30
    assert r["used_bytes"] == int(101.5 * g) and r["hbm_bytes"] == int(95.74 * g)
    assert r["exceeded_bytes"] == int(5.76 * g) and r["argument_bytes"] == int(13.9 * g)
    assert r["output_bytes"] == r["alias_bytes"] == int(13.7 * g) and r["temp_bytes"] == int(87.58 * g)
    assert r["reserved_bytes"] == 530 * 2 ** 20
    first, second = r["largest_buffers"]
    assert first == {"bytes": int(4.69 * g), "shape": "bf16[2,11520,18944]{2,1,0:T(8,128)(2,1)}",
                     "op": "jit(step_on_mesh)/transpose(jvp(vmap()))/dot_general", "allocation": "HLO temp"}
    assert second["bytes"] == 512 * 2 ** 20 and second["op"] is None and second["shape"].startswith("f32[16,8192")


def test_targets_table():
    assert parse_target("v5p-32").topology == "v5:2x2x4" and parse_target("v6e-256").topology == "v6e:16x16"
    assert parse_target("2x8xh200").topology == "2x1x8" and parse_target("8xh100").gpu_spec == "h100"
    assert {"v5p-8", "v5p-256", "v6e-8", "v6e-256", "1xh200", "8xh100", "8xh200", "2x8xh200", "local"} <= set(TARGETS)
    with pytest.raises(ValueError, match=r"unknown --topology 'v5p-7'; valid: v5p-8, v5p-16"):
        parse_target("v5p-7")


def _compile(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("JAX_PLATFORMS", None)  # the command sets it for a TPU / GPU target
    return subprocess.run([sys.executable, "-m", "unimedvl_jax.compile_cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_bad_topology_exits_2_with_one_error_line():
    res = _compile("--config", "configs/tiny.py", "--topology", "v5p-7")
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert errors == [errors[0]] and errors[0].startswith("unimedvl-compile: error: unknown --topology 'v5p-7'")
    assert "v6e-256" in errors[0] and "8xh200" in errors[0] and "local" in errors[0]


def test_mesh_the_devices_cannot_hold_exits_2():
    res = _compile("--config", "configs/tiny.py", "--topology", "local", "--config.mesh.shape=(2,1,1)")
    assert res.returncode == 2
    assert "unimedvl-compile: error: mesh shape (2, 1, 1) needs 2 devices, have 1" in res.stderr


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda13_plugin") is not None, reason="the CUDA plugin is installed")
def test_gpu_target_without_the_cuda_plugin_exits_2():
    res = _compile("--config", "configs/tiny.py", "--topology", "8xh200")
    assert res.returncode == 2
    assert "unimedvl-compile: error: --topology 8xh200 needs JAX's CUDA plugin" in res.stderr


@needs_libtpu
def test_compiles_for_v5p_8(tmp_path):
    """FSDP over the 4 chips of a v5p-8: the report's memory, FLOPs and collectives (the fsdp all-gathers of the
    weights and reduce-scatters of their gradients), exit 0."""
    out = tmp_path / "r.json"
    res = _compile(*SMALL, "--topology", "v5p-8", "--config.train.batch_packs=4", "--config.mesh.shape=(1,-1,1)",
                   "--config.mesh.rules=fsdp", "--json", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device_kind"] == "TPU v5" and r["num_devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    m = r["per_device"]
    assert m["hbm_bytes"] == int(95.74 * 2 ** 30) and m["fits"] is True
    assert m["total_bytes"] == (m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
                                + m["generated_code_bytes"]) > 0
    assert m["alias_bytes"] > 0  # the donated state
    assert m["headroom_bytes"] == m["hbm_bytes"] - m["total_bytes"]
    f = r["flops"]
    assert f["compiled_per_device"] > 0 and f["analytic"]["capacity_full"]["per_device"] > 0
    assert 0.2 < f["compiled_over_capacity_full"] < 5
    c = r["collectives"]
    assert c["all-gather"]["count"] > 0 and c["reduce-scatter"]["count"] + c["all-reduce"]["count"] > 0
    assert r["compile_s"]["compile"] > 0
    assert "fits within 90%: True" in res.stdout and "FLOPs per device and step: compiled" in res.stdout
    assert r["peak_tflops_per_device"] == 459.0 and r["kernel_calls"] == 0 and r["notes"] == []  # dense attention


@needs_libtpu
def test_two_slices_that_do_not_fit_exit_1(tmp_path):
    """Two v6e-8 slices (data parallelism across them: mesh.dcn_shape (2, 1, 1)) with attention 'auto', which resolves
    for the target (the compiled splash kernel, not the CPU host's backend), checked against 1 MiB of memory per
    chip (--hbm-bytes): the report is written, fits false, exit status 1 with the per-device figures."""
    out = tmp_path / "r.json"
    res = _compile(*SMALL, "--topology", "v6e-8", "--num-slices", "2", "--config.train.batch_packs=16",
                   "--hbm-bytes", str(2 ** 20), "--config.model.attention_backend=auto", "--json", str(out))
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device_kind"] == "TPU v6 lite" and r["num_devices"] == 16 and r["num_slices"] == 2
    assert r["mesh"] == {"data": 16, "fsdp": 1, "tensor": 1} and r["dcn_shape"] == [2, 1, 1]
    # the splash kernel is compiled (Mosaic custom calls), not interpreted
    assert r["attention_backend_resolved"] == "splash" and r["kernel_calls"] > 0, r["notes"]
    assert not any("interpret mode" in note for note in r["notes"])
    assert r["per_device"]["fits"] is False and r["per_device"]["hbm_bytes"] == 2 ** 20
    assert r["per_device"]["total_bytes"] > 2 ** 20 and r["per_device"]["headroom_bytes"] < 0
    assert "unimedvl-compile: does not fit: total" in res.stderr


def test_compiles_for_local_devices(tmp_path):
    """--topology local: this machine's CPU device (memory unknown: fits null, exit 0)."""
    out = tmp_path / "r.json"
    res = _compile(*SMALL, "--topology", "local", "--json", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["platform"] == "local" and r["num_devices"] == 1
    assert r["per_device"]["total_bytes"] > 0 and r["per_device"]["hbm_bytes"] is None
    assert r["per_device"]["fits"] is None
