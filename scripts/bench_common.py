"""What the benchmarks share: model shapes, the two models, the hardware
figures the floors use, the timed measurements, the report header."""

import glob
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import tp_zoo  # noqa: E402
from tp_zoo.checkpoint.tensor_files import write_safetensors  # noqa: E402
from tp_zoo.models.llama import LlamaBackbone  # noqa: E402
from tp_zoo.models.llama import LlamaCausalLM  # noqa: E402

# The floors' hardware figures, for one H200. Memory: the bandwidth every
# decode floor in docs/benchmarks.md divides by (the data sheet says 4.8
# TB/s; bench_decode.py's copy test has measured 2.7-3.4 TB/s read + write).
# Compute: about what a large bf16 matmul reaches on one H200 (the data
# sheet's dense figure is 989 TFLOP/s; bench_scaling.py prints its own
# run's product beside it), the peak model TFLOP/s are a share of.
HBM_BANDWIDTH = 4.3e12  # bytes/s
BF16_PEAK_FLOPS = 790e12  # FLOP/s

SHAPES = {
    # For a CPU smoke run: proves the scripts work, nothing more.
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4),
    "llama3_1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
    "llama3_70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
}


def hf_config(shape, **overrides):
    """The Hugging Face config.json of a Llama of `shape` (`overrides`, such
    as max_position_embeddings, replace its entries)."""
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, **SHAPES[shape], **overrides,
    }


def tp_zoo_model(config, tp, dtype, quantized=None, dp=1, fsdp=1):
    """tp_zoo's Llama with random weights, made directly sharded on the
    devices (a (dp, tp) mesh, or (fsdp, tp) with the variables split over
    fsdp too); with quantized="int8" its kernels are made int8 on the
    devices (zeros, scales of one: the bytes a decode step reads, never a
    float copy)."""
    with tp_zoo.distribution(tp=tp, dp=dp, fsdp=fsdp).scope():
        return LlamaCausalLM(backbone=LlamaBackbone.from_hf_config(config, dtype=dtype, quantized=quantized))


def keras_hub_model(config, dtype, quantized=None):
    """KerasHub's own single-device Llama of the same shape (quantized="int8":
    then its own `quantize("int8")`)."""
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
        num_query_heads=config["num_attention_heads"], hidden_dim=config["hidden_size"],
        intermediate_dim=config["intermediate_size"], num_key_value_heads=config["num_key_value_heads"],
        rope_max_wavelength=config["rope_theta"], layer_norm_epsilon=config["rms_norm_eps"],
        tie_word_embeddings=config.get("tie_word_embeddings", False), dtype=dtype,
    )
    model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    if quantized:
        model.quantize(quantized)
    return model


def batch_of(lengths, width):
    """Prompts of random ids (seeded), one row per length, right-padded to
    `width`, with their padding mask."""
    rs = np.random.RandomState(0)
    ids = np.zeros((len(lengths), width), "int32")
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rs.randint(3, 1000, length)
        mask[row, :length] = 1
    return {"token_ids": ids, "padding_mask": mask}


def best_time(call, repeats):
    """The fastest of `repeats` timed calls of `call()`, after one untimed."""
    jax.block_until_ready(call())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        best = min(best, time.perf_counter() - start)
    return best


def kernel_events(call, repeats):
    """(name, nanoseconds) of every GPU kernel that `repeats` calls of
    `call()` ran (after one untimed), read from a profiler trace."""
    jax.block_until_ready(call())
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(repeats):
                jax.block_until_ready(call())
        [path] = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
        planes = jax.profiler.ProfileData.from_file(path).planes
        return [
            (event.name, event.duration_ns)
            for plane in planes if plane.name.startswith("/device:GPU")
            for line in plane.lines if line.name.startswith("Stream")
            for event in line.events
        ]


def device_time(call, repeats):
    """Seconds of GPU kernel time per call of `call()` (the kernels' own
    durations summed, so host dispatch does not count). Without a GPU:
    best_time."""
    if not tp_zoo.parallel.on_gpu():
        return best_time(call, repeats)
    return sum(ns for _, ns in kernel_events(call, repeats)) / 1e9 / repeats


def generate_call(lm, lengths, new):
    """A generate() of `new` tokens per row: tp_zoo's max_new_tokens, or
    KerasHub's max_length (its rows all end at one length)."""
    if isinstance(lm, LlamaCausalLM):
        inputs = batch_of(lengths, max(lengths))
        return lambda: lm.generate(inputs, max_new_tokens=new, stop_token_ids=None)
    inputs = batch_of(lengths, max(lengths) + new)
    return lambda: lm.generate(inputs, max_length=max(lengths) + new, stop_token_ids=None)


def stream_call(lm, lengths, new):
    """tp_zoo's streamed generation of `new` tokens per row (`stream_ids`:
    STREAM_STEPS decode steps per compiled call), read to the end."""
    from tp_zoo.models import generation

    inputs = batch_of(lengths, max(lengths))
    return lambda: list(generation.stream_ids(lm, inputs, max_new_tokens=new, stop_token_ids=None))


def per_token_ms(lm, batch, prompt, new, repeats, call=generate_call):
    """Milliseconds per new token of a batch of `prompt`-token prompts:
    (t(prompt + new) - t(prompt + 1)) / (new - 1), each t the best of
    `repeats` calls (`call`: generate_call or stream_call) after a warm-up,
    so that prefill and compilation cancel out."""
    t_long = best_time(call(lm, [prompt] * batch, new), repeats)
    t_one = best_time(call(lm, [prompt] * batch, 1), repeats)
    return 1000 * (t_long - t_one) / (new - 1)


def model_bytes(lm):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in lm.weights)


def kv_bytes_per_token(config, itemsize):
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * itemsize


def decode_bytes_per_device(lm, config, tp, itemsize):
    """(weight bytes, KV-cache bytes per cached token) one device reads in a
    decode step: the weights split tp ways, the KV cache split by kv heads
    (which are replicated past tp = kv heads)."""
    return model_bytes(lm) / tp, kv_bytes_per_token(config, itemsize) / min(tp, config["num_key_value_heads"])


def decode_floor_ms(weight_bytes, kv_bytes, batch, cached_tokens, bandwidth):
    """The memory floor of one decode step: every weight byte and every row's
    `cached_tokens` of KV cache read once, at `bandwidth` bytes/s."""
    return 1000 * (weight_bytes + batch * cached_tokens * kv_bytes) / bandwidth


def copy_bandwidth():
    """Bytes read + written per second by a device copy of 1 GiB."""
    x = jnp.ones((2**28,), jnp.float32)
    copy = jax.jit(lambda x: x * 1.0001)
    seconds = best_time(lambda: copy(x), 5)
    return 2 * x.nbytes / seconds


def matmul_rate(size):
    """FLOP/s of a bf16 (size x size) @ (size x size) product on one device."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    product = jax.jit(lambda a: a @ a)
    return 2 * size**3 / best_time(lambda: product(a), 5)


def best_forward_time(lm, tokens, repeats):
    """Seconds of a jitted forward pass (logits of every position) of one
    row of `tokens` random ids, best of `repeats` after a warm-up."""
    ids = np.random.RandomState(0).randint(0, 1000, (1, tokens)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    values = ([v.value for v in lm.trainable_variables], [v.value for v in lm.non_trainable_variables])
    forward = jax.jit(lambda values, x: lm.stateless_call(*values, x)[0])
    return best_time(lambda: forward(values, x), repeats)


def compile_for_training(lm):
    """AdamW and a cross-entropy loss: tp_zoo's default, the vocab-parallel
    one; KerasHub's Llama, Keras' sparse categorical one on its logits."""
    loss = {} if isinstance(lm, LlamaCausalLM) else {
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4), weighted_metrics=[], **loss)


def training_batch(batch, seq, vocab):
    """A fixed random batch (seeded): (x, y), x the (batch, seq) token ids
    with a padding mask of ones, y the ids that follow each position."""
    rs = np.random.RandomState(0)
    ids = rs.randint(0, vocab, (batch, seq + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((batch, seq), "int32")}
    return x, ids[:, 1:]


def median_step_time(lm, batch, seq, vocab, warmup, steps):
    """Seconds of one `train_on_batch` on a fixed random (batch, seq) batch:
    the median of `steps` steps after `warmup` (compilation included there)."""
    x, y = training_batch(batch, seq, vocab)
    for _ in range(warmup):
        lm.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = lm.train_on_batch(x, y)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_steps(step, warmup, steps, sync=None):
    """(median seconds of a step, the losses of the timed steps): `step()`
    runs one training step and returns its loss as a Python float (which
    waits for the step); `sync()`, if given, waits for the device before
    and after each timed step. `warmup` untimed steps first (compilation)."""
    for _ in range(warmup):
        step()
    times, losses = [], []
    for _ in range(steps):
        if sync:
            sync()
        start = time.perf_counter()
        loss = step()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
        losses.append(loss)
    return statistics.median(times), losses


def peak_device_bytes():
    """The JAX process's peak bytes in use on its first device (None where the
    platform does not report it, as on CPU)."""
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def library_versions(*names):
    """"name version, ..." of installed distributions, read from their metadata
    without importing them ("name -" for one not installed)."""
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    return ", ".join(f"{name} {version(name)}" for name in names)


def torch_llama(config, dtype="bfloat16", device=None, attn_implementation="sdpa"):
    """transformers' LlamaForCausalLM of the same Hugging Face config, random
    weights made directly on `device` (default: cuda when torch sees a GPU,
    else cpu) in `dtype`."""
    import torch
    import transformers

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf = transformers.LlamaConfig.from_dict({k: v for k, v in config.items() if k != "model_type"})
    # transformers 5 names the argument dtype (4.x: torch_dtype).
    dtype_argument = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM._from_config(
            hf, attn_implementation=attn_implementation, **{dtype_argument: getattr(torch, dtype)})


def trainable_parameters(lm):
    return sum(int(np.prod(v.shape)) for v in lm.trainable_variables)


def training_flops(parameters, tokens):
    """Model FLOPs of training on `tokens` tokens: 6 x parameters x tokens
    (2 forward, 4 backward; attention's score and value products are not
    counted, nor is rematerialization)."""
    return 6 * parameters * tokens


def checkpoint_config(shape, layers=None):
    """The config.json of write_llama_checkpoint's checkpoint."""
    c = {**hf_config(shape), "tie_word_embeddings": False, "dtype": "bfloat16"}
    if layers:
        c["num_hidden_layers"] = layers
    return c


def write_llama_checkpoint(directory, shape, layers=None):
    """A Llama-shaped bf16 safetensors checkpoint of `shape` (cut to `layers`
    layers if given) in `directory`, random weights; config.json is written
    last. Returns {tensor name: bytes}."""
    c = checkpoint_config(shape, layers)
    layers = c["num_hidden_layers"]
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    # Random values are slow to draw at 8B scale; a random tile repeated is as good for timing.
    tile = (0.02 * np.random.default_rng(0).standard_normal(1 << 20, dtype=np.float32)).astype(ml_dtypes.bfloat16)
    tensors = ((n, np.resize(tile, s)) for n, s in shapes.items())
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", tensors)
    (directory / "config.json").write_text(json.dumps(c))
    return {n: int(np.prod(s)) * 2 for n, s in shapes.items()}


def read_into_page_cache(path):
    """Reads the file once, so that a load that follows times the loader, not the disk."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def timed_load(directory, tp):
    """(model, seconds): tp_zoo.from_preset of `directory` at `tp` until every
    weight is on its devices."""
    start = time.perf_counter()
    lm = tp_zoo.from_preset(directory, tp=tp, progress=False)
    for v in lm.weights:
        v.value.block_until_ready()
    return lm, time.perf_counter() - start


def header(what, more=""):
    """One line: `what`, the devices, the versions of jax, keras, keras_hub
    (and `more`, e.g. library_versions("torch")), the date."""
    device = jax.devices()[0]
    more = f", {more}" if more else ""
    return (f"{what}; {len(jax.devices())} x {device.device_kind} ({device.platform}); jax {jax.__version__}, "
            f"keras {keras.__version__}, keras_hub {keras_hub.__version__}{more}; {time.strftime('%Y-%m-%d')}")


def add_model_arguments(parser):
    """The arguments every benchmark takes: which shape, which tp values."""
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-keras-hub", action="store_true")


def each_model(config, tps, dtype, skip_keras_hub=False, quantize=None, quantized_only=False):
    """Yields (name, tp, model): KerasHub's single-device Llama first (unless
    skipped), then tp_zoo at each tp; each is freed before the next is built.
    With quantize="int8", each in its bf16 and its int8 form (only the int8
    forms with quantized_only, for shapes whose bf16 form does not fit)."""
    candidates = []
    if not skip_keras_hub and not quantized_only:
        candidates.append(("KerasHub LlamaCausalLM", 1, lambda: keras_hub_model(config, dtype)))
    if quantize and not skip_keras_hub:
        candidates.append(("KerasHub LlamaCausalLM int8", 1, lambda: keras_hub_model(config, dtype, quantize)))
    if not quantized_only:
        candidates += [("tp_zoo", tp, (lambda tp=tp: tp_zoo_model(config, tp, dtype))) for tp in tps]
    if quantize:
        candidates += [("tp_zoo int8", tp, (lambda tp=tp: tp_zoo_model(config, tp, dtype, quantize))) for tp in tps]
    for name, tp, build in candidates:
        keras.utils.set_random_seed(0)
        model = build()
        yield name, tp, model
        del model
        keras.backend.clear_session()
