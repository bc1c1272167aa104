"""What the benchmarks share: model shapes, the two models, the report header."""

import glob
import os
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import tp_zoo  # noqa: E402
from tp_zoo.models.llama import LlamaBackbone  # noqa: E402
from tp_zoo.models.llama import LlamaCausalLM  # noqa: E402

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


def hf_config(shape):
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, **SHAPES[shape],
    }


def tp_zoo_model(config, tp, dtype, quantized=None):
    """tp_zoo's Llama with random weights, made directly sharded on the
    devices; with quantized="int8" its kernels are made int8 on the devices
    (zeros, scales of one: the bytes a decode step reads, never a float copy)."""
    with tp_zoo.distribution(tp=tp).scope():
        return LlamaCausalLM(backbone=LlamaBackbone.from_hf_config(config, dtype=dtype, quantized=quantized))


def keras_hub_model(config, dtype):
    """KerasHub's own single-device Llama of the same shape."""
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
        num_query_heads=config["num_attention_heads"], hidden_dim=config["hidden_size"],
        intermediate_dim=config["intermediate_size"], num_key_value_heads=config["num_key_value_heads"],
        rope_max_wavelength=config["rope_theta"], layer_norm_epsilon=config["rms_norm_eps"],
        tie_word_embeddings=config.get("tie_word_embeddings", False), dtype=dtype,
    )
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


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


def header(what):
    device = jax.devices()[0]
    return (f"{what}; {len(jax.devices())} x {device.device_kind} ({device.platform}); jax {jax.__version__}, "
            f"keras {keras.__version__}, keras_hub {keras_hub.__version__}; {time.strftime('%Y-%m-%d')}")


def add_model_arguments(parser):
    """The arguments every benchmark takes: which shape, which tp values."""
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-keras-hub", action="store_true")


def _keras_hub_int8(config, dtype):
    model = keras_hub_model(config, dtype)
    model.quantize("int8")
    return model


def each_model(config, tps, dtype, skip_keras_hub=False, quantize=None, quantized_only=False):
    """Yields (name, tp, model): KerasHub's single-device Llama first (unless
    skipped), then tp_zoo at each tp; each is freed before the next is built.
    With quantize="int8", each in its bf16 and its int8 form (only the int8
    forms with quantized_only, for shapes whose bf16 form does not fit)."""
    candidates = []
    if not skip_keras_hub and not quantized_only:
        candidates.append(("KerasHub LlamaCausalLM", 1, lambda: keras_hub_model(config, dtype)))
    if quantize and not skip_keras_hub:
        candidates.append(("KerasHub LlamaCausalLM int8", 1, lambda: _keras_hub_int8(config, dtype)))
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
