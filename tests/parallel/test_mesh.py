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


def test_non_jax_backend_is_refused():
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    code = "import tp_zoo; tp_zoo.distribution(tp=1)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "runs on the JAX backend only, but Keras is using 'numpy'" in result.stderr


def test_heads_not_divisible_lists_working_tp():
    with mesh_scope(4):
        with pytest.raises(ValueError, match=r"6 query heads .* tp=4\. tp values that would work: \[1, 2, 3, 6\]"):
            layers.ParallelAttention(6, 8, 48)


def test_kv_heads_neither_divisible_nor_replicable():
    with mesh_scope(2):
        with pytest.raises(ValueError, match=r"12 query heads and 3 key/value heads .* \[1, 3, 6, 12\]"):
            layers.ParallelAttention(12, 8, 96, num_kv_heads=3)


def test_ffn_width_not_divisible_lists_working_tp():
    with mesh_scope(4):
        with pytest.raises(ValueError, match=r"units = 30 is not divisible by tp=4\. tp values that would work: \[1, 2, 3, 5, 6, 10, 15, 30\]"):
            layers.ParallelMLP(16, 30)


def test_row_input_not_divisible():
    with mesh_scope(4):
        layer = layers.RowParallelDense(8)
        with pytest.raises(ValueError, match=r"input dim = 6 is not divisible by tp=4"):
            layer.build((2, 6))


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_kv_heads_fewer_than_tp_are_replicated_per_device(tp):
    """GQA with 2 kv heads: each device holds whole kv kernels, one kv head in its cache."""
    with mesh_scope(tp):
        attention = layers.ParallelAttention(8, 4, 32, num_kv_heads=2)
        attention.build((1, 3, 32))
        keys, values = attention.empty_cache(1, 5)
    local_heads = keys.addressable_shards[0].data.shape[1]
    assert values.addressable_shards[0].data.shape == keys.addressable_shards[0].data.shape
    assert local_heads == (2 // tp if tp <= 2 else 1)
    assert attention.query.kernel.value.addressable_shards[0].data.shape == (32, 8 // tp, 4)
