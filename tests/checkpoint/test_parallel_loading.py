"""The loader copies a variable's blocks to their devices concurrently.

What it must keep from reading them one after another: every variable
bitwise what a one-device load gives (at tp values that pad heads and MLP,
replicate kv heads, and split fused q/k/v, in float32, bfloat16 and int8);
errors raised in a copying thread reach the caller unchanged, once no copy
is still running; and host memory holds at most two chunks of rows per block.
"""

import threading
import time
import tracemalloc

import numpy as np
import pytest

import tp_zoo
from tests.models import checkpoints as ckpts
from tp_zoo.checkpoint import loader
from tp_zoo.errors import CheckpointMismatchError
from tp_zoo.layers.base import true_value


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory):
    out = {}
    for name in ("gpt2_25_heads_ffn_100", "qwen2_14_heads_gqa2"):
        path = tmp_path_factory.mktemp(name)
        ckpts.save(ckpts.build_model(ckpts.CASES[name]), path)
        out[name] = path
    return out


def _load(path, tp, dtype, quantize=None):
    return tp_zoo.from_preset(path, tp=tp, dtype=dtype, quantize=quantize, progress=False)


def _true_values(lm):
    return {v.path: true_value(v) for v in lm.weights}


@pytest.mark.parametrize(
    "name,dtype,quantize",
    [
        ("gpt2_25_heads_ffn_100", "float32", None),  # fused q/k/v; 25 heads: 26 at tp=2, 28 at tp=4
        ("qwen2_14_heads_gqa2", "bfloat16", None),  # 14 heads: 16 at tp=4, where its 2 kv heads are replicated
        ("qwen2_14_heads_gqa2", "float32", "int8"),
    ],
)
def test_parallel_loads_are_bitwise_a_one_device_load(checkpoint_dirs, monkeypatch, name, dtype, quantize):
    reference = _true_values(_load(checkpoint_dirs[name], 1, dtype, quantize))
    # Chunks of a few rows, so that every block is copied in many chunks.
    monkeypatch.setattr(loader, "_CHUNK_BYTES", 256)
    for tp in (2, 4):
        lm = _load(checkpoint_dirs[name], tp, dtype, quantize)
        assert lm.load_stats["bytes_read"] == lm.load_stats["checkpoint_bytes"]  # shared blocks read once
        values = _true_values(lm)
        assert values.keys() == reference.keys()
        for path, value in values.items():
            ref = reference[path]
            assert (value.dtype, value.shape) == (ref.dtype, ref.shape), path
            assert value.tobytes() == ref.tobytes(), f"{path} at tp={tp} differs from tp=1"


def test_error_in_a_copying_thread_reaches_the_caller_after_every_copy_ended(checkpoint_dirs, monkeypatch):
    monkeypatch.setattr(loader, "_CHUNK_BYTES", 256)
    copy_chunk = loader._copy_chunk
    running, ended = [], []
    lock = threading.Lock()
    message = "the copy to the first device failed"

    def failing_copy(out, chunk, start, shape, device, axes):
        if device.id == 0:
            raise CheckpointMismatchError(message)
        with lock:
            running.append(device)
        time.sleep(0 if any(start) else 0.2)  # still copying when the other device fails
        result = copy_chunk(out, chunk, start, shape, device, axes)
        with lock:
            running.remove(device)
            ended.append(device)
        return result

    monkeypatch.setattr(loader, "_copy_chunk", failing_copy)
    with pytest.raises(CheckpointMismatchError) as raised:
        _load(checkpoint_dirs["gpt2_25_heads_ffn_100"], 2, "float32")
    assert str(raised.value) == message
    assert ended and not running


def test_host_memory_holds_two_chunks_per_block(tmp_path, monkeypatch):
    """tracemalloc sees numpy's host arrays, not the (simulated) devices'
    buffers: the chunks of rows gathered from a tensor's columns (each
    row-parallel kernel at tp=4: 4 MiB per block) live at most two at a time
    per block."""
    spec = ("LlamaConfig", "LlamaForCausalLM",
            dict(vocab_size=128, hidden_size=1024, intermediate_size=4096, num_hidden_layers=1,
                 num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
                 max_position_embeddings=64), ())
    ckpts.save(ckpts.build_model(spec), tmp_path)
    chunk, tp = 256 << 10, 4
    monkeypatch.setattr(loader, "_CHUNK_BYTES", chunk)
    _load(tmp_path, tp, "float32")  # compile first: tracing allocates too
    tracemalloc.start()
    try:
        _load(tmp_path, tp, "float32")
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # jax drops its reference to a copied chunk at its next call, not at
    # once: one more chunk per device; and building the model allocates
    # a little (0.4 MiB at tp=1, where no rows are gathered).
    bound = (2 + 1) * chunk * tp + (1 << 20)
    print(f"\npeak extra traced host memory at tp={tp}: {(peak - current) / 2**20:.2f} MiB (bound {bound / 2**20:.2f})")
    assert peak - current <= bound
