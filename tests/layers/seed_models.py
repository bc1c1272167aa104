"""The seed report's four models, written with tp_zoo.layers.

Each builder returns (model, loss, x, y) for whatever mesh is active when it
is called; with no mesh the same code is the single-device reference.
"""

import keras
import numpy as np

from tp_zoo import layers


def mlp():
    """(32, 64) -> 128 -> 256 -> 128 -> 32, column/row alternating."""
    x = keras.Input((64,))
    h = layers.ColumnParallelDense(128, activation="relu", name="dense_1")(x)
    h = layers.RowParallelDense(256, activation="relu", name="dense_2")(h)
    h = layers.ColumnParallelDense(128, activation="relu", name="dense_3")(h)
    y = layers.RowParallelDense(32, name="output")(h)
    rs = np.random.RandomState(1)
    data = rs.randn(32, 64).astype("float32"), rs.randn(32, 32).astype("float32")
    return keras.Model(x, y), keras.losses.MeanSquaredError(), *data


def self_attention():
    """(16, 32, 64): 8 heads of 8, FFN 256, mean-pooled to 16 outputs."""
    x = keras.Input((32, 64))
    h = layers.LayerNorm(name="ln_1")(
        x + layers.ParallelAttention(8, 8, 64, name="attention")(x)
    )
    h = layers.LayerNorm(name="ln_2")(
        h + layers.ParallelMLP(64, 256, activation="gelu", name="ffn")(h)
    )
    h = keras.layers.GlobalAveragePooling1D()(h)
    y = layers.ColumnParallelDense(16, gather_output=True, name="output")(h)
    rs = np.random.RandomState(2)
    data = rs.randn(16, 32, 64).astype("float32"), rs.randn(16, 16).astype("float32")
    return keras.Model(x, y), keras.losses.MeanSquaredError(), *data


def dense_stack():
    """(24, 48) -> 96 -> 64 -> 24, the last gathered."""
    x = keras.Input((48,))
    h = layers.ColumnParallelDense(96, activation="relu", name="dense_1")(x)
    h = layers.RowParallelDense(64, activation="relu", name="dense_2")(h)
    y = layers.ColumnParallelDense(24, gather_output=True, name="output")(h)
    rs = np.random.RandomState(3)
    data = rs.randn(24, 48).astype("float32"), rs.randn(24, 24).astype("float32")
    return keras.Model(x, y), keras.losses.MeanSquaredError(), *data


def embedding():
    """1000 x 64 vocab-parallel embedding, average pooling, dense 32, dense 5."""
    x = keras.Input((16,), dtype="int32")
    h = layers.VocabParallelEmbedding(1000, 64, name="embedding")(x)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = layers.ColumnParallelDense(32, activation="relu", name="dense")(h)
    y = layers.RowParallelDense(5, name="output")(h)
    rs = np.random.RandomState(4)
    data = rs.randint(0, 1000, (8, 16)).astype("int32"), rs.randint(0, 5, (8,)).astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return keras.Model(x, y), loss, *data


SEED_MODELS = {"mlp": mlp, "self_attention": self_attention, "dense_stack": dense_stack, "embedding": embedding}
