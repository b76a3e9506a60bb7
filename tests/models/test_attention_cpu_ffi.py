"""The CPU attention kernel's build and fallback (docs/packed_sequence.md §4.7): it compiles into the cache directory,
`auto` picks it on CPU, and without a compiler `auto` falls back to `blocksparse` with a warning naming why. Its
numbers are checked against `dense` with the other backends in test_attention_backends.py."""

import os
import subprocess
import sys

PROBE = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from unimedvl_jax.models.attention import resolve_backend
    backend = resolve_backend("auto")
print("BACKEND", backend)
print("WARNINGS", [str(w.message) for w in caught])
"""


def probe(tmp_path, **env):
    """(backend `auto` resolves to, warnings) in a fresh process with the kernel cache in tmp_path."""
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", UNIMEDVL_JAX_CACHE=str(tmp_path), **env)
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full_env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("BACKEND", "WARN")))
    return lines["BACKEND"], lines["WARNINGS"]


def test_kernel_builds_into_the_cache_and_auto_picks_it(tmp_path):
    backend, warnings = probe(tmp_path)
    assert backend == "cpu_ffi", warnings
    built = list((tmp_path / "cpu_attention").glob("attention_cpu_ffi-*.so"))
    assert len(built) == 1
    assert probe(tmp_path)[0] == "cpu_ffi"  # the second process loads the cached build
    assert list((tmp_path / "cpu_attention").glob("attention_cpu_ffi-*.so")) == built


def test_without_a_compiler_auto_falls_back_to_blocksparse_with_a_warning(tmp_path):
    backend, warnings = probe(tmp_path, CXX="/bin/false")
    assert backend == "blocksparse"
    assert "CPU attention kernel unavailable" in warnings and "/bin/false" in warnings


EXPLICIT = """
import jax.numpy as jnp
from unimedvl_jax.errors import is_user_error
from unimedvl_jax.models.attention import packed_attention, segment_meta
from unimedvl_jax.models.attention_cpu_ffi import KernelUnavailable
meta = segment_meta(jnp.zeros(4, jnp.int32))
x = jnp.ones((4, 2, 8))
try:
    packed_attention(x, x, x, meta, meta, backend="cpu_ffi")
except KernelUnavailable as err:
    print("USER_ERROR", is_user_error(err), str(err).splitlines()[0])
"""


def test_explicit_cpu_ffi_without_a_compiler_is_a_user_error(tmp_path):
    """Asking for `cpu_ffi` where it cannot be built has no fallback: a user error (one CLI line) naming the cause."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", UNIMEDVL_JAX_CACHE=str(tmp_path), CXX="/bin/false")
    result = subprocess.run([sys.executable, "-c", EXPLICIT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "USER_ERROR True cpu_ffi attention:" in result.stdout and "/bin/false" in result.stdout
