"""The `tp-zoo` command."""

import argparse
import os
import sys


def _simulate_cpu_devices(count=8):
    # Only affects the CPU platform: where JAX finds GPUs, they are the
    # devices (the demo runs on them). Must be set before jax starts its
    # backends.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def _demo(args):
    from tp_zoo import demo

    demo.run(tp=args.tp, steps=args.steps, prompt=args.prompt, out=args.out)


def _sampler(args):
    import keras_hub

    extra = {} if args.temperature is None else {"temperature": args.temperature}
    if args.top_k is not None:
        return keras_hub.samplers.TopKSampler(k=args.top_k, seed=args.seed, **extra)
    if args.top_p is not None:
        return keras_hub.samplers.TopPSampler(p=args.top_p, seed=args.seed, **extra)
    if args.temperature is not None or args.seed is not None:
        return keras_hub.samplers.RandomSampler(seed=args.seed, **extra)
    return keras_hub.samplers.GreedySampler()


def _generate(args):
    import time

    from rich.console import Console

    import tp_zoo

    console = Console()
    start = time.perf_counter()
    lm = tp_zoo.from_preset(args.preset, tp=args.tp, dtype=args.dtype, quantize=args.quantize)
    console.print(f"loaded in {time.perf_counter() - start:.1f} s on {args.tp} device(s)")
    lm.compile(sampler=_sampler(args))
    start = time.perf_counter()
    text = lm.generate(args.prompt, max_length=args.max_length, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    prompt_tokens = len(lm.tokenizer.encode(args.prompt))
    new_tokens = max(0, len(lm.tokenizer.encode(text)) - prompt_tokens)
    console.print(text)
    console.print(
        f"[dim]{new_tokens} new tokens in {seconds:.2f} s = {new_tokens / seconds:.1f} tokens/s "
        "(this first call includes compiling the decode loop)[/dim]"
    )


def _finetune(args):
    from rich.console import Console

    import tp_zoo
    from tp_zoo.finetune import check_data
    from tp_zoo.finetune import finetune

    console = Console()
    check_data(args.data)  # before the model loads, which can take minutes
    lm = tp_zoo.from_preset(args.preset, tp=args.tp, dp=args.dp, dtype=args.dtype, quantize=args.quantize)
    losses = finetune(lm, args.data, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      lr=args.lr, lora_rank=args.lora_rank, save_every=args.save_every, out=args.out,
                      stride=args.stride)
    if losses:
        console.print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    if args.out:
        console.print(f"checkpoints in {args.out}/checkpoints, model (Hugging Face layout) in {args.out}/model")


def _presets(args):
    from rich.console import Console
    from rich.table import Table

    from tp_zoo.checkpoint.source import presets

    table = Table(title="tp_zoo presets")
    table.add_column("name", no_wrap=True)
    table.add_column("Hugging Face repo", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("description")
    for name, entry in sorted(presets().items()):
        table.add_row(name, entry["hf"], entry["family"], entry["description"])
    Console().print(table)


def main(argv=None):
    _simulate_cpu_devices()
    # Only tp_zoo's output: XLA's C++ logging reads this when jax starts its
    # backends (TensorFlow's start-up lines are dropped in tp_zoo/__init__.py).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = argparse.ArgumentParser(prog="tp-zoo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="offline demo on a small sharded model, over the GPUs if any")
    demo.add_argument("--tp", type=int, default=None,
                      help="tensor-parallel degree (default: every GPU, up to 8; 2 simulated CPU devices without GPUs)")
    demo.add_argument("--steps", type=int, default=600, help="fine-tuning steps (about)")
    demo.add_argument("--prompt", default="Four score and seven years ago")
    demo.add_argument("--out", default=None, help="where to write the demo checkpoint (default: a temp dir)")
    demo.set_defaults(run=_demo)
    commands.add_parser("presets", help="list the checkpoints known by name").set_defaults(run=_presets)
    gen = commands.add_parser("generate", help="generate text from a preset or checkpoint directory")
    gen.add_argument("preset", metavar="PRESET_OR_DIR")
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-length", type=int, default=None, help="prompt + new tokens")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="new tokens (default 64)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default=None, help="e.g. float32, bfloat16 (default: the checkpoint's)")
    gen.add_argument("--quantize", choices=["int8"], default=None, help="weight-only int8, quantized while loading")
    gen.set_defaults(run=_generate)
    ft = commands.add_parser("finetune", help="fine-tune on a .txt or .jsonl file, sharded, resumable")
    ft.add_argument("preset", metavar="PRESET_OR_DIR")
    ft.add_argument("--tp", type=int, default=1)
    ft.add_argument("--dp", type=int, default=1)
    ft.add_argument("--data", required=True, help=".txt (one document) or .jsonl ({'text': ...} per line)")
    ft.add_argument("--lora-rank", type=int, default=None)
    ft.add_argument("--steps", type=int, default=100)
    ft.add_argument("--batch-size", type=int, default=8)
    ft.add_argument("--seq-len", type=int, default=128)
    ft.add_argument("--stride", type=int, default=None, help="window start every N tokens (default: seq-len)")
    ft.add_argument("--lr", type=float, default=1e-4)
    ft.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (needs --out)")
    ft.add_argument("--out", default=None, help="folder for checkpoints (resumed from) and the final model")
    ft.add_argument("--dtype", default=None)
    ft.add_argument("--quantize", choices=["int8"], default=None, help="int8 frozen base (train LoRA adapters)")
    ft.set_defaults(run=_finetune)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        print(f"tp-zoo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
