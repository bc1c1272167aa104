"""Peak logits memory per device in training: vocab-parallel loss vs gathered logits.

    python scripts/logits_memory.py [--tp 2 --vocab 128256 --batch 8 --seq 1024 --hidden 4096]

Compiles (does not run) the LM head + loss + gradients on a tp mesh in
bf16, once with tp_zoo's VocabParallelCrossEntropy on vocab-split logits and
once with the logits gathered to every device and Keras' own sparse
cross-entropy, and prints XLA's own account of each device's temporary
memory (buffers live during the step, the logits and their gradient
dominating). Works on simulated CPU devices: nothing is allocated.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402

import tp_zoo  # noqa: E402
from tp_zoo import parallel  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args()
    with tp_zoo.distribution(tp=args.tp).scope():
        mesh = parallel.active_mesh()
        head = tp_zoo.layers.VocabParallelLMHead(args.vocab, dtype="bfloat16")
        head.build((None, None, args.hidden))
        hidden = jax.ShapeDtypeStruct((args.batch, args.seq, args.hidden), jnp.bfloat16,
                                      sharding=parallel.sharding(mesh, (None, None, None)))
        labels = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32,
                                      sharding=parallel.sharding(mesh, (None, None)))
        kernel = head.kernel.value
        replicated = parallel.sharding(mesh, (None, None, None))
        vocab_parallel = tp_zoo.losses.VocabParallelCrossEntropy()
        keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        def step(loss_of_logits):
            def loss(kernel, h, y):
                logits, _ = head.stateless_call([kernel], [], h)
                return loss_of_logits(y, logits)

            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

        def gathered(y, logits):
            return keras_loss(y, jax.lax.with_sharding_constraint(logits, replicated).astype("float32"))

        rows = []
        for name, fn in (("vocab-parallel (tp_zoo)", vocab_parallel), ("gathered logits", gathered)):
            compiled = step(fn).lower(kernel, hidden, labels).compile()
            rows.append((name, compiled.memory_analysis().temp_size_in_bytes))
    logits_bytes = args.batch * args.seq * args.vocab * 2
    print(f"logits {args.batch} x {args.seq} x {args.vocab} bf16 = {logits_bytes / 2**30:.2f} GiB whole; "
          f"tp={args.tp}, hidden {args.hidden}; {jax.devices()[0].platform}, jax {jax.__version__}")
    print(f"{'loss':<28}{'temporary memory per device':>30}")
    for name, temp in rows:
        print(f"{name:<28}{temp / 2**30:>26.2f} GiB")


if __name__ == "__main__":
    main()
