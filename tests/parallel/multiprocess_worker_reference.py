"""The multi-process worker's work, done in one process with tp=4."""

import keras
import numpy as np

import tp_zoo


def run(checkpoint):
    ids = np.random.RandomState(0).randint(0, 100, (4, 13)).astype("int32")
    lm = tp_zoo.from_preset(checkpoint, tp=4, dtype="float32", progress=False)
    out = {"logits": np.asarray(lm({"token_ids": ids[:, :10], "padding_mask": np.ones((4, 10), "int32")}))}
    lm.compile(sampler="greedy")
    prompt = {"token_ids": np.pad(ids[:, :5], ((0, 0), (0, 20))),
              "padding_mask": np.pad(np.ones((4, 5), "int32"), ((0, 0), (0, 20)))}
    out["greedy"] = np.asarray(lm.generate(prompt, stop_token_ids=None)["token_ids"]).tolist()
    # Bytes of the distinct blocks the devices at mesh positions {0,1} and {2,3} hold.
    devices = list(lm.distribution.device_mesh.devices.flatten())
    out["bytes_per_process"] = []
    for group in (devices[:2], devices[2:]):
        total = 0
        for v in lm.weights:
            blocks = {tuple((s.start, s.stop) for s in shard.index): shard.data.nbytes
                      for shard in v.value.addressable_shards if shard.device in group}
            total += sum(blocks.values())
        out["bytes_per_process"].append(total)
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3), weighted_metrics=[])
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((4, 12), "int32")}
    out["losses"] = [float(lm.train_on_batch(x, ids[:, 1:])) for _ in range(3)]
    return out
