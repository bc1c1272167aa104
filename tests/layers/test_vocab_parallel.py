"""Vocab-parallel embedding, LM head and cross-entropy, padding included."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import tp_zoo
from tests.helpers import assert_close
from tests.helpers import mesh_scope
from tp_zoo import layers
from tp_zoo.losses import VocabParallelCrossEntropy

VOCAB = 1001  # divisible by none of 2, 4, 8


def _data(vocab=VOCAB):
    rs = np.random.RandomState(0)
    logits = (3 * rs.randn(4, 6, vocab)).astype("float32")
    labels = rs.randint(0, vocab, (4, 6)).astype("int32")
    labels[0, :2] = -100
    weights = np.ones((4, 6), "float32")
    weights[3, 4:] = 0
    return logits, labels, weights


def _loss_and_grad(loss, logits, labels, weights):
    return jax.jit(jax.value_and_grad(lambda l: loss(labels, l, sample_weight=weights)))(logits)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("vocab", [VOCAB, 1024])
def test_cross_entropy_matches_keras(tp, vocab):
    logits, labels, weights = _data(vocab)
    ref_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)
    ref, ref_grad = _loss_and_grad(ref_loss, logits, labels, weights)
    with mesh_scope(tp):
        sharded = logits
        if vocab % tp == 0 and tp > 1:
            sharded = jax.device_put(logits, tp_zoo.parallel.sharding(tp_zoo.parallel.active_mesh(), (None, None, "model")))
        got, grad = _loss_and_grad(VocabParallelCrossEntropy(ignore_class=-100), sharded, labels, weights)
    assert_close(ref, got, "loss")
    assert_close(ref_grad, grad, "d loss / d logits")


def test_cross_entropy_never_gathers_logits():
    logits, labels, _ = _data(1024)
    with mesh_scope(4):
        spec = tp_zoo.parallel.sharding(tp_zoo.parallel.active_mesh(), (None, None, "model"))
        logits = jax.device_put(logits, spec)
        loss = VocabParallelCrossEntropy()
        hlo = jax.jit(jax.grad(lambda l: loss(labels, l))).lower(logits).compile().as_text()
    assert "all-gather" not in hlo
    assert "all-reduce" in hlo


def test_from_logits_false_is_refused():
    with pytest.raises(ValueError, match="from_logits=True"):
        VocabParallelCrossEntropy(from_logits=False)


def _tiny_lm(tied):
    ids = keras.Input((None,), dtype="int32")
    embedding = layers.VocabParallelEmbedding(VOCAB, 32, name="embed")
    h = embedding(ids)
    h = layers.ParallelMLP(32, 64, activation="relu", name="mlp")(h) + h
    head = layers.VocabParallelLMHead(VOCAB, tied_embedding=embedding if tied else None, name="head")
    return keras.Model(ids, head(h))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("tp", [2, 8])
def test_padded_vocab_never_shows(tmp_path, tp, tied):
    keras.utils.set_random_seed(0)
    ref = _tiny_lm(tied)
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 9)).astype("int32")
    ref_logits = np.asarray(ref(ids))
    ref_path = str(tmp_path / "ref.weights.h5")
    ref.save_weights(ref_path)
    with mesh_scope(tp):
        model = _tiny_lm(tied)
        model.load_weights(ref_path)
        embed = model.get_layer("embed")
        assert embed.embeddings.shape[0] == embed.padded_vocab_size > VOCAB
        assert [w.shape for w in embed.get_weights()] == [(VOCAB, 32)]
        # The padding rows are zeros and only ever used as -inf logits.
        np.testing.assert_array_equal(np.asarray(embed.embeddings.value)[VOCAB:], 0)
        logits = np.asarray(model(ids))
        assert logits.shape == ref_logits.shape
        assert_close(ref_logits, logits, "logits")
        path = str(tmp_path / "lm.weights.h5")
        model.save_weights(path)
    # A single-device model loads the sharded model's checkpoint unchanged.
    back = _tiny_lm(tied)
    back.load_weights(path)
    for a, b in zip(ref.get_weights(), back.get_weights()):
        np.testing.assert_array_equal(a, b)
