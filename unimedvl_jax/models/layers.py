"""Shared building blocks: annotated Linear, RMSNorm, LayerNorm, RoPE, SwiGLU and GELU MLPs (spec §3.1, §3.2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype


def dtype_of(name: str | None):
    """Map a config dtype string ('float32', 'bfloat16') to a jnp dtype."""
    if name is None:
        return None
    return jnp.dtype(name)


def torch_default_linear_init(fan_in_axis: int = 0):
    """PyTorch nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform a=sqrt(5))."""

    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / jnp.sqrt(shape[fan_in_axis])
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ParamKeys:
    """A stream of parameter-init keys: fold_in(base, counter) with a plain Python counter.

    Used instead of calling nnx.Rngs once per parameter: under nnx.eval_shape each nnx.Rngs draw updates a
    traced counter variable, which makes abstract construction of the 14B model take minutes.
    """

    def __init__(self, rngs: "nnx.Rngs | ParamKeys"):
        if isinstance(rngs, ParamKeys):
            self.base, self.count = rngs.base, rngs.count
        else:
            self.base, self.count = rngs.params(), 0

    def params(self):
        self.count += 1
        return jax.random.fold_in(self.base, self.count)


def annotated_param(rngs: "nnx.Rngs | ParamKeys | None", init, shape, axes, param_dtype, param_type=nnx.Param):
    """Create a parameter of `shape` carrying logical axis names `axes` (one per dim)."""
    assert len(axes) == len(shape), (axes, shape)
    init = nnx.with_partitioning(init, tuple(axes))
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return param_type(init(key, shape, param_dtype))


class Linear(nnx.Module):
    """y = x @ kernel + bias with kernel (in, out) annotated by logical axes (in_axis, out_axis)."""

    def __init__(self, in_features, out_features, *, axes, use_bias=True, dtype=None,
                 param_dtype=jnp.float32, kernel_init=None, bias_init=None, rngs: nnx.Rngs):
        kernel_init = kernel_init or torch_default_linear_init()
        self.kernel = annotated_param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
        if use_bias:
            if bias_init is None:
                bound = 1.0 / float(in_features) ** 0.5
                bias_init = lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound)  # noqa: E731
            self.bias = annotated_param(rngs, bias_init, (out_features,), (axes[1],), param_dtype)
        else:
            self.bias = None
        self.dtype = dtype

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Embed(nnx.Module):
    """Lookup table `weight` (rows, dim) annotated with logical axes."""

    def __init__(self, rows, dim, *, axes, std=0.02, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.weight = annotated_param(rngs, nnx.initializers.normal(std), (rows, dim), axes, param_dtype)

    def __call__(self, ids, dtype):
        return jnp.take(self.weight[...], ids, axis=0).astype(dtype)


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm (§3.1): stats in fp32, cast back to input dtype before multiplying by the weight."""

    def __init__(self, dim, *, eps, axis_name="norm", param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.weight = annotated_param(None, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        return w * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias (torch semantics), statistics in fp32."""

    def __init__(self, dim, *, eps, axis_name="norm", param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.weight = annotated_param(None, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)
        self.bias = annotated_param(None, nnx.initializers.zeros, (dim,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def gelu_tanh(x):
    """tanh-approximated GELU (torch 'gelu_pytorch_tanh')."""
    return jax.nn.gelu(x, approximate=True)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """1-D RoPE tables (§3.2): emb = [p*inv_freq, p*inv_freq], computed in fp32 then cast to `dtype`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x (T, heads, D) with per-token cos/sin (T, D)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class SwiGLU(nnx.Module):
    """Qwen2 MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden, intermediate, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate, hidden, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nnx.Module):
    """fc2(gelu_tanh(fc1(x))) with biases: SigLIP MLP (§3.5) and the connector (§3.8)."""

    def __init__(self, d_in, d_hidden, d_out, *, axes_in, axes_hidden, axes_out, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(d_in, d_hidden, axes=(axes_in, axes_hidden), **kw)
        self.fc2 = Linear(d_hidden, d_out, axes=(axes_hidden, axes_out), **kw)

    def __call__(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))
