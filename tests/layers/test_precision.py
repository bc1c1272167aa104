"""float32 means float32: every product with float32 operands lowers with
HIGHEST precision (GPUs would otherwise run it in TF32), 16-bit products
keep JAX's default, and a precision the user set in JAX decides for all."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import mesh_scope
from tp_zoo import layers
from tp_zoo.demo import CONFIG
from tp_zoo.models.llama import LlamaBackbone
from tp_zoo.models.llama import LlamaCausalLM


def _dot_precisions(fn, *args):
    """The precision of each dot_general in fn's lowered StableHLO."""
    text = jax.jit(fn).lower(*args).as_text()
    return re.findall(r"stablehlo\.dot_general .*?precision = \[(\w+), \w+\]", text)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda dtype: layers.ColumnParallelDense(8, dtype=dtype), (4, 16)),
        (lambda dtype: layers.RowParallelDense(8, use_bias=False, dtype=dtype), (4, 16)),
        (lambda dtype: layers.ParallelMLP(16, 32, activation="silu", gated=True, dtype=dtype), (2, 3, 16)),
    ],
    ids=["column", "row", "swiglu_mlp"],
)
def test_float32_products_are_highest_and_bf16_are_default(tp, make, shape):
    for dtype, expected in (("float32", "HIGHEST"), ("bfloat16", "DEFAULT")):
        with mesh_scope(tp):
            layer = make(dtype)
            layer.build(shape)
        precisions = _dot_precisions(layer, jnp.ones(shape, dtype))
        assert precisions and set(precisions) == {expected}, (dtype, precisions)


def _tiny_lm(dtype):
    config = {**CONFIG, "vocab_size": 64, "num_hidden_layers": 1}
    with mesh_scope(2):
        return LlamaCausalLM(backbone=LlamaBackbone.from_hf_config(config, dtype=dtype), hf_config=config)


def _inputs():
    ids = np.arange(8, dtype="int32").reshape(1, 8)
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


def test_a_float32_model_forward_has_only_highest_products():
    # Attention scores and values, the fused q/k/v, MLP and LM head products.
    precisions = _dot_precisions(_tiny_lm("float32"), _inputs())
    assert len(precisions) >= 6 and set(precisions) == {"HIGHEST"}, precisions


def test_a_mixed_bfloat16_model_forward_has_no_highest_product():
    precisions = _dot_precisions(_tiny_lm("mixed_bfloat16"), _inputs())
    assert precisions and "HIGHEST" not in precisions, precisions


def test_jax_default_set_by_the_user_decides_float32_products():
    with mesh_scope(2):
        layer = layers.ColumnParallelDense(8, dtype="float32")
        layer.build((4, 16))
    x = jnp.ones((4, 16), "float32")
    with jax.default_matmul_precision("tensorfloat32"):  # TF32 on GPUs, opted into
        assert set(_dot_precisions(layer, x)) == {"HIGH"}
    assert set(_dot_precisions(layer, x)) == {"HIGHEST"}
