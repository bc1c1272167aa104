"""On 2 NVIDIA GPUs: tp=2 against tp=1 on the same weights, in float32 and
bfloat16.

The model: a Llama of 4 layers, hidden 1024, 16 heads over 4 kv heads
(head_dim 64, so the GPU decode kernel applies), MLP 2816, vocab 32000.
Per dtype, one set of random weights (seeded): the tp=1 model is made, then
the same architecture under tp_zoo.distribution(tp=2), which takes the tp=1
model's weights (set_weights(get_weights()): true shapes at every tp).
Then, for 4 right-padded prompts of 64 down to 40 tokens:

1. logits at the real positions: max |diff| <= tolerance x max |logit|;
2. greedy ids of 32 new tokens per prompt: a row that differs passes only
   when, at its first differing token, tp=1's logits of the two tokens are
   within the logits tolerance (a near tie that rounding may flip);
3. three AdamW steps (train_on_batch, learning rate 1e-3, the prompts as
   the batch) from the same weights: each step's loss, |diff| <= tolerance
   x max(1, |loss|). The bfloat16 models train in mixed_bfloat16 (float32
   weights, bf16 compute): Keras' Adam (3.15.1) computes its bias
   correction in the variable's dtype, where beta_2 = 0.999 rounds to 1,
   so bf16 variables never move (the losses stay flat, at any tp).

Tolerances (relative, as above):
- float32: 1e-4 for logits and losses, at tp_zoo's own matmul precision
  (float32 products at HIGHEST on GPUs, tp_zoo/layers/precision.py: JAX's
  default TF32 alone would move logits by ~1e-3 between two summation
  orders). The CPU tests' 1e-5 is for tiny models.
- bfloat16: 5e-2 for logits, 2e-2 for losses (the precision's default
  setting): bf16 keeps 8 bits, ~4e-3 per rounding, and tp=2 rounds each
  row-parallel partial sum before its all-reduce; the CPU tests hold
  mixed_bfloat16 training to 2e-2.
"""

import jax
import keras
import numpy as np
import pytest

import tp_zoo
from tp_zoo.models.llama import LlamaBackbone
from tp_zoo.models.llama import LlamaCausalLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(len(jax.devices()) < 2, reason=f"tp=2 needs 2 devices; {len(jax.devices())} here"),
]

CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 1024,
    "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
}
PROMPT_LENGTHS = (64, 56, 48, 40)
NEW_TOKENS = 32
STEPS = 3
# dtype: (logits tolerance, loss tolerance)
TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (5e-2, 2e-2)}
# bf16 variables do not train under Keras' Adam (see above).
TRAINING_DTYPE = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def _prompts():
    """Random ids (seeded), one row per length, right padded, with their mask."""
    rs = np.random.RandomState(0)
    ids = np.zeros((len(PROMPT_LENGTHS), max(PROMPT_LENGTHS)), "int32")
    mask = np.zeros_like(ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        ids[row, :length] = rs.randint(3, 1000, length)
        mask[row, :length] = 1
    return {"token_ids": ids, "padding_mask": mask}


def _model(tp, dtype, weights):
    with tp_zoo.distribution(tp=tp).scope():
        lm = LlamaCausalLM(backbone=LlamaBackbone.from_hf_config(CONFIG, dtype=dtype))
    lm.set_weights(weights)
    return lm


@pytest.fixture(scope="module", params=sorted(TOLERANCES))
def models(request):
    """(dtype, tp=1 model, tp=2 model, their initial weights): the tp=1
    model's random (seeded) ones."""
    dtype = request.param
    keras.utils.set_random_seed(0)
    with tp_zoo.distribution(tp=1).scope():
        tp1 = LlamaCausalLM(backbone=LlamaBackbone.from_hf_config(CONFIG, dtype=dtype))
    weights = tp1.get_weights()
    yield dtype, tp1, _model(2, dtype, weights), weights
    keras.backend.clear_session()


def _logits(lm, inputs):
    return np.asarray(lm(inputs), "float32")


def _greedy_ids(lm, inputs):
    lm.compile(sampler="greedy")
    out = lm.generate(inputs, max_new_tokens=NEW_TOKENS, stop_token_ids=None)
    return [np.asarray(row[length:length + NEW_TOKENS]) for row, length in zip(out["token_ids"], PROMPT_LENGTHS)]


def test_logits(models):
    dtype, tp1, tp2, _ = models
    inputs = _prompts()
    real = inputs["padding_mask"].astype(bool)
    logits_1, logits_2 = _logits(tp1, inputs)[real], _logits(tp2, inputs)[real]
    scale = float(np.abs(logits_1).max())
    diff = float(np.abs(logits_1 - logits_2).max())
    assert diff <= TOLERANCES[dtype][0] * scale, f"{dtype} logits: max |diff| {diff:.3e}, max |logit| {scale:.4f}"


def test_greedy_ids(models):
    dtype, tp1, tp2, _ = models
    inputs = _prompts()
    scale = float(np.abs(_logits(tp1, inputs)[inputs["padding_mask"].astype(bool)]).max())
    for row, (ids_1, ids_2) in enumerate(zip(_greedy_ids(tp1, inputs), _greedy_ids(tp2, inputs))):
        if np.array_equal(ids_1, ids_2):
            continue
        # Where they first differ: tp=1's logit of its own token minus its logit of tp=2's.
        at = int(np.argmax(ids_1 != ids_2))
        prefix = np.concatenate([inputs["token_ids"][row, :PROMPT_LENGTHS[row]], ids_1[:at]])[None, :]
        logits = _logits(tp1, {"token_ids": prefix, "padding_mask": np.ones_like(prefix)})[0, -1]
        gap = float(logits[ids_1[at]] - logits[ids_2[at]])
        assert abs(gap) <= TOLERANCES[dtype][0] * scale, f"{dtype} prompt {row}: ids differ at {at}, gap {gap:.3e}"


def test_adamw_steps(models):
    dtype, _, _, weights = models
    inputs = _prompts()
    ids, mask = inputs["token_ids"], inputs["padding_mask"]
    # Each position predicts the next id; a row's last real one has no target.
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    sample_weight = np.concatenate([mask[:, 1:], np.zeros_like(mask[:, :1])], axis=1)
    losses = []
    for tp in (1, 2):
        lm = _model(tp, TRAINING_DTYPE[dtype], weights)
        lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3), weighted_metrics=[])
        losses.append([float(lm.train_on_batch(inputs, targets, sample_weight=sample_weight)) for _ in range(STEPS)])
    for step, (loss_1, loss_2) in enumerate(zip(*losses), 1):
        relative = abs(loss_1 - loss_2) / max(1.0, abs(loss_1))
        assert relative <= TOLERANCES[dtype][1], f"{dtype} AdamW step {step}: loss {loss_1:.6f} vs {loss_2:.6f}"
