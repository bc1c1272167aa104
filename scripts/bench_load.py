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
    sizes = write_llama_checkpoint(directory, args.shape, args.layers)
    total = sum(sizes.values())
    largest = max(sizes, key=sizes.get)
    read_into_page_cache(directory / "model.safetensors")
    # bench_common has set XLA_FLAGS (8 simulated devices on a CPU) in os.environ.
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
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
