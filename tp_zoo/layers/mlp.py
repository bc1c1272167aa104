"""The transformer feed-forward block: column-parallel up, row-parallel down.

A gated MLP computes its gate and up projections in one product per device
(`MergedColumnParallelDense`).

An intermediate width that tp does not divide is padded at its end with
inert units: zero columns (and bias) of up/gate, zero rows of down, and
down zeroes its padded inputs, so they add exactly nothing.
"""

import warnings

import keras

from tp_zoo import parallel
from tp_zoo.layers.base import AxisPadding
from tp_zoo.layers.base import ShardedLayer
from tp_zoo.layers.base import round_up
from tp_zoo.layers.fused_linear import MergedColumnParallelDense
from tp_zoo.layers.linear import ColumnParallelDense
from tp_zoo.layers.linear import RowParallelDense

B = parallel.BATCH


@keras.saving.register_keras_serializable(package="tp_zoo")
def gelu_tanh(x):
    """GELU with the tanh approximation (GPT-2's "gelu_new")."""
    return keras.activations.gelu(x, approximate=True)


# Activation names a config may give beyond Keras' own.
_ACTIVATIONS = {"gelu_tanh": gelu_tanh}


@keras.saving.register_keras_serializable(package="tp_zoo")
class ParallelMLP(ShardedLayer):
    """down(act(up(x))), or down(act(gate(x)) * up(x)) when `gated` (SwiGLU).

    The intermediate activations stay split over the devices; the block
    costs one all-reduce, in `down`.
    """

    def __init__(
        self,
        hidden_dim,
        intermediate_dim,
        activation="relu",
        gated=False,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.gated = gated
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.padded_intermediate_dim = round_up(intermediate_dim, self.tp)
        if self.padded_intermediate_dim != intermediate_dim:
            added = self.padded_intermediate_dim - intermediate_dim
            warnings.warn(
                f"MLP width {intermediate_dim} padded to {self.padded_intermediate_dim} for tp={self.tp}: "
                f"{added} inert unit{'s' if added > 1 else ''} per layer, about {100 * added / intermediate_dim:.1f}% more MLP compute "
                "and weights.",
                stacklevel=2,
            )
        padding = AxisPadding.trailing(intermediate_dim, self.padded_intermediate_dim)
        common = dict(use_bias=use_bias, kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy)
        self.act = keras.activations.get(_ACTIVATIONS.get(activation, activation))
        if gated:
            self.up = MergedColumnParallelDense(intermediate_dim, padding=padding, name="gate_up", **common)
        else:
            self.up = ColumnParallelDense(intermediate_dim, activation=self.act, padding=padding, name="up", **common)
        self.down = RowParallelDense(hidden_dim, padding=padding, name="down", **common)

    def _projections(self):
        return (self.up, self.down)

    def build(self, input_shape):
        self.up.build(input_shape)
        self.down.build(tuple(input_shape[:-1]) + (self.padded_intermediate_dim,))

    def _local_mlp(self, weights, x):
        h = self.up.local_call(weights[0], x)
        if self.gated:
            gate, up = self.up.split(h)
            h = self.act(gate) * up
        return self.down.local_call(weights[1], h)

    def call(self, x):
        weights = tuple(p.local_weights() for p in self._projections())
        x_layout = (B,) + (None,) * (x.ndim - 1)
        return self.run_with_weights(self._local_mlp, weights, (x_layout,), x_layout, x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.hidden_dim,)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "activation": self.activation,
            "gated": self.gated,
            "use_bias": self.down.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
