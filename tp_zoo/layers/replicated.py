"""Small layers kept whole on every device: norms and learned positions.

They go through `ShardedLayer.add_sharded_weight` (with nothing split) so
that checkpoints stream into them like into the sharded layers.
"""

import jax
import jax.numpy as jnp
import keras

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
        x32 = x.astype("float32")
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return self.scale.value * y.astype(x.dtype)

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
