"""The RMS norm GPU kernel (run by Pallas' interpreter) against the plain
norm: values, gradients, and inside the sharded layer at tp=2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import mesh_scope
from tp_zoo import layers
from tp_zoo.layers import replicated
from tp_zoo.layers import rms_norm_kernel

RS = np.random.RandomState(0)


@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 128), (2, 8, 256)])
def test_kernel_matches_the_plain_norm_in_float32(shape):
    x = jnp.asarray(RS.standard_normal(shape) * 3, jnp.float32)
    scale = jnp.asarray(RS.standard_normal(shape[-1]), jnp.float32)
    got = rms_norm_kernel.rms_norm(x, scale, 1e-5, interpret=True)
    want = replicated.rms_norm(x, scale, 1e-5)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=2e-6)


def test_kernel_in_bfloat16_rounds_as_the_plain_norm():
    """bf16 rows and scale: the statistics in float32, then two bf16
    roundings; the two summation orders may move a value by one bf16 step
    (2**-7 relative) at most."""
    x = jnp.asarray(RS.standard_normal((16, 512)), jnp.bfloat16)
    scale = jnp.asarray(RS.standard_normal(512), jnp.bfloat16)
    got = np.asarray(rms_norm_kernel.rms_norm(x, scale, 1e-6, interpret=True), np.float32)
    want = np.asarray(replicated.rms_norm(x, scale, 1e-6), np.float32)
    assert rms_norm_kernel.rms_norm(x, scale, 1e-6, interpret=True).dtype == jnp.bfloat16
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=0)
    assert np.mean(got == want) > 0.99


def test_gradient_through_the_kernel_is_the_plain_norms(monkeypatch):
    kernel = rms_norm_kernel.rms_norm
    monkeypatch.setattr(rms_norm_kernel, "rms_norm", lambda *args: kernel(*args, interpret=True))
    x = jnp.asarray(RS.standard_normal((4, 64)), jnp.float32)
    scale = jnp.asarray(RS.standard_normal(64), jnp.float32)
    weights = jnp.asarray(RS.standard_normal((4, 64)), jnp.float32)
    plain = jax.grad(lambda s, x: jnp.sum(replicated.rms_norm(x, s, 1e-5) * weights), argnums=(0, 1))
    by_kernel = jax.grad(lambda s, x: jnp.sum(replicated._rms_norm_by_kernel(1e-5, s, x) * weights), argnums=(0, 1))
    for got, want in zip(by_kernel(scale, x), plain(scale, x)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_layer_by_kernel_equals_the_plain_layer(monkeypatch):
    """RMSNorm at tp=2 runs the kernel in a sharded region, its result
    declared as varying like its input. (Not at dp > 1: the interpreter
    then fails shard_map's check, where a GPU's compiled kernel would not.)"""
    x = RS.standard_normal((4, 1, 32)).astype("float32")
    scale = RS.standard_normal(32).astype("float32")
    with mesh_scope(2):
        norm = layers.RMSNorm(epsilon=1e-5)
        norm.build(x.shape)
    norm.set_weights([scale])
    want = np.asarray(norm(x))
    calls, kernel = [], rms_norm_kernel.rms_norm
    monkeypatch.setattr(rms_norm_kernel, "applies", lambda x: True)
    monkeypatch.setattr(rms_norm_kernel, "rms_norm", lambda *args: calls.append(1) or kernel(*args, interpret=True))
    got = np.asarray(jax.jit(lambda x: norm(x))(x))
    assert calls
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
