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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import jax  # noqa: E402
from bench_common import read_into_page_cache  # noqa: E402
from bench_common import timed_load  # noqa: E402
from bench_common import write_llama_checkpoint  # noqa: E402


def _anon_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(directory, tp):
    """Runs in the child process: load and report as JSON."""
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_rss())
            time.sleep(0.001)

    jax.devices()  # start the backend before the clock
    before = _anon_rss()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lm, seconds = timed_load(directory, tp)
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
    from tp_zoo.checkpoint.loader import _CHUNK_BYTES

    sizes = write_llama_checkpoint(directory, args.shape, args.layers)
    total = sum(sizes.values())
    largest = max(sizes, key=sizes.get)
    read_into_page_cache(directory / "model.safetensors")
    # bench_common has set XLA_FLAGS (8 simulated devices on a CPU) in os.environ.
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
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
