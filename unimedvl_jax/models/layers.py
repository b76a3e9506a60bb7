"""Shared building blocks: annotated Linear, RMSNorm, LayerNorm, RoPE, SwiGLU and GELU MLPs (docs/model.md §3.1,
docs/model.md §3.2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.models import remat
from unimedvl_jax.sharding import constrain


def dtype_of(name: str | None):
    """Map a config dtype string ('float32', 'bfloat16') to a jnp dtype."""
    if name is None:
        return None
    return jnp.dtype(name)


class Init:
    """A parameter initializer with a JAX path (under jit / eval_shape) and a host NumPy path (eager).

    Eager construction draws on the host: one jax.random call per distinct parameter shape would compile a
    separate XLA kernel each (tens of seconds for a small model on CPU). Under a trace (nnx.jit, nnx.eval_shape)
    the JAX path is used, so nothing is allocated abstractly and sharded creation stays on device.
    """

    def __init__(self, kind: str, scale: float = 0.0, table=None):
        self.kind, self.scale, self.table = kind, float(scale), table

    def __call__(self, key, shape, dtype=jnp.float32):
        if self.kind == "uniform":
            return jax.random.uniform(key, shape, dtype, -self.scale, self.scale)
        if self.kind == "normal":
            return self.scale * jax.random.normal(key, shape, dtype)
        return jnp.asarray(self.host(None, shape, dtype))

    def host(self, rng: np.random.Generator | None, shape, dtype=np.float32) -> np.ndarray:
        if self.kind == "uniform":
            return rng.uniform(-self.scale, self.scale, shape).astype(dtype)
        if self.kind == "normal":
            return (self.scale * rng.standard_normal(shape)).astype(dtype)
        if self.kind == "constant":
            return np.full(shape, self.scale, dtype)
        if self.kind == "table":
            return np.asarray(self.table, dtype).reshape(shape)
        raise ValueError(f"unknown init kind {self.kind!r}")

    @property
    def random(self) -> bool:
        return self.kind in ("uniform", "normal")


def uniform_init(bound: float) -> Init:
    """U(-bound, bound)."""
    return Init("uniform", bound)


def normal_init(std: float) -> Init:
    """N(0, std²)."""
    return Init("normal", std)


def constant_init(value: float) -> Init:
    """Every entry = value (zeros, ones)."""
    return Init("constant", value)


def table_init(table) -> Init:
    """A fixed array (e.g. the sin-cos position tables)."""
    return Init("table", table=np.asarray(table))


def torch_default_init(fan_in: int) -> Init:
    """PyTorch nn.Linear / nn.Conv2d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    return uniform_init(1.0 / float(fan_in) ** 0.5)


class ParamKeys:
    """A stream of parameter-init randomness: fold_in(base, counter) with a plain Python counter.

    Used instead of calling nnx.Rngs once per parameter: under nnx.eval_shape each nnx.Rngs draw updates a
    traced counter variable, which makes abstract construction of the 14B model take minutes.
    """

    def __init__(self, rngs: nnx.Rngs):
        self.base, self.count = rngs.params(), 0
        self.traced = isinstance(self.base, jax.core.Tracer)
        self._seed = None if self.traced else [int(w) for w in np.asarray(jax.random.key_data(self.base)).ravel()]

    def params(self):
        self.count += 1
        return jax.random.fold_in(self.base, self.count)

    def host_rng(self) -> np.random.Generator:
        """A NumPy generator for the next parameter (eager construction only)."""
        self.count += 1
        return np.random.default_rng(self._seed + [self.count])


def param_keys(rngs: "nnx.Rngs | ParamKeys") -> ParamKeys:
    """The ParamKeys stream to hand down a module tree (the same object if it already is one)."""
    return rngs if isinstance(rngs, ParamKeys) else ParamKeys(rngs)


def annotated_param(rngs: "nnx.Rngs | ParamKeys | None", init, shape, axes, param_dtype, param_type=nnx.Param):
    """Create a parameter of `shape` carrying logical axis names `axes` (one per dim)."""
    assert len(axes) == len(shape), (axes, shape)
    if isinstance(rngs, nnx.Rngs):
        rngs = ParamKeys(rngs)
    shape = tuple(int(d) for d in shape)
    if isinstance(init, Init) and not (init.random and (rngs is None or rngs.traced)):
        rng = rngs.host_rng() if init.random else None
        value = jnp.asarray(init.host(rng, shape, np.dtype(param_dtype)))
        return param_type(value, out_sharding=tuple(axes))
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return param_type(nnx.with_partitioning(init, tuple(axes))(key, shape, param_dtype))


@jax.custom_vjp
def matmul(x, kernel):
    """x (..., in) @ kernel (in, out); its kernel gradient contracts the flattened (rows, in), (rows, out) operands."""
    return jnp.dot(x, kernel)


def _matmul_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _matmul_bwd(res, d_out):
    # Same math as autodiff. Under vmap (packs in the train step) autodiff's kernel gradient contracts over
    # (pack, token) and XLA:CPU transposes the activations and leaves its fast dot path; a custom VJP is vmapped
    # per pack instead, so each kernel gradient is a plain 2-D contraction (docs/packed_sequence.md §4.7).
    x, kernel = res
    rows = x.reshape(-1, x.shape[-1])
    d_rows = d_out.reshape(-1, d_out.shape[-1])
    d_kernel = jax.lax.dot_general(rows, d_rows, (((0,), (0,)), ((), ())))
    return jnp.dot(d_out, kernel.T).astype(x.dtype), d_kernel.astype(kernel.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nnx.Module):
    """y = x @ kernel + bias with kernel (in, out) annotated by logical axes (in_axis, out_axis); `save_name` tags y
    for the remat policies (models/remat.py)."""

    def __init__(self, in_features, out_features, *, axes, use_bias=True, dtype=None,
                 param_dtype=jnp.float32, kernel_init=None, bias_init=None, save_name=None, rngs: nnx.Rngs):
        kernel_init = kernel_init or torch_default_init(in_features)
        self.kernel = annotated_param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
        if use_bias:
            bias_init = bias_init or torch_default_init(in_features)
            self.bias = annotated_param(rngs, bias_init, (out_features,), (axes[1],), param_dtype)
        else:
            self.bias = None
        self.dtype = dtype
        self.save_name = save_name

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        y = matmul(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return remat.tag(y, self.save_name)


class Embed(nnx.Module):
    """Lookup table `weight` (rows, dim) annotated with logical axes."""

    def __init__(self, rows, dim, *, axes, std=0.02, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.weight = annotated_param(rngs, normal_init(std), (rows, dim), axes, param_dtype)

    def __call__(self, ids, dtype):
        return jnp.take(self.weight[...], ids, axis=0).astype(dtype)


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm (docs/model.md §3.1): stats in fp32, cast back to input dtype before multiplying by the weight."""

    def __init__(self, dim, *, eps, axis_name="norm", param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.weight = annotated_param(None, constant_init(1.0), (dim,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x):
        rows = x.reshape(-1, x.shape[-1])  # the weight gradient is then one reduction over rows, however fused
        x32 = rows.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        return (w * normed.astype(x.dtype)).reshape(x.shape)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias (torch semantics), statistics in fp32."""

    def __init__(self, dim, *, eps, axis_name="norm", param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.weight = annotated_param(None, constant_init(1.0), (dim,), (axis_name,), param_dtype)
        self.bias = annotated_param(None, constant_init(0.0), (dim,), (axis_name,), param_dtype)
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
    """1-D RoPE tables (docs/model.md §3.2): emb = [p*inv_freq, p*inv_freq], computed in fp32 then cast to `dtype`."""
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
        self.gate_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), save_name=remat.MLP_GATE, **kw)
        self.up_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), save_name=remat.MLP_UP, **kw)
        self.down_proj = Linear(intermediate, hidden, axes=("mlp", "embed"), save_name=remat.MLP_DOWN, **kw)

    def __call__(self, x):
        hidden = constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), ("act_block_length", "act_mlp"))
        return self.down_proj(hidden)


class GeluMLP(nnx.Module):
    """fc2(gelu_tanh(fc1(x))) with biases: SigLIP MLP (docs/model.md §3.5) and the connector (docs/model.md §3.8);
    `act_hidden`: the logical activation axis of the hidden (sharding.constrain), None = unconstrained."""

    def __init__(self, d_in, d_hidden, d_out, *, axes_in, axes_hidden, axes_out, act_hidden=None, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act_hidden = act_hidden
        self.fc1 = Linear(d_in, d_hidden, axes=(axes_in, axes_hidden), save_name=remat.MLP_UP, **kw)
        self.fc2 = Linear(d_hidden, d_out, axes=(axes_hidden, axes_out), save_name=remat.MLP_DOWN, **kw)

    def __call__(self, x):
        hidden = gelu_tanh(self.fc1(x))
        if self.act_hidden is not None:
            hidden = constrain(hidden, ("act_block_length", self.act_hidden))
        return self.fc2(hidden)
