"""Loads a checkpoint sharded and saves it back in the Hugging Face layout.

    python conversion/export_checkpoint.py PRESET_OR_DIR OUT_DIR [--tp 2] [--check]

With --check, OUT_DIR is loaded again and every weight compared with the
first load (a round trip must give identical weights).
"""

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)

    import numpy as np

    import tp_zoo
    from tp_zoo.checkpoint.export import export_to_hf

    lm = tp_zoo.from_preset(args.preset, tp=args.tp, dtype=args.dtype)
    export_to_hf(lm, args.out)
    print(f"wrote {args.out}")
    if args.check:
        again = tp_zoo.from_preset(args.out, tp=args.tp, dtype=args.dtype, progress=False)
        for a, b in zip(lm.weights, again.weights):
            if not np.array_equal(np.asarray(a.numpy()), np.asarray(b.numpy())):
                print(f"round trip differs at {a.path}")
                return 1
        print(f"round trip: all {len(lm.weights)} variables identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
