"""Packed attention on XLA:CPU as a C++ XLA FFI custom call: the default CPU backend (docs/packed_sequence.md §4.7).

The kernel (attention_cpu_ffi.cc, shipped as source) is compiled on first use with the system C++ compiler against
jaxlib's FFI headers, cached under `$UNIMEDVL_JAX_CACHE` (default ~/.cache/unimedvl_jax) by a hash of the source,
the jaxlib version, the compiler and this CPU's instruction-set flags, and registered with XLA. Each query row visits
only the key slots its metadata allows ([first, last] from `key_ranges`, the §4.3 mask tested per pair), so the cost
follows the allowed pairs with no block rounding, and a decode row reads its cache in place. Forward and backward are
two custom calls tied by a `jax.custom_vjp` (flash-attention recurrences: the forward keeps the log-sum-exp). The
kernel computes in fp32; other input dtypes are cast in and the output cast back. Rows run as tasks on XLA's CPU
compute pool (at most `UNIMEDVL_CPU_ATTENTION_THREADS` threads when set; fewer for small calls).

`available()` says whether the kernel compiled; when it did not (no compiler, unsupported platform) `auto` falls back
to `blocksparse` with a one-time warning naming the reason.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from unimedvl_jax.errors import UserError
from unimedvl_jax.models.attention_mask import TokenMeta, key_ranges
from unimedvl_jax.packed_batch import CAUSAL, NOISE

SOURCE = Path(__file__).with_suffix(".cc")
TARGETS = {"forward": "UnimedvlAttentionForward", "backward": "UnimedvlAttentionBackward"}
COMPILE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-pthread")


class KernelUnavailable(UserError):
    """The CPU attention kernel could not be compiled or loaded here (the message says why). A user error: asking for
    `cpu_ffi` on a machine without a working C++ compiler is a configuration to change (or use `auto`)."""


def _cpu_flags() -> str:
    """This CPU's instruction-set flags (the build uses -march=native), or the machine name where not readable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    """Where built kernels are kept."""
    return Path(os.environ.get("UNIMEDVL_JAX_CACHE", Path.home() / ".cache" / "unimedvl_jax")) / "cpu_attention"


def _compile(compiler: str) -> Path:
    """The kernel's shared library, built here unless a matching cached build exists."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, version, _cpu_flags(),
                                    " ".join(COMPILE_FLAGS)]).encode()).hexdigest()[:16]
    library = _cache_dir() / f"attention_cpu_ffi-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        cmd = [compiler, *COMPILE_FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(built)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelUnavailable(f"cpu_ffi attention: {' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, library)  # atomic: concurrent first uses never load a half-written file
    return library


def _build_and_register() -> None:
    """Compile (or find) the kernel and register its two FFI targets with XLA's CPU backend."""
    if platform.system() not in ("Linux", "Darwin"):
        raise KernelUnavailable(f"cpu_ffi attention: unsupported system {platform.system()}")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise KernelUnavailable("cpu_ffi attention: no C++ compiler found (set CXX, or install g++)")
    library = ctypes.cdll.LoadLibrary(str(_compile(compiler)))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(f"unimedvl_attention_{target}", jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")


@functools.cache
def _load() -> None:
    """_build_and_register once per process; any failure (compiler missing or failing, library not loadable) is
    raised as KernelUnavailable (an explicit `cpu_ffi` backend has no fallback)."""
    try:
        _build_and_register()
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelUnavailable(f"cpu_ffi attention: {err}") from err


@functools.cache
def available() -> bool:
    """Whether the kernel is usable in this process (compiles it on the first call); warns once with the reason if
    not."""
    try:
        _load()
        return True
    except KernelUnavailable as err:
        warnings.warn(f"CPU attention kernel unavailable, using 'blocksparse' instead: {err}", stacklevel=2)
        return False


def _meta_args(meta: TokenMeta):
    return tuple(a.astype(jnp.int32) for a in (meta.sample, meta.split, meta.mode, meta.index))


def _call(target: str, results, *args, scale: float):
    return jax.ffi.ffi_call(f"unimedvl_attention_{target}", results, vmap_method="broadcast_all")(
        *args, scale=np.float32(scale), causal=np.int32(CAUSAL), noise=np.int32(NOISE))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, metas, ranges, scale):
    return _forward(q, k, v, metas, ranges, scale)[0]


def _forward(q, k, v, metas, ranges, scale):
    out_shape = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    lse_shape = jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32)
    out, lse = _call("forward", (out_shape, lse_shape), q, k, v, *metas, *ranges, scale=scale)
    return out, (q, k, v, metas, ranges, out, lse)


def _backward(scale, res, d_out):
    q, k, v, metas, ranges, out, lse = res
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)  # rowsum(dO ∘ O)
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = _call("backward", shapes, q, k, v, *metas, *ranges, lse, d_out, delta, scale=scale)
    return dq, dk, dv, jax.tree.map(lambda a: None, metas), jax.tree.map(lambda a: None, ranges)


_attend.defvjp(_forward, _backward)


def cpu_ffi_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, scale: float):
    """Softmax attention of q (Tq, Hq, D) over k, v (Tk, Hkv, D) under the §4.3 mask, each query visiting only the key
    slots it may see (same preconditions as blocksparse: contiguous samples and splits, key slot = index)."""
    _load()
    ranges = tuple(r.astype(jnp.int32) for r in key_ranges(q_meta, k_meta))
    metas = _meta_args(q_meta) + _meta_args(k_meta)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return _attend(*f32, metas, ranges, float(scale)).astype(q.dtype)
