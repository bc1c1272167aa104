"""Which tp values each preset loads at, and what each pads.

    python conversion/padding_table.py

For every preset of tp_zoo/presets/presets.json and tp = 1..8, makes the preset's
attention and MLP layers (and OPT-350m's gathered projections) inside a tp
mesh, so the answer is the layers' own padding rule (nothing is built or
downloaded), and prints the query heads (/ kv heads) and MLP width each tp
pads to ("-" where nothing is padded, "refused" where a layer refuses).

The sizes are copied from each checkpoint's Hugging Face config.json (this
script runs offline); SIZES names exactly the presets (`check_sizes`, run
here and by tests/models/test_family_registry.py).
"""

import os
import warnings

# preset -> (hidden size, query heads, kv heads, MLP width, OPT's word_embed_proj_dim if it differs)
SIZES = {
    "opt_125m": (768, 12, 12, 3072, None),
    "opt_350m": (1024, 16, 16, 4096, 512),
    "opt_1.3b": (2048, 32, 32, 8192, None),
    "opt_2.7b": (2560, 32, 32, 10240, None),
    "opt_6.7b": (4096, 32, 32, 16384, None),
    "opt_13b": (5120, 40, 40, 20480, None),
    "gpt2": (768, 12, 12, 3072, None),
    "gpt2_medium": (1024, 16, 16, 4096, None),
    "gpt2_large": (1280, 20, 20, 5120, None),
    "gpt2_xl": (1600, 25, 25, 6400, None),
    "llama2_7b": (4096, 32, 32, 11008, None),
    "llama3_8b": (4096, 32, 8, 14336, None),
    "llama3.1_8b": (4096, 32, 8, 14336, None),
    "llama3.2_1b": (2048, 32, 8, 8192, None),
    "llama3.2_3b": (3072, 24, 8, 8192, None),
    "mistral_7b": (4096, 32, 8, 14336, None),
    "qwen2.5_0.5b": (896, 14, 2, 4864, None),
    "qwen2.5_7b": (3584, 28, 4, 18944, None),
    "tinyllama_1.1b": (2048, 32, 4, 5632, None),
    "smollm2_135m": (576, 9, 3, 1536, None),
    "smollm2_1.7b": (2048, 32, 32, 8192, None),
    "llama3.1_8b_instruct": (4096, 32, 8, 14336, None),
    "llama3.2_1b_instruct": (2048, 32, 8, 8192, None),
    "llama3.2_3b_instruct": (3072, 24, 8, 8192, None),
    "qwen2.5_0.5b_instruct": (896, 14, 2, 4864, None),
    "qwen2.5_1.5b_instruct": (1536, 12, 2, 8960, None),
    "qwen2.5_7b_instruct": (3584, 28, 4, 18944, None),
    "smollm2_135m_instruct": (576, 9, 3, 1536, None),
    "smollm2_360m_instruct": (960, 15, 5, 2560, None),
    "smollm2_1.7b_instruct": (2048, 32, 32, 8192, None),
    "mistral_7b_instruct_v0.3": (4096, 32, 8, 14336, None),
}


def padding_at(sizes, tp):
    """'-' (nothing padded), the padded sizes, or 'refused'."""
    import tp_zoo
    from tp_zoo import layers
    from tp_zoo.errors import ShardingError

    hidden, heads, kv_heads, ffn, embedding = sizes
    try:
        with tp_zoo.distribution(tp=tp).scope(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attention = layers.ParallelAttention(heads, hidden // heads, hidden, num_kv_heads=kv_heads)
            mlp = layers.ParallelMLP(hidden, ffn)
            if embedding is not None:
                layers.ColumnParallelDense(hidden, gather_output=True)
                layers.ColumnParallelDense(embedding, gather_output=True)
    except ShardingError:
        return "refused"
    padded = []
    if attention.padded_heads != heads:
        padded.append(f"{attention.padded_heads}/{attention.padded_kv_heads}")
    if mlp.padded_intermediate_dim != ffn:
        padded.append(f"ffn {mlp.padded_intermediate_dim}")
    return ", ".join(padded) or "-"


def check_sizes(presets):
    """Refuses SIZES that lack a preset of `presets` or name one it lacks."""
    missing, unknown = sorted(set(presets) - set(SIZES)), sorted(set(SIZES) - set(presets))
    if missing or unknown:
        raise ValueError(f"SIZES does not match the presets: none for {missing}, some for unknown presets {unknown}.")


def main():
    # Before tp_zoo (and so jax) is imported: 8 simulated CPU devices.
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    from tp_zoo.checkpoint.source import presets as read_presets

    presets = read_presets()
    check_sizes(presets)
    header = ["preset", "heads/kv", "ffn"] + [f"tp={t}" for t in range(1, 9)] + ["loads at"]
    rows = []
    for name in presets:
        sizes = SIZES[name]
        cells = [padding_at(sizes, tp) for tp in range(1, 9)]
        loads = [t for t, c in zip(range(1, 9), cells) if c != "refused"]
        rows.append([name, f"{sizes[1]}/{sizes[2]}", str(sizes[3])] + cells + [",".join(map(str, loads))])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
