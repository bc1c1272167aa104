"""Vocab-parallel token embedding and LM head.

The table is split on the vocab dim. A device looks up only the ids in its
own range (zeros for the rest) and the partial rows are all-reduced; the
LM head multiplies by the local rows and returns logits split on the vocab
dim, never gathered.

A vocab size that tp does not divide is padded up inside the layer: the
table variable then has `padded_vocab_size` rows, the extra rows are never
looked up, their logits are cut off, and saving, `get_weights` and
`set_weights` of the layer show only the real rows.
"""

import jax.numpy as jnp
import keras

from tp_zoo import parallel
from tp_zoo.layers import quantize as q8
from tp_zoo.layers.base import AxisPadding
from tp_zoo.layers.base import ShardedLayer
from tp_zoo.layers.base import round_up
from tp_zoo.layers.precision import product_precision

M = parallel.MODEL
B = parallel.BATCH


@keras.saving.register_keras_serializable(package="tp_zoo")
class VocabParallelEmbedding(ShardedLayer):
    """Token embedding with its table split on the vocab dim."""

    def __init__(self, input_dim, output_dim, embeddings_initializer="uniform", **kwargs):
        super().__init__(**kwargs)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.vocab_size = input_dim
        self.padded_vocab_size = round_up(input_dim, self.tp)
        self.vocab_padding = AxisPadding.trailing(input_dim, self.padded_vocab_size)

    def build(self, input_shape=None):
        self.embeddings = self.add_sharded_weight(
            "embeddings",
            (self.padded_vocab_size, self.output_dim),
            (M, None),
            self.embeddings_initializer,
            padding=(self.vocab_padding, None),
        )

    @staticmethod
    def local_lookup(table, ids):
        rows = table.shape[0]
        local_ids = ids - parallel.model_index() * rows
        mine = (local_ids >= 0) & (local_ids < rows)
        found = jnp.take(table, jnp.where(mine, local_ids, 0), axis=0)
        return parallel.all_reduce(jnp.where(mine[..., None], found, 0))

    def call(self, ids):
        ids = jnp.asarray(ids, dtype="int32")
        layout = (B,) + (None,) * (ids.ndim - 1)
        return self.run_sharded(
            self.local_lookup,
            ((M, None), layout),
            layout + (None,),
            self.embeddings.value,
            ids,
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.output_dim,)

    def get_config(self):
        return {
            **super().get_config(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
        }


@keras.saving.register_keras_serializable(package="tp_zoo")
class VocabParallelLMHead(ShardedLayer):
    """hidden -> logits over the vocab, split on the vocab dim.

    Tied: multiplies by the table of `tied_embedding` (a
    `VocabParallelEmbedding`). Untied: owns a `kernel` of shape
    (hidden, vocab) split on the vocab dim, which `quantize("int8")` makes
    int8 values stored output-major, (vocab, hidden), with a float32 scale
    per vocab entry (as the linear layers do).
    """

    kernel_layout = (None, M)  # the float kernel's (hidden, vocab)

    def __init__(
        self,
        vocab_size,
        tied_embedding=None,
        kernel_initializer="glorot_uniform",
        quantized=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if quantized is not None:
            q8.check_mode(quantized, self.name)
        self.quantized = quantized
        q8.use_own_quantize(self)
        self.vocab_size = vocab_size
        self.tied_embedding = tied_embedding
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.padded_vocab_size = round_up(vocab_size, self.tp)
        self.vocab_padding = AxisPadding.trailing(vocab_size, self.padded_vocab_size)
        if tied_embedding is not None and tied_embedding.input_dim != vocab_size:
            raise ValueError(
                f"{self.name}: vocab_size={vocab_size} but the tied embedding "
                f"has {tied_embedding.input_dim} rows."
            )

    def build(self, input_shape):
        if self.tied_embedding is not None:
            if not self.tied_embedding.built:
                self.tied_embedding.build()
        elif self.quantized:  # made quantized: the values come from a file
            self.kernel_scale, self.kernel = self._add_int8_kernel(input_shape[-1], "ones", "zeros")
        else:
            self.kernel = self.add_sharded_weight(
                "kernel",
                (input_shape[-1], self.padded_vocab_size),
                self.kernel_layout,
                self.kernel_initializer,
                padding=(None, self.vocab_padding),
            )

    def _add_int8_kernel(self, hidden, scale, values):
        return q8.add_int8_weights(
            self, (hidden, self.padded_vocab_size), self.kernel_layout, (None, self.vocab_padding), 1, scale, values
        )

    def quantize(self, mode=None, type_check=True, config=None):
        """int8 values (vocab, hidden) with a per-vocab-entry float32 scale (untied heads)."""
        q8.check_mode(mode, self.name)
        if self.tied_embedding is not None or self.quantized or not self.built or config is not None:
            raise ValueError(f"{self.name}: only a built, untied, float LM head can be quantized, with no config.")
        values, scale = q8.quantize_int8(self.kernel.value, 1)
        kernel_scale, kernel = self._add_int8_kernel(self.kernel.shape[0], scale, values)
        q8.install(self, kernel_scale, kernel, mode)

    def _kernel(self):
        if self.tied_embedding is not None:
            return self.tied_embedding.embeddings.value, (M, None), "...d,vd->...v"
        return self.kernel.value, self.kernel_layout, "...d,dv->...v"

    def call(self, x):
        layout = (B,) + (None,) * (x.ndim - 2)
        if self.quantized:
            logits = self.run_sharded(
                lambda k, s, h: (q8.int8_product(h, k, 1) * s).astype(h.dtype),
                (q8.output_major(self.kernel_layout, 1), (M,), layout + (None,)),
                layout + (M,),
                self.kernel.value,
                self.kernel_scale.value,
                x,
                key="int8",
            )
        else:
            kernel, kernel_layout, equation = self._kernel()
            logits = self.run_sharded(
                lambda k, h: jnp.einsum(equation, h, k, precision=product_precision(h, k)),
                (kernel_layout, layout + (None,)),
                layout + (M,),
                kernel,
                x,
                key=equation,
            )
        if self.padded_vocab_size != self.vocab_size:
            logits = logits[..., : self.vocab_size]
        return logits

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.vocab_size,)

    def get_config(self):
        if self.tied_embedding is not None:
            raise NotImplementedError(
                "A tied VocabParallelLMHead is rebuilt by its model, not from config."
            )
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "quantized": self.quantized,
        }
