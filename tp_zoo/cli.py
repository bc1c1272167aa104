"""The `tp-zoo` command."""

import argparse
import os
import sys


def _simulate_cpu_devices(count=8):
    # Only affects the CPU platform (GPUs are used as they are); must be set
    # before jax starts its backends.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _demo(args):
    from tp_zoo import demo

    demo.run(tp=args.tp, steps=args.steps, prompt=args.prompt, out=args.out)


def _presets(args):
    from rich.console import Console
    from rich.table import Table

    from tp_zoo.checkpoint.source import presets

    table = Table(title="tp_zoo presets")
    for column in ("name", "Hugging Face repo", "family", "description"):
        table.add_column(column)
    for name, entry in sorted(presets().items()):
        table.add_row(name, entry["hf"], entry["family"], entry["description"])
    Console().print(table)


def main(argv=None):
    _simulate_cpu_devices()
    parser = argparse.ArgumentParser(prog="tp-zoo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="offline demo on a small sharded model")
    demo.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (default 2)")
    demo.add_argument("--steps", type=int, default=600, help="fine-tuning steps (about)")
    demo.add_argument("--prompt", default="Four score and seven years ago")
    demo.add_argument("--out", default=None, help="where to write the demo checkpoint (default: a temp dir)")
    demo.set_defaults(run=_demo)
    commands.add_parser("presets", help="list the checkpoints known by name").set_defaults(run=_presets)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        print(f"tp-zoo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
