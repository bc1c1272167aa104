"""Memory for long sequences: the loss applies the LM head in chunks of
positions, and blocks can be rematerialised; both change nothing but memory.

References: the same model compiled with a metric (its steps then make the
whole logits and the loss reads them, the path before chunking), and the
same model without remat. Float32 throughout, so the bound is float32's.
"""

import keras
import numpy as np
import pytest

import tp_zoo
from tests import helpers
from tests.helpers import assert_close
from tp_zoo.errors import DeviceMemoryError
from tp_zoo.layers import VocabParallelLMHead
from tp_zoo.models import memory
from tp_zoo.models.llama import LlamaBackbone
from tp_zoo.models.llama import LlamaCausalLM

STEPS = 2


def _batch():
    ids = np.random.RandomState(1).randint(0, 100, (8, 14)).astype("int32")
    labels = ids[:, 1:].copy()
    labels[:, :3] = -100  # a prompt: not trained
    mask = np.ones((8, 13), "int32")
    mask[1, 9:] = 0
    return {"token_ids": ids[:, :-1], "padding_mask": mask}, labels


def _train(path, tp, remat="none", chunk=None, accuracy=False):
    lm = tp_zoo.from_preset(path, tp=tp, dtype="float32", progress=False)
    lm.remat = remat
    lm.lm_head.loss_chunk_tokens = chunk
    with lm.distribution.scope():  # a metric's variables live on the mesh
        metrics = [keras.metrics.SparseCategoricalAccuracy()] if accuracy else []
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-2), weighted_metrics=metrics)
    x, y = _batch()
    losses = [float(np.ravel(lm.train_on_batch(x, y))[0]) for _ in range(STEPS)]
    return losses, lm.get_weights(), float(np.ravel(lm.test_on_batch(x, y))[0])


@pytest.fixture(scope="module")
def with_logits(llama_path):
    """tp=8 pads the vocab of 100 to 104: the chunks mask the padding."""
    return _train(llama_path, 8, accuracy=True)


def test_chunked_loss_equals_the_loss_of_the_logits(llama_path, with_logits, monkeypatch):
    chunked = []  # the steps traced through the chunked loss (train, test)
    original = VocabParallelLMHead.cross_entropy
    monkeypatch.setattr(VocabParallelLMHead, "cross_entropy", lambda *a: chunked.append(1) or original(*a))
    # 8 x 13 positions in chunks of 5: the last chunk is padded.
    losses, weights, evaluated = _train(llama_path, 8, chunk=5)
    assert len(chunked) == 2
    ref_losses, ref_weights, ref_evaluated = with_logits
    assert_close(ref_losses, losses, "losses")
    assert_close(ref_evaluated, evaluated, "evaluate's loss")
    for ref, got in zip(ref_weights, weights):
        assert_close(ref, got, "weights after training")


@pytest.mark.parametrize("remat", ["products", "layers"])
def test_remat_changes_nothing_but_memory(llama_path, with_logits, remat):
    losses, weights, _ = _train(llama_path, 2, remat=remat)
    ref_losses, ref_weights, _ = with_logits
    assert_close(ref_losses, losses, f"losses with remat={remat}")
    for ref, got in zip(ref_weights, weights):
        assert_close(ref, got, f"weights after training with remat={remat}")


def test_unknown_remat_policy_is_refused(llama_path):
    lm = tp_zoo.from_preset(llama_path, progress=False)
    with pytest.raises(ValueError, match=r"^Unknown remat policy 'all'; expected one of 'none', 'products', 'layers'"):
        lm.remat = "all"
    assert lm.remat == "none"


# Eight layers: under remat "layers" each keeps one hidden state a position,
# against a block's whole activations (twice that, while it runs again).
DEEP = dict(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _deep_model(tp):
    with helpers.mesh_scope(tp):
        lm = LlamaCausalLM(backbone=LlamaBackbone.from_hf_config(DEEP, dtype="float32"))
    lm.compile(weighted_metrics=[])
    return lm


def test_training_memory_counts_each_devices_shards():
    """Weights, gradients and moments are the shards one device holds: at
    tp=2 the split variables' bytes halve, the replicated ones (norms) stay."""
    one, two = _deep_model(1), _deep_model(2)
    a, b = (memory.training_memory(lm, 8, 32, "none") for lm in (one, two))
    replicated = sum(v.numpy().nbytes for v in one.weights if "norm" in v.path)
    assert b.weights == (a.weights - replicated) // 2 + replicated
    assert a.gradients == a.weights and b.gradients == b.weights  # all trainable, float32
    assert a.optimizer >= 2 * a.weights  # two float32 moments per entry
    assert a.activations > b.activations  # the MLP and heads' widths split
    layers = memory.training_memory(one, 8, 32, "layers")
    assert layers.activations < a.activations and layers.weights == a.weights


def test_remat_chosen_by_free_memory_and_too_large_refused(monkeypatch):
    lm = _deep_model(1)
    need = {p: (lambda e: e.total - e.weights)(memory.training_memory(lm, 64, 64, p)) for p in ("none", "layers")}
    for free, policy in ((2 * need["none"], "none"), (need["layers"] / 0.9 + 1, "layers")):
        monkeypatch.setattr(memory, "free_device_bytes", lambda lm, free=free: free)
        assert memory.remat_for(lm, 64, 64) == policy
    monkeypatch.setattr(memory, "free_device_bytes", lambda lm: need["layers"] / 2)
    with pytest.raises(DeviceMemoryError, match=r"^Training 64 x 64 tokens needs about .* GiB per device .* with remat='layers'"):
        memory.remat_for(lm, 64, 64)
    monkeypatch.setattr(memory, "free_device_bytes", lambda lm: need["none"] / 2)
    with pytest.raises(DeviceMemoryError, match=r"with remat='none'; .* GiB is free .* remat='auto'"):
        memory.remat_for(lm, 64, 64, "none")
