"""Training a bfloat16 checkpoint, as users' checkpoints are: LoRA and full
fine-tuning at tp 1, 2 and 4 follow the float32 run of the same weights.

The checkpoint is written by transformers in bfloat16 with its default
initialisation (weights ~0.02, whose bfloat16 step is ~1e-4: the regime
where updates round away), and the float32 reference is the same bfloat16
values, upcast exactly. Before tp_zoo computed its optimizer in float32,
both losses here stayed flat (Keras' Adam rounds beta_2 to 1 in bfloat16).
"""

import keras
import numpy as np
import pytest
import torch
import transformers

import tp_zoo
from tests.helpers import is_padded
from tests.helpers import padded_entries

# 9 query / 3 kv heads pad to 12 at tp 2 and 4, the vocab of 102 to 104 at tp 4.
CONFIG = dict(vocab_size=102, hidden_size=36, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=False,
              max_position_embeddings=64)
STEPS = 8
# mode -> learning rate: LoRA's B starts at zero, so it takes a larger one.
LEARNING_RATES = {"lora": 3e-2, "full": 1e-3}
# bfloat16 compute differs from float32 by its rounding (2^-8 relative) in
# every product; over these steps the losses measured 1e-4..1.4e-3 apart, and
# the loss falls by 0.12 (LoRA) and 0.47 (full): a flat loss misses by far more.
LOSS_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(bfloat16 directory, float32 directory) of the same weights."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.bfloat16)
    bf16, f32 = tmp_path_factory.mktemp("bf16"), tmp_path_factory.mktemp("f32")
    model.save_pretrained(bf16)
    model.to(torch.float32).save_pretrained(f32)
    return bf16, f32


def _batch():
    ids = np.random.RandomState(0).randint(0, CONFIG["vocab_size"], (4, 17)).astype("int32")
    return {"token_ids": ids[:, :-1], "padding_mask": np.ones((4, 16), "int32")}, ids[:, 1:]


def _train(path, tp, mode, steps=STEPS, **load):
    """(model, losses, values of the trainable variables before training)."""
    lm = tp_zoo.from_preset(path, tp=tp, progress=False, **load)
    keras.utils.set_random_seed(0)
    if mode == "lora":
        lm.backbone.enable_lora(4)
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=LEARNING_RATES[mode]), weighted_metrics=[])
    before = [np.asarray(v.numpy(), np.float32) for v in lm.trainable_variables]
    x, y = _batch()
    return lm, np.array([float(lm.train_on_batch(x, y)) for _ in range(steps)]), before


@pytest.fixture(scope="module")
def float32_losses(checkpoints):
    return {mode: _train(checkpoints[1], 1, mode)[1] for mode in LEARNING_RATES}


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_bf16_checkpoint_trains_like_float32(checkpoints, float32_losses, mode, tp):
    lm, losses, before = _train(checkpoints[0], tp, mode)
    reference = float32_losses[mode]
    assert lm.backbone.token_embedding.embeddings.dtype == "bfloat16"
    assert reference[0] - reference[-1] > 0.1, reference  # the reference itself learns
    np.testing.assert_allclose(losses, reference, atol=LOSS_TOLERANCE, rtol=0)
    trainable = lm.trainable_variables
    if mode == "lora":
        assert {v.dtype for v in trainable} == {"float32"}  # adapters float32 on a bfloat16 base
        assert all("lora_kernel" in v.path for v in trainable)
    else:
        assert {v.dtype for v in trainable} == {"bfloat16"}
    moved = [not np.array_equal(b, np.asarray(v.numpy(), np.float32)) for b, v in zip(before, trainable)]
    assert all(moved), [v.path for v, m in zip(trainable, moved) if not m]
    assert {v.dtype for v in lm.optimizer.variables if v.path.endswith(("momentum", "velocity"))} == {"float32"}
    if tp == 4:  # the tp padding of every weight and moment stays exactly zero
        padded = [v for v in lm.weights if is_padded(v)]
        assert padded
        for v in padded:
            assert not np.any(padded_entries(v)), v.path
        for v, (m, s) in zip(trainable, zip(lm.optimizer._momentums, lm.optimizer._velocities)):
            if is_padded(v):
                assert not np.any(padded_entries(v, m.numpy())) and not np.any(padded_entries(v, s.numpy())), v.path


def test_int8_base_with_lora_trains_like_float32(checkpoints, float32_losses):
    """int8 values of bfloat16 weights, float32 adapters; against the float32
    weights quantized the same way (the int8 rounding differs only where the
    bfloat16 and float32 weights do, which here they do not)."""
    _, losses, _ = _train(checkpoints[0], 2, "lora", quantize="int8")
    _, reference, _ = _train(checkpoints[1], 1, "lora", quantize="int8")
    assert reference[0] - reference[-1] > 0.1, reference
    np.testing.assert_allclose(losses, reference, atol=LOSS_TOLERANCE, rtol=0)


def test_fit_and_keras_adam_train_bf16(checkpoints):
    """fit() with Keras' own Adam: compile makes it tp_zoo's AdamW."""
    lm = tp_zoo.from_preset(checkpoints[0], tp=2, progress=False)
    lm.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), weighted_metrics=[])
    assert isinstance(lm.optimizer, tp_zoo.optimizers.AdamW) and not lm.optimizer.weight_decay
    x, y = _batch()
    history = lm.fit(x, y, batch_size=4, epochs=4, verbose=0).history["loss"]
    assert history[0] - history[-1] > 0.1, history


def test_optimizers_that_cannot_train_are_refused(checkpoints):
    x, y = _batch()
    lm = tp_zoo.from_preset(checkpoints[0], progress=False)
    lm.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-3), weighted_metrics=[])
    with pytest.raises(ValueError, match=r"^SGD updates bfloat16 weights .* tp_zoo.optimizers.AdamW"):
        lm.train_on_batch(x, y)
    lm = tp_zoo.from_preset(checkpoints[0], progress=False, dtype="float16")
    lm.compile(weighted_metrics=[])
    with pytest.raises(ValueError, match=r"^float16 weights .* cannot train: .*mixed_float16"):
        lm.train_on_batch(x, y)


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    from tp_zoo.optimizers import stochastic_round_bf16

    import jax
    import jax.numpy as jnp

    x = jnp.full((200_000,), 1.0 + 2.0**-10, jnp.float32)  # a quarter of the way to the next bfloat16
    bits = jax.random.bits(jax.random.key(0), x.shape, jnp.uint16)
    rounded = np.asarray(stochastic_round_bf16(x, bits), np.float64)
    assert set(np.unique(rounded)) == {1.0, 1.0 + 2.0**-7}
    assert abs(rounded.mean() - (1.0 + 2.0**-10)) < 2e-5  # unbiased: 3/4 down, 1/4 up
    exact = jnp.array([0.0, -0.0, 1.5, -3.0, 2.0**-130], jnp.float32)
    ones = jnp.full(exact.shape, 0xFFFF, jnp.uint16)  # the largest dropped-bits draw
    np.testing.assert_array_equal(np.asarray(stochastic_round_bf16(exact, ones), np.float32), np.asarray(exact))
