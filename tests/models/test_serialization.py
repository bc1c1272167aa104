"""tp_zoo models as KerasHub citizens: .keras files, presets, class-level
from_preset and weights that do not depend on tp.

Every family saved at tp=2 reloads with the same logits: bitwise at tp=2,
within the float32 tolerance (1e-5 x max(1, max |logit|)) at tp=4 inside a
tp=4 distribution and on one device outside any.
"""

import contextlib

import keras
import keras_hub
import numpy as np
import pytest

import tp_zoo
from tests.helpers import assert_close
from tests.models import checkpoints as ckpts
from tp_zoo import layers
from tp_zoo.layers.base import AxisPadding
from tp_zoo.layers.mlp import gelu_tanh

FAMILIES = list(ckpts.FAMILY_CASES)


def _inputs(name):
    ids, mask = ckpts.batch(ckpts.CASES[name][2]["vocab_size"])
    return {"token_ids": ids, "padding_mask": mask}, mask.astype(bool)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (.keras path, tp=2 logits), each family saved once."""
    out = {}
    for name in FAMILIES:
        path = tmp_path_factory.mktemp(name)
        ckpts.save(ckpts.build_model(ckpts.CASES[name]), path / "hf")
        lm = tp_zoo.from_preset(path / "hf", tp=2, dtype="float32", progress=False)
        lm.compile(optimizer="adamw")
        x, _ = _inputs(name)
        lm.save(path / "model.keras")
        out[name] = (path, np.asarray(lm(x)))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_keras_file_reloads_at_any_tp(saved, name):
    path, ref = saved[name]
    x, real = _inputs(name)
    with tp_zoo.distribution(tp=2).scope():
        same_tp = keras.saving.load_model(path / "model.keras")
    np.testing.assert_array_equal(np.asarray(same_tp(x)), ref)
    with tp_zoo.distribution(tp=4).scope():
        tp4 = keras.saving.load_model(path / "model.keras")
    one = keras.saving.load_model(path / "model.keras")
    assert type(tp4).__name__ == type(one).__name__ == type(same_tp).__name__
    assert tp4.backbone.token_embedding.tp == 4 and one.backbone.token_embedding.tp == 1
    assert tp4.distribution is not None and one.distribution is None
    d4 = assert_close(ref[real], np.asarray(tp4(x))[real], f"{name} saved at tp=2, loaded at tp=4")
    d1 = assert_close(ref[real], np.asarray(one(x))[real], f"{name} saved at tp=2, loaded on one device")
    assert isinstance(one.loss, tp_zoo.losses.VocabParallelCrossEntropy)  # compiled again on load
    print(f"\n{name}: .keras saved at tp=2 -> tp=2 identical, tp=4 max|diff| {d4:.2e}, one device {d1:.2e}")


def test_keras_file_of_a_padded_model_reloads_at_any_tp(tmp_path):
    """Saved at tp=4 (14 query heads padded to 16), the file holds the real
    heads only: it reloads unpadded at tp=2, padded again at tp=8 (MLP 100
    padded to 104 too) and on one device."""
    name = "qwen2_14_heads_gqa2"
    ckpts.save(ckpts.build_model(ckpts.CASES[name]), tmp_path / "hf")
    x, real = _inputs(name)
    lm = tp_zoo.from_preset(tmp_path / "hf", tp=4, dtype="float32", progress=False)
    ref = np.asarray(lm(x))
    lm.save(tmp_path / "padded.keras")
    for tp in (2, 8, 1):
        with contextlib.ExitStack() as scope:
            if tp > 1:
                scope.enter_context(tp_zoo.distribution(tp=tp).scope())
            again = keras.saving.load_model(tmp_path / "padded.keras")
        assert again.backbone.transformer_layers[0].attention.padded_heads == (14 if tp < 4 else 16)
        diff = assert_close(ref[real], np.asarray(again(x))[real], f"saved at tp=4 (padded), loaded at tp={tp}")
        print(f"\n{name}: .keras saved at tp=4, loaded at tp={tp}: max |diff| {diff:.2e}")


def test_save_to_preset_reads_back_at_any_tp(saved, tmp_path):
    path, ref = saved["gpt2"]
    x, real = _inputs("gpt2")
    tp_zoo.from_preset(path / "hf", tp=2, dtype="float32", progress=False).save_to_preset(tmp_path / "preset")
    for tp in (1, 4):
        lm = tp_zoo.from_preset(tmp_path / "preset", tp=tp)
        assert lm.backbone.token_embedding.tp == tp
        assert_close(ref[real], np.asarray(lm(x))[real], f"save_to_preset, tp={tp}")
    with tp_zoo.distribution(tp=4).scope():
        theirs = keras_hub.models.CausalLM.from_preset(str(tmp_path / "preset"))  # KerasHub's own loader
    assert type(theirs).__name__ == "GPT2CausalLM"
    assert_close(ref[real], np.asarray(theirs(x))[real], "KerasHub's loader at tp=4")
    with pytest.raises(tp_zoo.errors.WrongFamilyError, match="holds a GPT2CausalLM; LlamaCausalLM"):
        tp_zoo.models.LlamaCausalLM.from_preset(tmp_path / "preset")


def test_class_level_from_preset(saved):
    path, ref = saved["opt_pre_ln"]
    lm = tp_zoo.models.OPTCausalLM.from_preset(path / "hf", tp=2, dtype="float32", progress=False)
    assert type(lm).__name__ == "OPTCausalLM" and lm.distribution is not None
    x, _ = _inputs("opt_pre_ln")
    np.testing.assert_array_equal(np.asarray(lm(x)), ref)
    backbone = tp_zoo.models.OPTBackbone.from_preset(path / "hf", tp=2, progress=False)
    assert type(backbone).__name__ == "OPTBackbone"
    with pytest.raises(tp_zoo.errors.WrongFamilyError, match=r"is a opt checkpoint .* LlamaCausalLM loads llama"):
        tp_zoo.models.LlamaCausalLM.from_preset(path / "hf", progress=False)
    with pytest.raises(tp_zoo.errors.WrongFamilyError, match="GPT2Backbone loads gpt2"):
        tp_zoo.models.GPT2Backbone.from_preset(path / "hf", progress=False)


def test_weights_are_the_same_arrays_at_every_tp(saved, tmp_path):
    """GPT-2's vocab of 101 is padded at tp=4 (to 104 rows), never visibly."""
    path, ref = saved["gpt2"]
    x, real = _inputs("gpt2")
    one = tp_zoo.from_preset(path / "hf", tp=1, dtype="float32", progress=False)
    tp4 = tp_zoo.from_preset(path / "hf", tp=4, dtype="float32", progress=False)
    assert tp4.backbone.token_embedding.embeddings.shape[0] == 104
    assert [w.shape for w in tp4.get_weights()] == [w.shape for w in one.get_weights()]
    assert [w.shape for w in tp4.backbone.get_weights()] == [w.shape for w in one.backbone.get_weights()]
    for a, b in zip(tp4.get_weights(), one.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Weights of one model into another at another tp (here: doubled) give its logits.
    doubled = [2 * w for w in one.get_weights()]
    one.set_weights(doubled)
    tp4.set_weights(doubled)
    assert_close(np.asarray(one(x))[real], np.asarray(tp4(x))[real], "set_weights across tp")
    tp4.save_weights(tmp_path / "tp4.weights.h5")
    fresh = tp_zoo.from_preset(path / "hf", tp=1, dtype="float32", progress=False)
    fresh.load_weights(tmp_path / "tp4.weights.h5")
    np.testing.assert_array_equal(fresh.get_weights()[0], doubled[0])


def test_set_weights_with_a_wrong_shape_names_the_variable(saved):
    path, _ = saved["gpt2"]
    lm = tp_zoo.from_preset(path / "hf", tp=2, dtype="float32", progress=False)
    weights = lm.get_weights()
    before = [w.copy() for w in weights]
    weights[0] = np.zeros((7, 7), "float32")
    with pytest.raises(ValueError, match=r"token_embedding/embeddings takes a value of shape \(101, 32\); "
                                         r"got one of shape \(7, 7\)"):
        lm.set_weights(weights)
    with pytest.raises(ValueError, match=r"Expected \d+ weight arrays, got 1"):
        lm.set_weights(weights[:1])
    for a, b in zip(lm.get_weights(), before):  # nothing was assigned
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "make",
    [
        lambda: layers.ColumnParallelDense(8, activation=gelu_tanh, gather_output=True),
        lambda: layers.RowParallelDense(8, use_bias=False),
        lambda: layers.QKVParallelDense(2, AxisPadding(2, 2, 2, 2), replicated=True),
        lambda: layers.HeadMergeDense(8),
        lambda: layers.QKVParallelDense(2, AxisPadding(3, 4, 2, 2)),
        lambda: layers.ColumnParallelDense(30, padding=AxisPadding.trailing(30, 32)),
        lambda: layers.VocabParallelEmbedding(10, 4),
        lambda: layers.VocabParallelLMHead(10),
        lambda: layers.ParallelAttention(4, 2, 8, num_kv_heads=2, sliding_window=3,
                                         rotary=layers.RotaryEmbedding(2, 500.0, {"rope_type": "linear", "factor": 2.0})),
        lambda: layers.ParallelMLP(8, 16, activation="gelu_tanh"),
        lambda: layers.LayerNorm(epsilon=1e-3),
        lambda: layers.RMSNorm(),
        lambda: layers.PositionEmbedding(16, 8, offset=2),
        lambda: layers.DecoderBlock(dict(num_heads=4, head_dim=2, hidden_dim=8, rotary=layers.RotaryEmbedding(2)),
                                    dict(hidden_dim=8, intermediate_dim=16, activation="silu", gated=True),
                                    norm="rms", pre_norm=False),
        lambda: tp_zoo.losses.VocabParallelCrossEntropy(ignore_class=-100),
    ],
)
def test_every_layer_config_round_trips(make):
    layer = make()
    config = keras.saving.serialize_keras_object(layer)
    assert config["registered_name"].startswith("tp_zoo>")
    again = keras.saving.deserialize_keras_object(config)
    assert type(again) is type(layer) and again.get_config() == layer.get_config()


def test_a_reloaded_model_exports_to_hugging_face(saved, tmp_path):
    """The Hugging Face config travels in the .keras file, so a reloaded
    model exports a checkpoint that loads back with the same logits."""
    from tp_zoo.checkpoint.export import export_to_hf

    path, ref = saved["opt_post_ln_proj"]
    x, real = _inputs("opt_post_ln_proj")
    reloaded = keras.saving.load_model(path / "model.keras")
    assert reloaded.hf_config["model_type"] == "opt"
    export_to_hf(reloaded, tmp_path / "exported")
    again = tp_zoo.from_preset(tmp_path / "exported", tp=2, dtype="float32", progress=False)
    np.testing.assert_array_equal(np.asarray(again(x)), ref)
