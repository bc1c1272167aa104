"""Weight-only int8 (`quantize("int8")`): the int8 values are stored
output-major, (*out_dims, *in_dims), split as the kernel's dims were, and
get_weights shows them in the kernel's order; the values and scales are the
same at every tp (the scale is a max over the whole reduction dim, taken on
the global array), quantized logits agree across tp within the float32
tolerance and stay within 5% of the float model's, generation and .keras
files work, and bad requests leave the model as it was.
"""

import jax.numpy as jnp
import keras
import numpy as np
import pytest

import tp_zoo
from tests.helpers import assert_close
from tests.helpers import mesh_scope
from tests.models import checkpoints as ckpts
from tp_zoo import layers
from tp_zoo.kernels import int8_matmul
from tp_zoo.layers.base import weight_views
from tp_zoo.layers.quantize import int8 as q8
from tp_zoo.layers.storage import to_kernel_order
from tp_zoo.layers.storage import to_output_major

M = tp_zoo.parallel.MODEL

RS = np.random.RandomState(0)
VOCAB = ckpts.CASES["llama_gqa_llama3_rope"][2]["vocab_size"]

# (make layer, input shape, kernel shape, bias shape, the int8 values' shape and layout)
LAYERS = {
    "column": (lambda: layers.ColumnParallelDense(16), (2, 3, 8), (8, 16), (16,), (16, 8), (M, None)),
    "row": (lambda: layers.RowParallelDense(8), (2, 3, 16), (16, 8), (8,), (8, 16), (None, M)),
    "head_merge": (lambda: layers.HeadMergeDense(8), (2, 3, 4, 6), (4, 6, 8), (8,), (8, 4, 6), (None, M, None)),
}


@pytest.mark.parametrize("rows, k, n", [(1, 256, 256), (5, 384, 128), (16, 128, 512), (33, 1280, 256)])
def test_int8_matmul_kernel_exact_on_integer_operands(rows, k, n):
    """The GPU kernel (run by the Pallas interpreter): integer-valued bf16
    rows times int8 values, summed in float32, are exact, so it must match
    numpy bit for bit, whatever its split of the reduction."""
    rs = np.random.RandomState(rows)
    x = rs.randint(-8, 9, (rows, k)).astype("float32")
    values = rs.randint(-127, 128, (n, k)).astype("int8")  # output-major
    got = np.asarray(int8_matmul.int8_matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(values), interpret=True))
    assert got.dtype == np.float32 and got.shape == (rows, n)
    np.testing.assert_array_equal(got, x.astype("int64") @ values.astype("int64").T)


def test_int8_matmul_kernel_applies_only_on_gpu_to_few_rows_of_whole_blocks():
    assert not int8_matmul.applies(jnp.zeros((1, 256), jnp.bfloat16), jnp.zeros((256, 256), jnp.int8))


@pytest.mark.parametrize("n_in", [1, 2])
def test_int8_product_of_output_major_values_is_x_times_the_kernel(n_in):
    """int8_product(x, values) with output-major values (*out, *in): x times
    the kernel (*in, *out) they stand for, exact on integer operands."""
    rs = np.random.RandomState(3)
    kernel = rs.randint(-127, 128, (4, 6, 5)).astype("int8")  # in dims (4,) or (4, 6)
    x = rs.randint(-8, 9, (2, 3) + kernel.shape[:n_in]).astype("float32")
    values = to_output_major(kernel, n_in)
    assert values.shape == kernel.shape[n_in:] + kernel.shape[:n_in]
    got = np.asarray(q8.int8_product(jnp.asarray(x), jnp.asarray(values), n_in))
    expected = np.tensordot(x.astype("int64"), kernel.astype("int64"), axes=n_in)
    np.testing.assert_array_equal(got, expected)


def _quantized_layer(name, tp, kernel, bias):
    make, in_shape, *_ = LAYERS[name]
    with mesh_scope(tp):
        layer = make()
        layer.build(in_shape)
    layer.set_weights([kernel, bias])
    x = np.random.RandomState(1).standard_normal(in_shape).astype("float32")
    float_y = np.asarray(layer(x))
    layer.quantize("int8")
    return layer, x, float_y


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_int8_values_and_scales_identical_at_every_tp(name):
    _, in_shape, kernel_shape, bias_shape, values_shape, values_layout = LAYERS[name]
    kernel = RS.standard_normal(kernel_shape).astype("float32")
    kernel[..., 0] *= 50.0  # channels of very different ranges
    bias = RS.standard_normal(bias_shape).astype("float32")
    ref = None
    for tp in (1, 2, 4):
        layer, x, float_y = _quantized_layer(name, tp, kernel, bias)
        assert layer.kernel.dtype == "int8" and layer.kernel_scale.dtype == "float32"
        assert tuple(layer.kernel.shape) == values_shape  # output-major
        n_in = len(layer.in_trailing)
        assert tuple(layer.kernel_scale.shape) == kernel_shape[n_in:]
        if tp > 1:  # the values split as the kernel's dims were, the scale as its output dims
            for var, layout in ((layer.kernel, values_layout), (layer.kernel_scale, layer.kernel_layout[n_in:])):
                wanted = tp_zoo.parallel.sharding(layer.mesh_info, layout)
                assert var.value.sharding.is_equivalent_to(wanted, len(layout)), (var.path, var.value.sharding)
        values, scale = to_kernel_order(layer.kernel.numpy(), n_in), layer.kernel_scale.numpy()
        assert np.abs(values.astype(int)).max() == 127
        y = np.asarray(layer(x))
        if ref is None:
            expected_scale = np.abs(kernel).max(axis=tuple(range(n_in))) / 127
            np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
            np.testing.assert_allclose(values * scale, kernel, atol=float(scale.max()) / 2 + 1e-6)
            assert_close(float_y, y, f"{name} int8 vs float", rel=0.05)
            ref = (values, scale, y)
        else:
            np.testing.assert_array_equal(values, ref[0], err_msg=f"{name} tp={tp}")
            np.testing.assert_array_equal(scale, ref[1], err_msg=f"{name} tp={tp}")
            assert_close(ref[2], y, f"{name} int8 output at tp={tp}")
        weights = layer.get_weights()  # true shapes, the same at every tp
        (shown,) = [w for w in weights if w.dtype == np.int8]
        np.testing.assert_array_equal(shown, values)  # in the kernel's order
        layer.set_weights(weights)
        np.testing.assert_array_equal(np.asarray(layer(x)), y)


# --- the tiny Llama ------------------------------------------------------------------
def _inputs(vocab):
    ids, mask = ckpts.batch(vocab)
    return {"token_ids": ids, "padding_mask": mask}, mask.astype(bool)


@pytest.fixture(scope="module")
def quantized_models(llama_path):
    """tp -> (quantized lm, its logits), and the float logits at tp=1."""
    x, _ = _inputs(VOCAB)
    out = {}
    float_logits = None
    for tp in (1, 2, 4):
        lm = tp_zoo.from_preset(llama_path, tp=tp, dtype="float32", progress=False)
        if tp == 1:
            float_logits = np.asarray(lm(x))
        lm.quantize("int8")
        out[tp] = (lm, np.asarray(lm(x)))
    return out, float_logits


def test_quantized_logits_same_at_every_tp_and_close_to_float(quantized_models):
    models, float_logits = quantized_models
    _, real = _inputs(VOCAB)
    ref = models[1][1]
    for tp in (2, 4):
        d = assert_close(ref[real], models[tp][1][real], f"int8 logits tp={tp} vs tp=1")
        print(f"\nint8 tp={tp} vs tp=1: max|diff| {d:.2e}")
        for a, b in zip(models[1][0].get_weights(), models[tp][0].get_weights()):
            np.testing.assert_array_equal(a, b)
    bound = 0.05 * np.abs(float_logits[real]).max()
    err = np.abs(float_logits[real] - ref[real]).max()
    print(f"int8 vs float: max|diff| {err:.3e} (5% of max|logit|: {bound:.3e})")
    assert err <= bound
    backbone = models[2][0].backbone
    projections = backbone.quantizable_layers()
    assert len(projections) == backbone.num_layers * 4  # q/k/v, o, gate/up, down
    assert all(p.kernel.dtype == "int8" for p in projections)
    head = models[2][0].lm_head  # untied here: int8 too, a scale per vocab column, split on the vocab
    assert head.kernel.dtype == "int8" and head.kernel_scale.shape == (backbone.vocab_size,)
    assert backbone.token_embedding.embeddings.dtype == "float32"  # the token table stays float


def _int8_layers(lm):
    """The first block's q/k/v, o, gate/up and down, and the LM head."""
    block = lm.backbone.transformer_layers[0]
    return [block.attention.qkv, block.attention.output_dense, block.mlp.up, block.mlp.down, lm.lm_head]


def test_int8_values_stored_output_major_split_as_the_kernels_at_tp2(quantized_models, llama_path):
    """Each int8 variable of the tp=2 model: output-major, (*out_dims,
    *in_dims), each dim split as in the float kernel; get_weights shows
    the values in the kernel's order: the float kernels' shapes, each
    within half a scale of the float weight."""
    models, _ = quantized_models
    lm = models[2][0]
    b = lm.backbone
    expected = [  # (values shape, layout) of _int8_layers
        ((b.num_kv_heads, 2 + b.num_heads // b.num_kv_heads, b.head_dim, b.hidden_dim), (M, None, None, None)),
        ((b.hidden_dim, b.num_heads, b.head_dim), (None, M, None)),
        ((2, b.intermediate_dim, b.hidden_dim), (None, M, None)),
        ((b.hidden_dim, b.intermediate_dim), (None, M)),
        ((b.vocab_size, b.hidden_dim), (M, None)),
    ]
    float_lm = tp_zoo.from_preset(llama_path, tp=2, dtype="float32", progress=False)
    for layer, float_layer, (shape, layout) in zip(_int8_layers(lm), _int8_layers(float_lm), expected):
        assert layer.kernel.dtype == "int8" and tuple(layer.kernel.shape) == shape, layer.name
        sharding = tp_zoo.parallel.sharding(layer.mesh_info, layout)
        assert layer.kernel.value.sharding.is_equivalent_to(sharding, len(shape)), layer.name
        local = tuple(n // 2 if d == M else n for n, d in zip(shape, layout))
        assert {s.data.shape for s in layer.kernel.value.addressable_shards} == {local}, layer.name
        views = zip(weight_views(layer.kernel), weight_views(layer.kernel_scale), weight_views(float_layer.kernel))
        for (path, values), (_, scale), (_, kernel) in views:
            assert values.shape == kernel.shape, path
            assert np.abs(values * scale - kernel).max() <= scale.max() / 2 * (1 + 1e-6), path


def test_quantized_at_dp_2_and_in_bfloat16(quantized_models, llama_path):
    models, float_logits = quantized_models
    x, real = _inputs(VOCAB)
    x4 = {k: np.concatenate([v, v[:1]]) for k, v in x.items()}  # 4 rows: dp=2 splits them
    ref = np.asarray(models[1][0](x4))
    lm = tp_zoo.from_preset(llama_path, tp=2, dp=2, dtype="float32", progress=False)
    lm.quantize("int8")
    real4 = x4["padding_mask"].astype(bool)
    assert_close(ref[real4], np.asarray(lm(x4))[real4], "int8 at tp=2, dp=2 vs tp=1")
    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="bfloat16", progress=False)
    lm.quantize("int8")
    assert lm.backbone.transformer_layers[0].mlp.down.kernel_scale.dtype == "float32"
    got = np.asarray(lm(x)).astype("float32")
    err = np.abs(got[real] - float_logits[real]).max()
    assert err <= 0.05 * np.abs(float_logits[real]).max(), err


def test_greedy_generate_on_quantized_model(quantized_models):
    models, _ = quantized_models
    prompt = {"token_ids": np.array([[5, 17, 42, 8, 0, 0, 0, 0, 0, 0, 0, 0]], "int32"),
              "padding_mask": np.array([[1] * 4 + [0] * 8], "int32")}
    results = []
    for tp in (1, 2):
        lm = models[tp][0]
        lm.compile(sampler="greedy")
        results.append(np.asarray(lm.generate(dict(prompt), stop_token_ids=None)["token_ids"]))
    np.testing.assert_array_equal(results[0][0, :4], [5, 17, 42, 8])
    np.testing.assert_array_equal(results[0], results[1])


def _snapshot(lm):
    return [(v.path, str(v.dtype), np.asarray(v.numpy())) for v in lm.weights]


def _assert_unchanged(before, lm):
    after = _snapshot(lm)
    assert [(p, d) for p, d, _ in before] == [(p, d) for p, d, _ in after]
    for (_, _, a), (_, _, b) in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_bad_requests_leave_the_model_unchanged(llama_path):
    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="float32", progress=False)
    before = _snapshot(lm)
    for mode in ("int4", "fp8", "float8", None):
        with pytest.raises(ValueError, match=r"supports 'int8'"):
            lm.quantize(mode)
    with pytest.raises(ValueError, match=r"supports 'int8'"):
        lm.backbone.quantize("int4")
    _assert_unchanged(before, lm)
    assert lm.backbone.quantized is None

    lm.compile(optimizer="adamw")
    x, _ = _inputs(VOCAB)
    lm.train_on_batch(x, x["token_ids"])
    before = _snapshot(lm)
    with pytest.raises(ValueError, match="training has started"):
        lm.quantize("int8")
    _assert_unchanged(before, lm)

    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="float32", progress=False)
    lm.quantize("int8")
    before = _snapshot(lm)
    with pytest.raises(ValueError, match="already quantized"):
        lm.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        lm.backbone.transformer_layers[0].mlp.up.quantize("int8")
    _assert_unchanged(before, lm)


def test_keras_file_of_quantized_model_reloads_quantized_at_another_tp(quantized_models, tmp_path):
    models, _ = quantized_models
    lm, ref = models[2]
    x, real = _inputs(VOCAB)
    lm.save(tmp_path / "q.keras")
    for tp in (4, 1):
        with mesh_scope(tp):
            loaded = keras.saving.load_model(tmp_path / "q.keras")
        assert loaded.backbone.quantized == "int8"
        assert loaded.backbone.transformer_layers[0].attention.qkv.tp == tp
        assert all(p.kernel.dtype == "int8" for p in loaded.backbone.quantizable_layers())
        assert_close(ref[real], np.asarray(loaded(x))[real], f".keras int8 saved at tp=2, loaded at tp={tp}")
        for a, b in zip(lm.get_weights(), loaded.get_weights()):
            np.testing.assert_array_equal(a, b)
    lm.save_to_preset(tmp_path / "preset")  # KerasHub preset: reloads quantized too
    loaded = tp_zoo.from_preset(tmp_path / "preset", tp=4)
    assert loaded.backbone.quantized == "int8"
    assert_close(ref[real], np.asarray(loaded(x))[real], "int8 preset saved at tp=2, loaded at tp=4")


def test_lora_on_quantized_base(llama_path):
    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="float32", progress=False)
    lm.quantize("int8")
    x, real = _inputs(VOCAB)
    ref = np.asarray(lm(x))
    lm.backbone.enable_lora(2)
    qkv = lm.backbone.transformer_layers[0].attention.qkv
    assert qkv.lora_enabled and not qkv.kernel.trainable
    assert [name for name, _ in qkv.lora_variables()] == [
        "value_lora_kernel_a", "value_lora_kernel_b", "query_lora_kernel_a", "query_lora_kernel_b"
    ]
    assert_close(ref[real], np.asarray(lm(x))[real], "LoRA (B = 0) on int8")
    kernel = qkv.kernel.numpy()
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    lm.train_on_batch(x, x["token_ids"])
    np.testing.assert_array_equal(qkv.kernel.numpy(), kernel)  # the int8 base is frozen
    assert np.any(qkv.query_lora_kernel_b.numpy())
    tuned = np.asarray(lm(x))
    lm.backbone.merge_lora()  # folded in and quantized again
    assert qkv.kernel.dtype == "int8" and not np.any(qkv.query_lora_kernel_b.numpy())
    assert_close(tuned[real], np.asarray(lm(x))[real], "merged LoRA, requantized", rel=0.05)


def test_lora_steps_on_int8_base_same_at_every_tp(llama_path):
    """Three Adam steps of LoRA on the int8 base from the same start (the
    tp=1 model's adapters, copied at true shapes): the same losses and
    adapters at tp 1, 2 and 4, to the float32 tolerance."""
    x, _ = _inputs(VOCAB)
    start, runs = None, {}
    for tp in (1, 2, 4):
        lm = tp_zoo.from_preset(llama_path, tp=tp, dtype="float32", progress=False)
        lm.quantize("int8")
        lm.backbone.enable_lora(2)
        if start is None:
            start = lm.get_weights()
        lm.set_weights(start)
        lm.compile(optimizer=keras.optimizers.Adam(1e-2))
        losses = [float(lm.train_on_batch(x, x["token_ids"], return_dict=True)["loss"]) for _ in range(3)]
        runs[tp] = (losses, lm.get_weights())
    ref_losses, ref_weights = runs[1]
    assert ref_losses[-1] < ref_losses[0]  # the adapters learn
    for tp in (2, 4):
        losses, weights = runs[tp]
        d_loss = assert_close(np.array(ref_losses), np.array(losses), f"LoRA losses on int8, tp={tp}")
        d_weights = max(assert_close(a, b, f"weights after LoRA steps on int8, tp={tp}")
                        for a, b in zip(ref_weights, weights))
        print(f"\nLoRA on int8, tp={tp} vs 1: losses {d_loss:.2e}, weights {d_weights:.2e}")
