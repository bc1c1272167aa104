"""Generation across context lengths and batch sizes: tp_zoo beside KerasHub's
own single-device Llama, each figure beside the memory-bandwidth floor.

    python scripts/bench_decode.py --shape llama3_8b --tp 1 [--only per-token|whole-call]
    python scripts/bench_decode.py --shape llama3_8b --tp 1 --quantize int8 --only per-token --rows 0 1
    python scripts/bench_decode.py --shape llama3_70b --tp 1 --quantize int8 --quantized-only --skip-keras-hub \
        --only per-token --rows 0
    python scripts/bench_decode.py --shape llama3_8b --tp 1 --skip-keras-hub --only per-token --rows 0 1 --stream

Both models get the same shapes and random weights and the greedy sampler.

- per-token rows: ms per new token = (t(prompt + N new) - t(prompt + 1 new))
  / (N - 1), each t the best of --repeats calls after a warm-up, so prefill
  and compilation cancel out. Floor = (weight bytes + batch x (prompt + N) x
  KV bytes per token) / --bandwidth, per device.
- whole-call rows: seconds of one generate() call (best of --repeats), for
  long prompts, a ragged batch and the prefill rate.
- --stream: each per-token row of tp_zoo's also streamed (`stream_ids`, 16
  decode steps per compiled call, the host reading each call's tokens), in
  ms per token the same way, beside the one-program figure.

The table comes last.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import HBM_BANDWIDTH  # noqa: E402
from bench_common import LlamaCausalLM  # noqa: E402
from bench_common import add_model_arguments  # noqa: E402
from bench_common import best_time  # noqa: E402
from bench_common import copy_bandwidth  # noqa: E402
from bench_common import decode_bytes_per_device  # noqa: E402
from bench_common import decode_floor_ms  # noqa: E402
from bench_common import each_model  # noqa: E402
from bench_common import generate_call  # noqa: E402
from bench_common import header  # noqa: E402
from bench_common import hf_config  # noqa: E402
from bench_common import per_token_ms  # noqa: E402
from bench_common import stream_call  # noqa: E402

import numpy as np  # noqa: E402

from tp_zoo import kernels  # noqa: E402
from tp_zoo.layers import attention_ops  # noqa: E402

# (batch, prompt, new tokens, also run KerasHub)
PER_TOKEN = [
    (1, 128, 128, True), (16, 128, 128, True), (16, 1024, 64, True), (16, 2048, 128, True),
    (16, 4096, 64, False), (1, 4096, 64, False),
]
# (name, prompt lengths, new tokens per row)
WHOLE_CALL = [
    ("prefill 1 x 32768 (+1)", [32768], 1),
    ("1 x 32768 +32", [32768], 32),
    ("1 x 16384 +32", [16384], 32),
    ("8 x 8192 +32", [8192] * 8, 32),
    ("4000 alone +64", [4000], 64),
    ("16 and 4000 +64", [16, 4000], 64),
]
TINY_SCALE = 16  # --shape tiny: contexts / 16, so a CPU smoke run is quick


def kernel_configs(args):
    """The kernels' configurations the options ask for; the int8 kernel's
    settings are `Int8MatmulConfig` fields (as bench_int8_matmul.py
    --best-out writes them)."""
    default = kernels.Int8MatmulConfig()
    settings = dict(setting.split("=") for setting in args.int8_kernel_settings)
    settings = {key: type(getattr(default, key))(value) for key, value in settings.items()}
    return kernels.KernelConfigs(
        decode_attention=kernels.DecodeAttentionConfig(enabled=not args.no_decode_kernel),
        int8_matmul=kernels.Int8MatmulConfig(**{**settings, "enabled": not args.no_int8_kernel}),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bandwidth", type=float, default=HBM_BANDWIDTH, help="bytes/s for the floor")
    parser.add_argument("--only", choices=["per-token", "whole-call"])
    parser.add_argument("--rows", type=int, nargs="+", help="run only these per-token rows (0-based)")
    parser.add_argument("--quantize", choices=["int8"], help="also each model's int8 form (weight-only for tp_zoo)")
    parser.add_argument("--quantized-only", action="store_true", help="only the int8 forms (a 70B shape on one GPU)")
    parser.add_argument("--no-decode-kernel", action="store_true", help="XLA decode attention on GPUs too")
    parser.add_argument("--no-int8-kernel", action="store_true", help="XLA's int8 products on GPUs too")
    parser.add_argument("--int8-kernel-settings", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Int8MatmulConfig fields, such as block_n=128 (as bench_int8_matmul.py --best-out "
                             "writes them)")
    parser.add_argument("--stream", action="store_true", help="also tp_zoo's streamed generation, per-token rows")
    args = parser.parse_args()
    configs = kernel_configs(args)
    with kernels.configured(configs):
        per_token, whole, measured_bw = measure(args)
    on = lambda flag: "on" if flag else "off"
    where = (f"shape {args.shape}, {args.dtype}, greedy, decode kernel {on(configs.decode_attention.enabled)}"
             + (f", int8 kernel {on(configs.int8_matmul.enabled)} {' '.join(args.int8_kernel_settings)}"
                if args.quantize else ""))
    print()
    print(header(f"generation, {where}; copy bandwidth {measured_bw / 1e12:.2f} TB/s, "
                 f"floor at {args.bandwidth / 1e12:.2f} TB/s; cuDNN prefill {attention_ops.FUSED_ATTENTION}"))
    if per_token:
        print(f"{'model':<28}{'tp':>4}{'batch':>7}{'prompt':>8}{'new':>6}{'ms/token':>11}{'floor':>9}{'ratio':>8}")
        for name, tp, batch, prompt, new, ms, floor in per_token:
            print(f"{name:<28}{tp:>4}{batch:>7}{prompt:>8}{new:>6}{ms:>11.3f}{floor:>9.3f}{ms / floor:>8.2f}")
    if whole:
        print(f"{'model':<24}{'tp':>4}  {'case':<26}{'seconds':>10}{'prompt tokens/s':>17}")
        for name, tp, case, seconds, rate in whole:
            print(f"{name:<24}{tp:>4}  {case:<26}{seconds:>10.3f}{rate:>17,.0f}")


def measure(args):
    """(per-token rows, whole-call rows, measured copy bandwidth), each row
    printed as it is measured."""
    config = hf_config(args.shape)
    config["max_position_embeddings"] = 40960
    scale = TINY_SCALE if args.shape == "tiny" else 1
    itemsize = np.dtype(args.dtype).itemsize
    measured_bw = copy_bandwidth()
    print(f"copy bandwidth: {measured_bw / 1e12:.2f} TB/s", flush=True)
    per_token, whole = [], []
    for name, tp, lm in each_model(config, args.tp, args.dtype, args.skip_keras_hub, args.quantize,
                                      args.quantized_only):
        lm.compile(sampler="greedy")
        ours = isinstance(lm, LlamaCausalLM)
        weights, kv = decode_bytes_per_device(lm, config, tp, itemsize)
        print(f"{name} tp={tp}: {weights / 2**30:.3f} GiB of weights per device", flush=True)
        if args.only != "whole-call":
            for row, (batch, prompt, new, keras_hub_too) in enumerate(PER_TOKEN):
                if not (ours or keras_hub_too) or (args.rows and row not in args.rows):
                    continue
                prompt //= scale
                ms = per_token_ms(lm, batch, prompt, new, args.repeats)
                floor = decode_floor_ms(weights, kv, batch, prompt + new, args.bandwidth)
                per_token.append((name, tp, batch, prompt, new, ms, floor))
                print(f"{name} tp={tp} batch {batch} prompt {prompt} +{new}: {ms:.3f} ms/token "
                      f"(floor {floor:.3f}, {ms / floor:.2f}x)", flush=True)
                if args.stream and ours:
                    streamed = per_token_ms(lm, batch, prompt, new, args.repeats, call=stream_call)
                    per_token.append((f"{name} streamed", tp, batch, prompt, new, streamed, floor))
                    print(f"{name} streamed tp={tp} batch {batch} prompt {prompt} +{new}: {streamed:.3f} ms/token "
                          f"({streamed / ms:.3f}x the one-program figure)", flush=True)
        if args.only != "per-token" and ours:
            for case, lengths, new in WHOLE_CALL:
                lengths = [max(1, n // scale) for n in lengths]
                seconds = best_time(generate_call(lm, lengths, new), args.repeats)
                whole.append((name, tp, case, seconds, sum(lengths) / seconds))
                print(f"{name} tp={tp} {case}: {seconds:.3f} s", flush=True)
    return per_token, whole, measured_bw


if __name__ == "__main__":
    main()
