"""One process of a 2-process run (started by test_multiprocess.py).

    python multiprocess_worker.py PROCESS_ID PORT CHECKPOINT OUT MODE

Each process simulates 2 CPU devices; the two talk through gloo on
localhost. Writes OUT/result-PROCESS_ID.json.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["KERAS_BACKEND"] = "jax"

process_id, port, checkpoint, out, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]

from tp_zoo.parallel.processes import initialize  # noqa: E402

initialize(f"localhost:{port}", num_processes=2, process_id=process_id, heartbeat_timeout_seconds=10)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import tp_zoo  # noqa: E402
from tp_zoo.checkpoint.training_state import restore_training_state  # noqa: E402
from tp_zoo.checkpoint.training_state import save_training_state  # noqa: E402
from tp_zoo.parallel.processes import global_replicated  # noqa: E402

rs = np.random.RandomState(0)
IDS = rs.randint(0, 100, (4, 13)).astype("int32")
result = {}


def train(lm, dp):
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3), weighted_metrics=[])
    x = {"token_ids": IDS[:, :-1], "padding_mask": np.ones((4, 12), "int32")}
    y = IDS[:, 1:]
    if dp > 1:  # each process passes its own half of the global batch
        rows = slice(2 * process_id, 2 * process_id + 2)
        x, y = {k: v[rows] for k, v in x.items()}, y[rows]
    return [float(lm.train_on_batch(x, y)) for _ in range(3)]


if mode == "tp4":
    lm = tp_zoo.from_preset(checkpoint, tp=4, dtype="float32", progress=False)
    result["load_stats"] = lm.load_stats
    mesh_info = lm.backbone.token_embedding.mesh_info
    x = {"token_ids": IDS[:, :10], "padding_mask": np.ones((4, 10), "int32")}
    logits = lm({k: global_replicated(mesh_info, v) for k, v in x.items()})
    result["logits"] = np.asarray(multihost_utils.process_allgather(logits, tiled=True)).tolist()
    lm.compile(sampler="greedy")
    prompt = {"token_ids": np.pad(IDS[:, :5], ((0, 0), (0, 20))), "padding_mask": np.pad(np.ones((4, 5), "int32"), ((0, 0), (0, 20)))}
    result["greedy"] = np.asarray(lm.generate(prompt, stop_token_ids=None)["token_ids"]).tolist()
    result["losses"] = train(lm, dp=1)
    saved = save_training_state(lm, os.path.join(out, "checkpoints"), 3)
    again = tp_zoo.from_preset(checkpoint, tp=4, dtype="float32", progress=False)
    again.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3), weighted_metrics=[])
    result["restored_step"] = restore_training_state(again, saved)
    same = [bool(np.array_equal(np.asarray(multihost_utils.process_allgather(a.value, tiled=True)),
                                np.asarray(multihost_utils.process_allgather(b.value, tiled=True))))
            for a, b in zip(lm.weights, again.weights)]
    result["restored_equal"] = all(same)
elif mode in ("dp2_tp2", "fsdp2_tp2"):  # fsdp: the variables split over the two processes' devices too
    data = {"dp": 2} if mode == "dp2_tp2" else {"fsdp": 2}
    lm = tp_zoo.from_preset(checkpoint, tp=2, **data, dtype="float32", progress=False)
    result["losses"] = train(lm, dp=2)
elif mode == "die":
    lm = tp_zoo.from_preset(checkpoint, tp=4, dtype="float32", progress=False)
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3), weighted_metrics=[])
    x = {"token_ids": IDS[:, :-1], "padding_mask": np.ones((4, 12), "int32")}
    lm.train_on_batch(x, IDS[:, 1:])
    print("ready", flush=True)
    if process_id == 1:
        os._exit(3)  # dies without a word to the other process
    for _ in range(10_000):
        lm.train_on_batch(x, IDS[:, 1:])

with open(os.path.join(out, f"result-{process_id}.json"), "w") as f:
    json.dump(result, f)
