"""Loading benchmark: host memory and bytes per device while streaming a checkpoint.

    python scripts/bench_load.py [--tp 4] [--shape llama3_1b] [--layers 9] [--dir DIR]

Writes a Llama-shaped bf16 safetensors checkpoint (by default the 1B shape
cut to 9 layers, about 1 GB; random weights; kept in DIR if given), then
loads it with tp_zoo.from_preset in a
fresh process on simulated CPU devices (or the real accelerators) while a
thread samples the process's anonymous resident memory every millisecond.
Reports, table last:
  - peak extra host memory: the peak during loading minus what is in use
    once loading is done (the loaded model included), against the largest
    tensor of the checkpoint;
  - bytes each device holds, against the model's bytes / tp;
  - load throughput in GB/s (checkpoint bytes / wall time, files in page cache).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def write_checkpoint(directory, shape, layers):
    import ml_dtypes

    from bench_common import hf_config
    from tp_zoo.checkpoint.export import _write_safetensors

    c = {**hf_config(shape), "tie_word_embeddings": False, "dtype": "bfloat16"}
    if layers:
        c["num_hidden_layers"] = layers
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
    _write_safetensors(directory / "model.safetensors", tensors)
    (directory / "config.json").write_text(json.dumps(c))
    return {n: int(np.prod(s)) * 2 for n, s in shapes.items()}


def _anon_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(directory, tp):
    """Runs in the child process: load and report as JSON."""
    import tp_zoo

    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_rss())
            time.sleep(0.001)

    import jax

    jax.devices()  # start the backend before the clock
    before = _anon_rss()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    lm = tp_zoo.from_preset(directory, tp=tp, progress=False)
    for v in lm.weights:
        v.value.block_until_ready()
    seconds = time.perf_counter() - start
    after = _anon_rss()
    done.set()
    sampler.join()
    per_device = {}
    model_bytes = 0
    for v in lm.weights:
        model_bytes += v.value.nbytes
        for shard in v.value.addressable_shards:
            per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
    print(json.dumps({
        "before": before, "peak": peak[0], "after": after, "seconds": seconds,
        "per_device": per_device, "model_bytes": model_bytes,
        "devices": str(sorted(str(d) for d in lm.weights[0].value.sharding.device_set)),
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--shape", default="llama3_1b")
    parser.add_argument("--layers", type=int, default=9, help="layers to keep (0: all of the shape's)")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.tp)
        return
    directory = Path(args.dir or tempfile.mkdtemp(prefix="tp_zoo_bench_"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sizes = write_checkpoint(directory, args.shape, args.layers)
    total = sum(sizes.values())
    largest = max(sizes, key=sizes.get)
    with open(directory / "model.safetensors", "rb") as f:  # into page cache
        while f.read(64 << 20):
            pass
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    out = subprocess.run([sys.executable, __file__, "--tp", str(args.tp), "--child", str(directory)],
                         env=env, capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    extra = max(r["peak"], r["after"]) - r["after"]
    mb = 1 / 2**20
    print(f"checkpoint: {total / 1e9:.2f} GB bf16 in {directory}; largest tensor {largest} = {sizes[largest] * mb:.1f} MiB")
    print(f"devices: {r['devices']}")
    print()
    print(f"{'what':<44}{'value':>14}{'bound':>16}")
    print(f"{'peak extra host memory while loading':<44}{extra * mb:>11.1f} MiB{sizes[largest] / 2 * mb:>12.1f} MiB  (half the largest tensor)")
    for device, nbytes in sorted(r["per_device"].items()):
        print(f"{'bytes on ' + device:<44}{nbytes * mb:>11.1f} MiB{r['model_bytes'] / args.tp * mb:>12.1f} MiB  (model / tp)")
    print(f"{'load throughput':<44}{total / r['seconds'] / 1e9:>10.2f} GB/s{'':>16}  ({r['seconds']:.2f} s)")


if __name__ == "__main__":
    main()
