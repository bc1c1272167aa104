"""Loading benchmark: throughput, host memory and bytes per device while streaming a checkpoint.

    python scripts/bench_load.py [--tp 1 2 4] [--shape llama3_1b] [--layers 9] [--dir DIR]

Writes a Llama-shaped bf16 safetensors checkpoint (by default the 1B shape
cut to 9 layers, about 2 GB; random weights; kept in DIR if given), then
loads it with tp_zoo.from_preset once per tp, each in a fresh process, on
simulated CPU devices (or the real accelerators) while a thread samples the
process's anonymous resident memory every millisecond. Reports, one table
row per tp, last:
  - load throughput in GB/s (checkpoint bytes / wall time, files in page cache);
  - peak extra host memory: the peak during loading minus what is in use
    once loading is done (the loaded model included), against the loader's
    bound (two 32 MiB chunks of rows per device, tp_zoo/checkpoint/loader.py).
    On simulated CPU devices the devices' memory is host memory too, so there
    it also counts their buffers (a chunk's copy, a transpose): only on
    accelerators is it the loader's host memory alone;
  - the most bytes any device holds, against the model's bytes / tp.
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
        "platform": jax.devices()[0].platform,
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[4], help="tp values, one load (process) each")
    parser.add_argument("--shape", default="llama3_1b")
    parser.add_argument("--layers", type=int, default=9, help="layers to keep (0: all of the shape's)")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.tp[0])
        return
    directory = Path(args.dir or tempfile.mkdtemp(prefix="tp_zoo_bench_"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tp_zoo.checkpoint.loader import _CHUNK_BYTES

    sizes = write_checkpoint(directory, args.shape, args.layers)
    total = sum(sizes.values())
    largest = max(sizes, key=sizes.get)
    with open(directory / "model.safetensors", "rb") as f:  # into page cache
        while f.read(64 << 20):
            pass
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    mb = 1 / 2**20
    print(f"checkpoint: {total / 1e9:.2f} GB bf16 in {directory}; largest tensor {largest} = {sizes[largest] * mb:.1f} MiB")
    rows = []
    for tp in args.tp:
        out = subprocess.run([sys.executable, __file__, "--tp", str(tp), "--child", str(directory)],
                             env=env, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"tp={tp}: devices {r['devices']}; bytes per device (MiB): "
              + ", ".join(f"{d} {n * mb:.1f}" for d, n in sorted(r["per_device"].items())))
        extra = max(r["peak"], r["after"]) - r["after"]
        rows.append((tp, total / r["seconds"] / 1e9, r["seconds"], extra * mb, 2 * _CHUNK_BYTES * tp * mb,
                     max(r["per_device"].values()) * mb, r["model_bytes"] / tp * mb))
    print()
    print(f"{'tp':>3}{'GB/s':>8}{'seconds':>9}{'peak extra host MiB':>21}{'bound MiB':>11}"
          f"{'most MiB on a device':>22}{'model / tp MiB':>16}")
    for tp, speed, seconds, extra, bound, most, share in rows:
        print(f"{tp:>3}{speed:>8.2f}{seconds:>9.2f}{extra:>21.1f}{bound:>11.1f}{most:>22.1f}{share:>16.1f}")
    if r["platform"] == "cpu":
        print("(simulated CPU devices: their buffers are host memory too, so the peak is not the loader's alone)")


if __name__ == "__main__":
    main()
