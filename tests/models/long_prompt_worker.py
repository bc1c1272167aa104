"""Run by test_generate in a fresh process: load CHECKPOINT at tp=2, generate
from 2 rows of PROMPT tokens, print the ids and the process's peak resident
memory in bytes (VmHWM, imports included; not ru_maxrss, which after exec
still holds the forking parent's size).

    python long_prompt_worker.py CHECKPOINT PROMPT NEW
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import tp_zoo  # noqa: E402


def main(checkpoint, prompt, new):
    lm = tp_zoo.from_preset(checkpoint, tp=2, dtype="float32", progress=False)
    lm.compile(sampler="greedy")
    rs = np.random.RandomState(0)
    ids = rs.randint(1, lm.backbone.vocab_size, (2, prompt)).astype("int32")
    out = lm.generate({"token_ids": ids, "padding_mask": np.ones_like(ids)}, max_new_tokens=new,
                      stop_token_ids=None, strip_prompt=True)
    print("ids", " ".join(map(str, out["token_ids"][:, :new].ravel())))
    with open("/proc/self/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print("peak_bytes", peak_kib * 1024)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
