"""tp_zoo.distribution and the errors of bad meshes and bad shapes."""

import os
import subprocess
import sys

import jax
import keras
import pytest

import tp_zoo
from tests.helpers import mesh_scope
from tp_zoo import layers
from tp_zoo.layers.attention import padded_heads


def test_mesh_axes_and_devices():
    dist = tp_zoo.distribution(tp=4, dp=2)
    assert isinstance(dist, keras.distribution.ModelParallel)
    assert tuple(dist.device_mesh.axis_names) == ("batch", "model")
    assert tuple(dist.device_mesh.shape) == (2, 4)
    assert list(dist.device_mesh.devices.flatten()) == jax.devices()[:8]
    chosen = jax.devices()[4:6]
    assert list(tp_zoo.distribution(tp=2, devices=chosen).device_mesh.devices.flatten()) == chosen


def test_too_many_devices_says_how_many_there_are():
    with pytest.raises(ValueError, match=r"needs 16 devices, but only 8 are available.*xla_force_host_platform_device_count=16"):
        tp_zoo.distribution(tp=8, dp=2)


@pytest.mark.parametrize("kwargs", [{"tp": 0}, {"dp": 0}, {"tp": -2}, {"tp": 1.5}])
def test_degrees_below_one_are_refused(kwargs):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        tp_zoo.distribution(**kwargs)


def test_non_jax_backend_is_refused_at_import():
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    result = subprocess.run([sys.executable, "-c", "import tp_zoo"], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: tp_zoo needs Keras' JAX backend, but Keras has chosen 'numpy' (KERAS_BACKEND=numpy): "
        "set KERAS_BACKEND=jax before importing keras.")


@pytest.mark.parametrize(
    "heads,kv_heads,tp,padded_kv,padded_group",
    [
        (25, 25, 8, 32, 1),  # GPT-2 XL
        (12, 12, 8, 16, 1),  # GPT-2
        (9, 3, 2, 4, 3),  # SmolLM2-135M: a fourth, all-padding kv group (nothing smaller splits)
        (9, 3, 8, 4, 4),  # kv heads whole on each device, each device's queries inside one group
        (14, 2, 4, 2, 8),  # Qwen2.5-0.5B: padded inside the 2 groups, kv stays 2 (replicated)
        (28, 4, 8, 4, 8),  # Qwen2.5-7B
        (8, 2, 4, 2, 4),  # divisible: unchanged
    ],
)
def test_head_padding_rule(heads, kv_heads, tp, padded_kv, padded_group):
    assert padded_heads(heads, kv_heads, tp) == (padded_kv, padded_group)


def test_heads_tp_does_not_divide_are_padded_with_a_warning():
    with mesh_scope(4):
        with pytest.warns(UserWarning, match=r"6 query heads padded to 8 and 6 key/value heads to 8 for tp=4: "
                          r"2 inert heads per layer, about 33% more attention compute and weights\. "
                          r"tp values that need no padding: \[1, 2, 3, 6\]"):
            attention = layers.ParallelAttention(6, 8, 48)
        attention.build((1, 3, 48))
        keys, _ = attention.empty_cache(1, 5)
    assert attention.qkv.kernel.shape == (48, 8, 3, 8)  # 8 kv heads, each: key, value, 1 query head
    assert keys.shape == (1, 8, 5, 8) and keys.addressable_shards[0].data.shape == (1, 2, 5, 8)
    # key, value, query kernels, then biases: the separate layers' true shapes
    assert [w.shape for w in attention.get_weights()[:6]] == [(48, 6, 8)] * 3 + [(6, 8)] * 3


def test_a_mlp_width_tp_does_not_divide_is_padded_with_a_warning():
    with mesh_scope(4):
        with pytest.warns(UserWarning, match=r"MLP width 30 padded to 32 for tp=4: 2 inert units per layer"):
            mlp = layers.ParallelMLP(16, 30)
        mlp.build((2, 16))
    assert mlp.up.kernel.shape == (16, 32) and mlp.down.kernel.shape == (32, 16)
    assert [w.shape for w in mlp.get_weights()] == [(16, 30), (30,), (30, 16), (16,)]


def test_heads_that_are_not_a_multiple_of_the_kv_heads():
    with pytest.raises(ValueError, match=r"num_heads=12 is not a multiple of num_kv_heads=5"):
        layers.ParallelAttention(12, 8, 96, num_kv_heads=5)


def test_row_input_not_divisible():
    with mesh_scope(4):
        layer = layers.RowParallelDense(8)
        with pytest.raises(ValueError, match=r"input dim = 6 is not divisible by tp=4 \(its input arrives split"):
            layer.build((2, 6))


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_kv_heads_fewer_than_tp_are_replicated_per_device(tp):
    """GQA with 2 kv heads: beyond tp=2 each device holds the whole q/k/v
    kernel (it computes its own kv head and query heads), one kv head in its cache."""
    with mesh_scope(tp):
        attention = layers.ParallelAttention(8, 4, 32, num_kv_heads=2)
        attention.build((1, 3, 32))
        keys, values = attention.empty_cache(1, 5)
    local_heads = keys.addressable_shards[0].data.shape[1]
    assert values.addressable_shards[0].data.shape == keys.addressable_shards[0].data.shape
    assert local_heads == (2 // tp if tp <= 2 else 1)
    local_kernel = attention.qkv.kernel.value.addressable_shards[0].data.shape
    assert local_kernel == ((32, 1, 6, 4) if tp == 2 else (32, 2, 6, 4))
