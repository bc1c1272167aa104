"""Fully sharded data parallelism (`fsdp=`): variables and AdamW moments
split over the data-parallel devices as well as over tp.

A tiny Llama written by transformers (float32, so that the meshes differ
only by the order of float32 sums) trains three AdamW steps at each
(fsdp, tp) mesh and must give one device's losses and weights; each
device must hold its 1/fsdp of each trainable variable's tp shard and of
its moments; a run saved on one mesh resumes on another on the same curve.
"""

import keras
import numpy as np
import pytest
import torch
import transformers

import tp_zoo
from tests.helpers import assert_close
from tp_zoo.checkpoint.source import read_config
from tp_zoo.checkpoint.training_state import restore_training_state
from tp_zoo.finetune import planned_memory
from tp_zoo.models.backbone import DecoderConfig
from tp_zoo.models.memory import planned_training_memory
from tp_zoo.models.memory import training_memory
from tp_zoo.checkpoint.training_state import save_training_state

# Every width divides 4 (fsdp) x 2 (tp), so each variable splits evenly.
CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=64)
MESHES = [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)]
STEPS = 3
# float32: the meshes sum the same products in other orders (all-reduces,
# reduce-scatters); measured differences are ~1e-6 relative.
RELATIVE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fsdp_llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(path)
    return path


def _batch():
    ids = np.random.RandomState(0).randint(0, CONFIG["vocab_size"], (8, 17)).astype("int32")
    return {"token_ids": ids[:, :-1], "padding_mask": np.ones((8, 16), "int32")}, ids[:, 1:]


def _compiled(path, fsdp, tp, lora_rank=None, **load):
    lm = tp_zoo.from_preset(path, tp=tp, fsdp=fsdp, progress=False, **load)
    keras.utils.set_random_seed(0)
    if lora_rank:
        lm.backbone.enable_lora(lora_rank)
    # LoRA's B starts at zero: it takes a larger step to move the loss.
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=3e-2 if lora_rank else 1e-3), weighted_metrics=[])
    return lm


def _train(lm, steps=STEPS):
    return np.array([float(lm.train_on_batch(*_batch())) for _ in range(steps)])


def _weights(lm):
    return {v.path: np.asarray(v.numpy()) for v in lm.trainable_variables}


@pytest.fixture(scope="module")
def one_device(checkpoint):
    lm = _compiled(checkpoint, 1, 1)
    return _train(lm), _weights(lm)


def _local_bytes(value):
    """Bytes of the array held by each device (all equal here)."""
    sizes = {shard.data.nbytes for shard in value.addressable_shards}
    assert len(sizes) == 1, sizes
    return sizes.pop()


@pytest.mark.parametrize("fsdp,tp", MESHES[1:])
def test_full_fine_tuning_equals_one_device(checkpoint, one_device, fsdp, tp):
    lm = _compiled(checkpoint, fsdp, tp)
    losses = _train(lm)
    assert one_device[0][0] - one_device[0][-1] > 0.01, one_device[0]  # it learns
    assert_close(one_device[0], losses, f"losses at fsdp={fsdp} tp={tp}", rel=RELATIVE)
    weights = _weights(lm)
    for path, expected in one_device[1].items():
        assert_close(expected, weights[path], f"{path} after {STEPS} steps at fsdp={fsdp} tp={tp}", rel=RELATIVE)
    # Each device holds 1/fsdp of every trainable variable's tp shard, and of its moments.
    moments = dict(zip((v.path for v in lm.trainable_variables),
                       zip(lm.optimizer._momentums, lm.optimizer._velocities)))
    for v in lm.trainable_variables:
        tp_share = tp if "model" in str(v.value.sharding.spec) else 1
        whole = v.value.nbytes
        assert _local_bytes(v.value) * fsdp * tp_share == whole, (v.path, v.value.sharding.spec)
        for moment in moments[v.path]:
            assert _local_bytes(moment.value) * fsdp * tp_share == moment.value.nbytes, (moment.path, v.path)


def test_lora_on_an_int8_base_equals_one_device(checkpoint):
    reference = _train(_compiled(checkpoint, 1, 1, lora_rank=4, quantize="int8"))
    lm = _compiled(checkpoint, 4, 2, lora_rank=4, quantize="int8")
    assert_close(reference, _train(lm), "LoRA on int8 at fsdp=4 tp=2", rel=RELATIVE)
    assert reference[0] - reference[-1] > 0.01, reference
    base = lm.backbone.transformer_layers[0].attention.qkv.kernel
    assert _local_bytes(base.value) * 8 == base.value.nbytes  # the frozen base is split too


def test_bf16_weights_train_with_fit_as_on_one_device(checkpoint):
    """bf16 weights (tp_zoo's AdamW: float32 moments, stochastic rounding
    of each shard) through `fit`: fsdp=2 x tp=2 follows one device within
    bf16's rounding (as tests/models/test_bf16_training.py measures it)."""
    x, y = _batch()
    histories = []
    for fsdp, tp in [(1, 1), (2, 2)]:
        lm = _compiled(checkpoint, fsdp, tp, dtype="bfloat16")
        histories.append(lm.fit(x, y, batch_size=8, epochs=STEPS, verbose=0).history["loss"])
    assert histories[0][0] - histories[0][-1] > 0.01, histories[0]
    np.testing.assert_allclose(histories[1], histories[0], atol=0.01, rtol=0)


def test_resume_across_mesh_shapes_continues_the_curve(checkpoint, one_device, tmp_path):
    """Two steps at fsdp=4 x tp=2, saved; the third at fsdp=2 x tp=4, then on
    one device: both give the uninterrupted run's third loss."""
    first = _compiled(checkpoint, 4, 2)
    _train(first, steps=2)
    saved = save_training_state(first, tmp_path, 2)
    for fsdp, tp in [(2, 4), (1, 1)]:
        resumed = _compiled(checkpoint, fsdp, tp)
        assert restore_training_state(resumed, saved) == 2
        assert_close(one_device[0][2:], _train(resumed, steps=1), f"step 3 resumed at fsdp={fsdp} tp={tp}",
                     rel=RELATIVE)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(fsdp=16), r"tp=1 x fsdp=16 needs 16 devices, but only 8"),
        (dict(fsdp=2, dp=2), r"dp=2 and fsdp=2: give one of them"),
        (dict(fsdp=0), r"fsdp must be an integer >= 1"),
    ],
)
def test_bad_meshes_are_refused_in_one_line(checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tp_zoo.from_preset(checkpoint, progress=False, **kwargs)


def test_an_fsdp_that_cannot_split_the_model_is_refused_before_loading(tmp_path):
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CONFIG, "hidden_size": 36, "num_attention_heads": 6,
                                                              "num_key_value_heads": 2})).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^fsdp=8 does not divide the hidden size 36, along which"):
        tp_zoo.from_preset(tmp_path, fsdp=8, progress=False)


def test_a_batch_fsdp_does_not_divide_is_refused(checkpoint):
    lm = _compiled(checkpoint, 4, 1)
    x, y = _batch()
    with pytest.raises(ValueError, match=r"A batch of 6 is not divisible by fsdp=4"):
        lm.train_on_batch({k: v[:6] for k, v in x.items()}, y[:6])


@pytest.mark.parametrize("fsdp,tp,lora_rank", [(1, 1, None), (4, 2, None), (2, 4, None), (4, 1, 4)])
def test_the_estimate_before_loading_is_the_loaded_models(checkpoint, fsdp, tp, lora_rank):
    """What `tp-zoo finetune` prints before loading (from config.json alone)
    against the estimate of the loaded model, which counts each variable's
    shard: the weights, gradients and moments the same bytes, the whole
    step within 2%."""
    _, planned = planned_memory(read_config(checkpoint), 8, 16, lora_rank, "none", tp=tp, fsdp=fsdp)
    lm = _compiled(checkpoint, fsdp, tp, lora_rank=lora_rank)
    loaded = training_memory(lm, 8, 16, "none")
    assert planned.weights == loaded.weights and planned.gradients == loaded.gradients, (planned, loaded)
    assert abs(planned.total - loaded.total) <= 0.02 * loaded.total, (planned, loaded)


def test_fully_sharded_state_per_device_is_a_share_of_one_devices():
    """The 8B shape's full fine-tune: weights, gradients and moments per
    device at fsdp=8 are one device's / 8, plus at most one block's weights
    gathered (the target of the fsdp issue), computed from the config."""
    config = DecoderConfig(vocab_size=128256, hidden_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                           intermediate_dim=14336, norm="rms", activation="silu", gated_mlp=True, mlp_bias=False,
                           qkv_bias=False, output_bias=False, tie_embeddings=False)
    state = lambda m: m.weights + m.gradients + m.optimizer
    one = planned_training_memory(config, 8, 1024, "layers", dtype="bfloat16")
    eight = planned_training_memory(config, 8, 1024, "layers", data=8, fully_sharded=True, dtype="bfloat16")
    block = 2 * (4096 * (32 + 2 * 8) * 128 + 32 * 128 * 4096 + 3 * 4096 * 14336 + 2 * 4096)
    assert state(eight) <= state(one) / 8 + block
    assert state(eight) >= state(one) / 8 * 0.99
