"""Sharded fine-tuning against one device: 3 AdamW steps of train_on_batch.

At tp=4 and on a dp=2 x tp=2 mesh, the loss at every step and the
weights afterwards (compared in the checkpoint's own layout, so padding
never enters) stay within max |diff| <= 1e-5 * max(1, max |ref|) of tp=1.
With heads and MLP units padded for tp, the padding stays exactly zero
(weights and AdamW moments) and training matches a tp that pads nothing.
"""

import jax
import keras
import numpy as np
import pytest

import tp_zoo
from tests.helpers import assert_close
from tests.helpers import is_padded
from tests.helpers import padded_entries
from tests.models import checkpoints as ckpts
from tp_zoo.checkpoint.export import hf_tensors
from tp_zoo.layers.base import paddings
from tp_zoo.layers.base import real_part

FAMILIES = list(ckpts.FAMILY_CASES)
MESHES = [(4, 1), (2, 2)]  # (tp, dp): tp=2 runs inside the dp=2 mesh
STEPS = 3


def _batch(vocab):
    rs = np.random.RandomState(0)
    ids = rs.randint(0, vocab, (4, 13)).astype("int32")
    mask = np.ones((4, 12), "int32")
    mask[1, 8:] = 0  # padding tokens must not count
    return {"token_ids": ids[:, :-1], "padding_mask": mask}, ids[:, 1:], mask


def _train(path, vocab, tp, dp, dtype="float32"):
    lm = tp_zoo.from_preset(path, tp=tp, dp=dp, dtype=dtype, progress=False)
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3), weighted_metrics=[])
    x, y, mask = _batch(vocab)
    losses = [float(lm.train_on_batch(x, y, sample_weight=mask)) for _ in range(STEPS)]
    return lm, losses


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request, tmp_path_factory):
    spec = ckpts.CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ckpts.save(ckpts.build_model(spec), path)
    vocab = spec[2]["vocab_size"]
    lm, losses = _train(path, vocab, 1, 1)
    return request.param, path, vocab, losses, dict(hf_tensors(lm))


@pytest.mark.parametrize("tp,dp", MESHES, ids=[f"tp{t}_dp{d}" for t, d in MESHES])
def test_three_adamw_steps_match_one_device(reference, tp, dp):
    name, path, vocab, ref_losses, ref_weights = reference
    lm, losses = _train(path, vocab, tp, dp)
    loss_diff = max(assert_close(r, g, f"loss at step {i}") for i, (r, g) in enumerate(zip(ref_losses, losses)))
    weights = dict(hf_tensors(lm))
    assert weights.keys() == ref_weights.keys()
    weight_diff = max(assert_close(ref_weights[k], weights[k], k) for k in weights)
    assert losses[-1] < losses[0]
    print(f"\n{name} tp={tp} dp={dp}: loss max|diff| {loss_diff:.2e}, weights max|diff| {weight_diff:.2e}")


def test_optimizer_state_is_sharded_like_its_parameter(llama_path):
    lm, _ = _train(llama_path, 100, 4, 1)
    by_path = {v.path: v for v in lm.trainable_variables}
    checked = 0
    for state in lm.optimizer.variables:
        for path, v in by_path.items():
            if state.path.endswith(path.replace("/", "_") + "_momentum") or state.path.endswith(
                path.replace("/", "_") + "_velocity"
            ):
                assert state.value.sharding.is_equivalent_to(v.value.sharding, v.ndim), state.path
                assert state.value.addressable_shards[0].data.shape == v.value.addressable_shards[0].data.shape
                checked += 1
    assert checked == 2 * len(by_path)


@pytest.mark.parametrize("tp", [1, 2])
def test_no_warning_of_a_mix_of_local_and_mesh_variables(llama_path, recwarn, tp):
    # On a mesh of one device (tp=1 on a chosen device) Keras kept the values it
    # made (LoRA adapters, AdamW slots, metric totals) on that device, beside
    # loaded values placed on the mesh, and warned at every compiled step.
    lm = tp_zoo.from_preset(llama_path, tp=tp, devices=jax.devices()[:tp], progress=False)
    lm.backbone.enable_lora(2)
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3))
    x, y, mask = _batch(100)
    lm.train_on_batch(x, y, sample_weight=mask)
    lm.test_on_batch(x, y, sample_weight=mask)
    lm.predict_on_batch(x)
    assert not [str(w.message) for w in recwarn if "mix of local" in str(w.message)]
    assert {type(v.value.sharding) for v in lm.variables + lm.optimizer.variables} == {jax.sharding.NamedSharding}


def test_mixed_bfloat16_trains(llama_path):
    lm, losses = _train(llama_path, 100, 2, 1, dtype="mixed_bfloat16")
    assert all(v.dtype == "float32" for v in lm.weights)
    assert lm.compute_dtype == "bfloat16"
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    _, ref = _train(llama_path, 100, 1, 1, dtype="mixed_bfloat16")
    assert_close(ref, losses, "mixed_bfloat16 losses", rel=2e-2)


def test_labels_outside_the_vocab_are_refused(llama_path):
    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="float32", progress=False)
    lm.compile(optimizer="adamw", weighted_metrics=[])
    x, y, _ = _batch(100)
    y = y.copy()
    y[0, 0] = 100
    with pytest.raises(ValueError, match=r"Labels outside the vocab \[0, 100\): \[100\]"):
        lm.train_on_batch(x, y)


def test_fine_tuned_export_matches_transformers(llama_path, tmp_path):
    import torch
    import transformers

    from tp_zoo.checkpoint.export import export_to_hf

    lm, _ = _train(llama_path, 100, 2, 1)
    out = export_to_hf(lm, tmp_path / "tuned")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x, _, mask = _batch(100)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(x["token_ids"]).long(), attention_mask=torch.tensor(mask).long()).logits.numpy()
    got = np.asarray(lm(x))
    real = mask.astype(bool)
    assert_close(ref[real], got[real], "fine-tuned logits, transformers vs tp_zoo", rel=1e-4)


def test_batch_not_divisible_by_dp_is_refused(llama_path):
    lm = tp_zoo.from_preset(llama_path, tp=2, dp=2, dtype="float32", progress=False)
    lm.compile(optimizer="adamw", weighted_metrics=[])
    x, y, _ = _batch(100)
    with pytest.raises(ValueError, match="A batch of 3 is not divisible by dp=2"):
        lm.train_on_batch({k: v[:3] for k, v in x.items()}, y[:3])
    with pytest.raises(ValueError, match="A batch of 3 is not divisible by dp=2"):
        lm.fit(x, y, batch_size=3, verbose=0)


@pytest.fixture(scope="module")
def padded_training(tmp_path_factory):
    """Qwen2 14/2 heads trained 3 steps at tp=2 (nothing padded) and at tp=8
    (16 heads, MLP 100 -> 104, vocab 100 -> 104)."""
    spec = ckpts.CASES["qwen2_14_heads_gqa2"]
    path = tmp_path_factory.mktemp("qwen2_14_heads_gqa2")
    ckpts.save(ckpts.build_model(spec), path)
    vocab = spec[2]["vocab_size"]
    return path, vocab, _train(path, vocab, 2, 1), _train(path, vocab, 8, 1)


def _moment_true_value(owner, moment):
    """An optimizer moment of `owner` at `owner`'s true shape."""
    return real_part(moment.numpy(), paddings(owner))


def _padded_and_moments(lm):
    """(padded trainable variables, (owner, AdamW moment) pairs of them)."""
    padded = {v.path.replace("/", "_"): v for v in lm.trainable_variables if is_padded(v)}
    moments = [(padded[s.name.rsplit("_", 1)[0]], s) for s in lm.optimizer.variables
               if s.name.rsplit("_", 1)[0] in padded]
    return list(padded.values()), moments


def test_padded_heads_stay_zero_and_train_as_a_tp_that_divides(padded_training):
    """3 AdamW steps (weight decay on) at tp=8 give tp=2's losses and
    weights; every padded entry of the weights and of both AdamW moments is
    still exactly zero, so the export has the checkpoint's shapes."""
    import safetensors.numpy

    path, _, (ref, ref_losses), (lm, losses) = padded_training
    assert lm.backbone.transformer_layers[0].attention.padded_heads == 16
    loss_diff = max(assert_close(r, g, f"loss at step {i}") for i, (r, g) in enumerate(zip(ref_losses, losses)))
    weights, ref_weights = dict(hf_tensors(lm)), dict(hf_tensors(ref))
    weight_diff = max(assert_close(ref_weights[k], weights[k], k) for k in ref_weights)
    file = safetensors.numpy.load_file(path / "model.safetensors")
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in file.items()}
    padded, moments = _padded_and_moments(lm)
    assert len(padded) == 5 * 2 + 2  # per layer: q/k/v kernel and bias, o, gate/up, down; the token table, LM head
    assert len(moments) == 2 * len(padded)
    for variable in padded:
        assert not np.any(padded_entries(variable)), variable.path
    for owner, moment in moments:
        assert not np.any(padded_entries(owner, moment.numpy())), moment.path
    assert losses[-1] < losses[0]
    print(f"\nqwen2 14/2 heads, tp=8 (padded) vs tp=2: loss max|diff| {loss_diff:.2e}, weights max|diff| {weight_diff:.2e}")


@pytest.mark.parametrize("tp", [2, 4])
def test_training_state_saved_padded_restores_at_another_padding(padded_training, tmp_path, tp):
    """Saved at tp=8 (16 heads), restored at tp=2 (14) and tp=4 (16, MLP
    unpadded): the same weights and AdamW moments, entry for entry, and the
    next step's loss is tp=8's."""
    from tp_zoo.checkpoint.training_state import restore_training_state
    from tp_zoo.checkpoint.training_state import save_training_state

    path, vocab, _, (lm, _) = padded_training
    saved = save_training_state(lm, tmp_path, 3)
    again = tp_zoo.from_preset(path, tp=tp, dtype="float32", progress=False)
    again.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3), weighted_metrics=[])
    assert restore_training_state(again, saved) == 3
    for a, b in zip(lm.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    theirs = {s.name: s for s in again.optimizer.variables}
    for owner, moment in _padded_and_moments(lm)[1]:
        mine = next(v for v in again.trainable_variables if v.path == owner.path)
        np.testing.assert_array_equal(_moment_true_value(owner, moment), _moment_true_value(mine, theirs[moment.name]))
    x, y, mask = _batch(vocab)
    assert_close(float(lm.train_on_batch(x, y, sample_weight=mask)), float(again.train_on_batch(x, y, sample_weight=mask)),
                 f"loss of the step after restoring at tp={tp}")
