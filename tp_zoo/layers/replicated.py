"""Small layers kept whole on every device: norms and learned positions.

They go through `ShardedLayer.add_sharded_weight` (with nothing split) so
that checkpoints stream into them like into the sharded layers.
"""

import functools

import jax
import jax.numpy as jnp
import keras

from tp_zoo import parallel
from tp_zoo.layers import rms_norm_kernel
from tp_zoo.layers.base import ShardedLayer


@keras.saving.register_keras_serializable(package="tp_zoo")
class LayerNorm(ShardedLayer):
    """Layer normalization over the last dim (variables `gamma`, `beta`),
    computed in float32 and returned in the input dtype."""

    def __init__(self, epsilon=1e-5, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.use_bias = use_bias

    def build(self, input_shape):
        dim = (input_shape[-1],)
        self.gamma = self.add_sharded_weight("gamma", dim, (None,), "ones")
        self.beta = self.add_sharded_weight("beta", dim, (None,), "zeros") if self.use_bias else None

    def call(self, x):
        # In float32, rounded once at the end, as torch's layer_norm and Keras'
        # LayerNormalization do: 16-bit statistics lose visible accuracy.
        x32 = x.astype("float32")
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * self.gamma.value.astype("float32")
        if self.use_bias:
            y = y + self.beta.value.astype("float32")
        return y.astype(x.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "use_bias": self.use_bias}


def rms_norm(x, scale, epsilon):
    """Llama's RMS norm: in float32, cast back to x's dtype, then scaled."""
    x32 = x.astype("float32")
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + epsilon)
    return scale * y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rms_norm_by_kernel(epsilon, scale, x):
    """`rms_norm` by the GPU kernel (few rows); its gradient is the plain
    norm's."""
    return rms_norm_kernel.rms_norm(x, scale, epsilon)


def _rms_norm_by_kernel_forward(epsilon, scale, x):
    return _rms_norm_by_kernel(epsilon, scale, x), (scale, x)


def _rms_norm_by_kernel_backward(epsilon, residuals, grad):
    return jax.vjp(lambda scale, x: rms_norm(x, scale, epsilon), *residuals)[1](grad)


_rms_norm_by_kernel.defvjp(_rms_norm_by_kernel_forward, _rms_norm_by_kernel_backward)


@keras.saving.register_keras_serializable(package="tp_zoo")
class RMSNorm(ShardedLayer):
    """Root-mean-square normalization (variable `scale`), as Llama's: in
    float32, cast back to the input dtype, then scaled (in that dtype)."""

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_sharded_weight("scale", (input_shape[-1],), (None,), "ones")

    def call(self, x):
        if not rms_norm_kernel.applies(x):
            return rms_norm(x, self.scale.value, self.epsilon)
        layout = (parallel.BATCH,) + (None,) * (x.ndim - 1)
        return self.run_sharded(self._local_norm_by_kernel, ((None,), layout), layout, self.scale.value, x)

    def _local_norm_by_kernel(self, scale, x):
        return _rms_norm_by_kernel(self.epsilon, scale, x)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tp_zoo")
class PositionEmbedding(ShardedLayer):
    """Learned absolute positions: a (offset + sequence_length, dim) table
    (`embeddings`) whose row offset + p is position p (OPT's table starts at
    offset 2)."""

    def __init__(self, sequence_length, output_dim, offset=0, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = sequence_length
        self.output_dim = output_dim
        self.offset = offset
        self.initializer = initializer

    def build(self, input_shape=None):
        self.embeddings = self.add_sharded_weight(
            "embeddings", (self.offset + self.sequence_length, self.output_dim), (None, None), self.initializer
        )

    def call(self, x, positions=None):
        """Embeddings of `positions` ((batch, seq) ints; default 0..seq-1) for
        `x` (batch, seq, ...); positions past the table take its last row."""
        if positions is None:
            positions = jnp.arange(x.shape[1])[None]
        return jnp.take(self.embeddings.value, positions + self.offset, axis=0, mode="clip")

    def compute_output_shape(self, input_shape):
        return (1, input_shape[1], self.output_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "sequence_length": self.sequence_length,
            "output_dim": self.output_dim,
            "offset": self.offset,
            "initializer": self.initializer,
        }
