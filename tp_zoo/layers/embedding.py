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

import math

import jax
import jax.numpy as jnp
import keras

from tp_zoo import parallel
from tp_zoo.layers.base import AxisPadding
from tp_zoo.layers.base import ShardedLayer
from tp_zoo.layers.base import full_padding
from tp_zoo.layers.base import round_up
from tp_zoo.layers.loss import local_cross_entropy
from tp_zoo.layers.quantize import KernelSpec
from tp_zoo.layers.quantize import LocalWeights
from tp_zoo.layers.quantize import check_mode
from tp_zoo.layers.quantize import install
from tp_zoo.layers.quantize import scheme_for
from tp_zoo.layers.quantize import use_own_quantize

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
        return self.run_with_weights(self.local_lookup, self.embeddings, (layout,), layout + (None,), ids)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.output_dim,)

    def get_config(self):
        return {
            **super().get_config(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
        }


def loss_chunk(local_vocab, setting=None):
    """Positions per chunk of the loss: `setting`, or by default as many as
    keep a chunk's float32 logits (of `local_vocab` entries) near 512 MiB."""
    return setting or max(256, 2**27 // local_vocab)


@keras.saving.register_keras_serializable(package="tp_zoo")
class VocabParallelLMHead(ShardedLayer):
    """hidden -> logits over the vocab, split on the vocab dim.

    Tied: multiplies by the table of `tied_embedding` (a
    `VocabParallelEmbedding`). Untied: owns a `kernel` of shape
    (hidden, vocab) split on the vocab dim, stored by its quantization
    scheme as the linear layers' kernels are: `quantize("int8")` makes it
    int8 values stored output-major, (vocab, hidden), with a float32 scale
    per vocab entry.
    """

    kernel_layout = (None, M)  # the float kernel's (hidden, vocab)
    kernel_scale = None  # the scheme's scale variable, where it has one

    def __init__(
        self,
        vocab_size,
        tied_embedding=None,
        kernel_initializer="glorot_uniform",
        quantized=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.scheme = scheme_for(quantized, self.name)
        use_own_quantize(self)
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

    @property
    def quantized(self):
        """None, or the quantization mode of the kernel ("int8")."""
        return self.scheme.mode

    def build(self, input_shape):
        if self.tied_embedding is not None:
            if not self.tied_embedding.built:
                self.tied_embedding.build()
            return
        # A quantized scheme's values come from a file.
        for name, variable in self.scheme.create_weights(self, self._kernel_spec(input_shape[-1])).items():
            setattr(self, name, variable)

    def _kernel_spec(self, hidden):
        shape = (hidden, self.padded_vocab_size)
        return KernelSpec(shape, self.kernel_layout, full_padding((None, self.vocab_padding), shape), 1,
                          initializer=self.kernel_initializer)

    def quantize(self, mode=None, type_check=True, config=None):
        """The kernel in `mode`'s scheme (int8: values (vocab, hidden) with a
        per-vocab-entry float32 scale); untied heads only."""
        check_mode(mode, self.name)
        if self.tied_embedding is not None or self.quantized or not self.built or config is not None:
            raise ValueError(f"{self.name}: only a built, untied, float LM head can be quantized, with no config.")
        scheme, spec = scheme_for(mode), self._kernel_spec(self.kernel.shape[0])
        values = scheme.quantize(self.kernel.value, spec.n_in, self.variable_dtype)
        install(self, scheme, scheme.create_weights(self, spec, values))

    def local_weights(self):
        """The `LocalWeights` the local logits are made from: the tied table, or the kernel."""
        if self.tied_embedding is not None:
            return LocalWeights(self.tied_embedding.embeddings)
        return LocalWeights(self.kernel, scale=self.kernel_scale)

    def _local_logits(self, weights, h):
        """This device's slice of the (padded) vocab's logits, in h's dtype."""
        equation = "...d,vd->...v" if self.tied_embedding is not None else "...d,dv->...v"
        return self.scheme.apply(weights, h, equation, 1)

    def call(self, x):
        layout = (B,) + (None,) * (x.ndim - 2)
        logits = self.run_with_weights(
            self._local_logits, self.local_weights(), (layout + (None,),), layout + (M,), x,
            key=("logits", self.quantized, self.tied_embedding is None),
        )
        if self.padded_vocab_size != self.vocab_size:
            logits = logits[..., : self.vocab_size]
        return logits

    # Positions per chunk of `cross_entropy` (None: a chunk's float32 logits
    # near 512 MiB a device).
    loss_chunk_tokens = None

    def cross_entropy(self, x, labels):
        """Per-token cross-entropy of the logits `call(x)` would give against
        `labels` (batch, seq), without ever holding every position's logits:
        the positions go in chunks of `loss_chunk_tokens`, each chunk's
        logits made, reduced vocab-parallel, and made again in the backward
        pass."""
        layout = (B,) + (None,) * (x.ndim - 2)
        local_vocab = self.padded_vocab_size // self.tp
        chunk = loss_chunk(local_vocab, self.loss_chunk_tokens)

        def local(weights, h, labels):
            h = h.astype(self.compute_dtype)  # Keras' loss hands hidden states over in float32
            real = parallel.model_index() * local_vocab + jnp.arange(local_vocab) < self.vocab_size

            @jax.checkpoint
            def chunk_loss(h, labels):
                logits = jnp.where(real, self._local_logits(weights, h).astype(jnp.float32), -jnp.inf)
                return local_cross_entropy(logits, labels)

            lead, tokens = h.shape[:-1], math.prod(h.shape[:-1])
            size = min(chunk, tokens)
            count = -(-tokens // size)
            pad = count * size - tokens
            h = jnp.pad(h.reshape(tokens, -1), ((0, pad), (0, 0))).reshape(count, size, -1)
            labels = jnp.pad(labels.reshape(tokens), (0, pad)).reshape(count, size)
            losses = jax.lax.map(lambda pair: chunk_loss(*pair), (h, labels))
            return losses.reshape(-1)[:tokens].reshape(lead)

        return self.run_with_weights(
            local, self.local_weights(), (layout + (None,), layout), layout, x, jnp.asarray(labels, "int32"),
            key=("cross_entropy", chunk, self.quantized, self.tied_embedding is None),
        )

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
