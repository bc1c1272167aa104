"""Per-device training memory of the 8B and 70B shapes on several meshes,
computed from their configs alone (`tp_zoo.models.memory.
planned_training_memory`, what `tp-zoo finetune` prints before loading);
no device is used.

    python scripts/training_memory.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import hf_config  # noqa: E402

from tp_zoo.models.llama import LlamaBackbone  # noqa: E402
from tp_zoo.models.memory import planned_training_memory  # noqa: E402

# (title, shape, rows x tokens, dtype, quantize, LoRA rank, remat)
CASES = [
    ("8B full fine-tune, bf16", "llama3_8b", (4, 1024), "bfloat16", None, None, "none"),
    ("70B LoRA r16 (q, v) on an int8 base", "llama3_70b", (1, 4096), "bfloat16", "int8", 16, "layers"),
]
# (tp, data devices, fully sharded)
MESHES = [(1, 1, False), (8, 1, False), (1, 8, False), (1, 8, True), (2, 4, True), (4, 2, True)]


def main():
    gib = lambda n: f"{n / 2**30:.1f}"
    print("| case | mesh | rows x tokens / device | weights | gradients | optimizer | activations | total (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for title, shape, (rows, tokens), dtype, quantize, rank, remat in CASES:
        config = LlamaBackbone.decoder_config(hf_config(shape))
        for tp, data, sharded in MESHES:
            m = planned_training_memory(config, rows * data, tokens, remat, tp=tp, data=data, fully_sharded=sharded,
                                        dtype=dtype, quantize=quantize, lora_rank=rank)
            mesh = f"tp={tp}" + (f" {'fsdp' if sharded else 'dp'}={data}" if data > 1 else "")
            print(f"| {title} | {mesh} | {rows} x {tokens} | {gib(m.weights)} | {gib(m.gradients)} | "
                  f"{gib(m.optimizer)} | {gib(m.activations)} | {gib(m.total)} |")


if __name__ == "__main__":
    main()
