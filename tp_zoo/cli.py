"""The `tp-zoo` command."""

import argparse
import os
import sys
from pathlib import Path

from tp_zoo.quiet_start import import_keras_hub_quietly


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
    """The sampler of --temperature, --top-k, --top-p and --seed (greedy
    without any), checked: generate()'s rules (a temperature of 0 is greedy)."""
    import keras_hub

    from tp_zoo.models.generation.sampling import check_sampler

    extra = {} if args.temperature is None else {"temperature": args.temperature}
    if args.top_p is not None:  # within the --top-k most likely tokens, if given
        sampler = keras_hub.samplers.TopPSampler(p=args.top_p, k=args.top_k, seed=args.seed, **extra)
    elif args.top_k is not None:
        sampler = keras_hub.samplers.TopKSampler(k=args.top_k, seed=args.seed, **extra)
    elif args.temperature is not None or args.seed is not None:
        sampler = keras_hub.samplers.RandomSampler(seed=args.seed, **extra)
    else:
        sampler = keras_hub.samplers.GreedySampler()
    check_sampler(sampler)
    return sampler


def _load_for_generation(args, console):
    import time

    import tp_zoo

    sampler = _sampler(args)  # refused before the model loads, which takes minutes
    start = time.perf_counter()
    # The loading bar only on a terminal: piped, stdout holds the generated text alone.
    lm = tp_zoo.from_preset(args.preset, tp=args.tp, dtype=args.dtype, quantize=args.quantize,
                            progress=sys.stdout.isatty())
    console.print(f"loaded in {time.perf_counter() - start:.1f} s on {args.tp} device(s)")
    lm.compile(sampler=sampler)
    return lm


def _status_console():
    """Rich output for status lines and errors: on stderr, as stdout holds the
    model's text alone, and unwrapped (off a terminal rich wraps at 80 columns)."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def _write(text):
    """Model text to stdout as it comes (not through rich, which would read
    brackets in it as markup)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _generate(args):
    import time

    console = _status_console()
    lm = _load_for_generation(args, console)
    start = time.perf_counter()
    pieces = lm.generate(args.prompt, max_length=args.max_length, max_new_tokens=args.max_new_tokens, stream=True)
    _write(lm.tokenizer.decode(lm.tokenizer.encode(args.prompt)))  # the text the streamed pieces continue
    for piece in pieces:
        _write(piece)
    _write("\n")
    seconds = time.perf_counter() - start
    new_tokens = len(pieces.new_ids)
    console.print(
        f"[dim]{new_tokens} new tokens in {seconds:.2f} s = {new_tokens / seconds:.1f} tokens/s "
        "(this first call includes compiling the decode loop)[/dim]"
    )


def _chat_template_file(path):
    """The text of --chat-template FILE (None without one)."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--chat-template {path}: cannot be read ({error}).") from None


def _chat(args):
    """Reads user lines from stdin and prints each reply as it streams; the
    conversation is kept until /reset, /exit or the end of the input, its
    oldest turns dropped once it outgrows the model's positions."""
    from tp_zoo.models.chat_template import ChatTemplate

    console = _status_console()
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1.")
    template = _chat_template_file(args.chat_template)
    lm = _load_for_generation(args, console)
    rendering = ChatTemplate(lm.tokenizer, template)  # a missing or broken template fails here, before any input
    positions = lm.backbone.max_sequence_length
    reply_tokens = _reply_tokens(args.max_new_tokens, positions)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages, told = list(start), False  # told: that the oldest turns are being dropped
    interactive = sys.stdin.isatty()
    if interactive:
        console.print("[dim]/reset clears the conversation, /exit (or Ctrl-D) ends it[/dim]")
    while True:
        if interactive:
            _write("> ")
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages, told = list(start), False
            console.print("[dim](conversation cleared)[/dim]")
            continue
        if not line.strip():
            continue
        try:
            asked = _within_positions(rendering, [*messages, {"role": "user", "content": line.rstrip("\n")}],
                                      len(start), reply_tokens, positions)
            if len(asked) <= len(messages) and not told:
                console.print(f"[dim](the conversation has outgrown the model's {positions} positions: its oldest "
                              "turns are dropped from now on; /reset starts afresh)[/dim]")
                told = True
            reply = ""
            for piece in lm.generate(asked, max_new_tokens=reply_tokens, chat_template=template, stream=True):
                _write(piece)
                reply += piece
        except ValueError as error:  # e.g. a message alone beyond the model's positions
            print(f"tp-zoo: error: {error}", file=sys.stderr)
            continue
        _write("\n")
        messages = [*asked, {"role": "assistant", "content": reply}]


def _reply_tokens(max_new_tokens, positions):
    """Tokens each reply may take (and the room kept for it): --max-new-tokens,
    by default generate()'s 512 for a conversation, at most half the model's
    positions so that turns remain to keep."""
    from tp_zoo.models.generation.inputs import DEFAULT_REPLY_TOKENS

    reply_tokens = max_new_tokens or min(DEFAULT_REPLY_TOKENS, positions // 2)
    if reply_tokens >= positions:
        raise ValueError(f"--max-new-tokens {reply_tokens} leaves no room for a message within the model's "
                         f"{positions} positions.")
    return reply_tokens


def _within_positions(rendering, messages, kept, reply_tokens, positions):
    """`messages` less its oldest turns (a user message and the replies that
    follow it; the first `kept`, the system message, stay) until it renders,
    with a reply of `reply_tokens`, within the model's `positions`; refused
    if the last user message alone does not fit."""
    while (length := len(rendering.encode(messages, add_generation_prompt=True))) + reply_tokens > positions:
        next_turn = next((i for i in range(kept + 1, len(messages)) if messages[i]["role"] == "user"), None)
        if next_turn is None:
            system = " with the system message" if kept else ""
            raise ValueError(f"The message is {length} tokens as the chat template renders it{system}: with a reply "
                             f"of {reply_tokens} tokens, beyond the model's {positions} positions; send a shorter one.")
        messages = messages[:kept] + messages[next_turn:]
    return messages


def _finetune(args):
    from rich.console import Console

    import tp_zoo
    from tp_zoo.checkpoint.from_preset import is_keras_hub_preset
    from tp_zoo.checkpoint.source import checkpoint_directory
    from tp_zoo.checkpoint.source import read_config
    from tp_zoo.finetune import check_finetune
    from tp_zoo.finetune import check_resumes_model
    from tp_zoo.finetune import finetune
    from tp_zoo.finetune import planned_memory

    console = Console()
    settings = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                    lora_rank=args.lora_rank, save_every=args.save_every, out=args.out, stride=args.stride)
    # Everything that can be checked before the model loads, which takes minutes.
    check_finetune(args.data, **settings, dp=args.dp, fsdp=args.fsdp)
    if not is_keras_hub_preset(args.preset):
        config = read_config(checkpoint_directory(args.preset))
        check_resumes_model(args.out, config)
        remat, plan = planned_memory(config, args.batch_size, args.seq_len, args.lora_rank, args.remat,
                                     tp=args.tp, dp=args.dp, fsdp=args.fsdp, dtype=args.dtype, quantize=args.quantize)
        print(f"finetune: before loading, remat={remat!r}: about {plan}.", file=sys.stderr)
    template = _chat_template_file(args.chat_template)
    lm = tp_zoo.from_preset(args.preset, tp=args.tp, dp=args.dp, fsdp=args.fsdp, dtype=args.dtype,
                            quantize=args.quantize)
    losses = finetune(lm, args.data, **settings, packing=args.packing, chat_template=template, remat=args.remat)
    if losses:
        console.print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    if args.out:
        adapter = f", LoRA adapter (PEFT) in {args.out}/adapter" if args.lora_rank else ""
        console.print(f"checkpoints in {args.out}/checkpoints, model (Hugging Face layout) in {args.out}/model"
                      f"{adapter}")


def _serve(args):
    import math

    from tp_zoo.serving.server import serve

    # Checked before the model loads, which takes minutes.
    for flag, value, least in (("--tp", args.tp, 1), ("--dp", args.dp, 1), ("--max-batch", args.max_batch, 1),
                               ("--prefill-chunk", args.prefill_chunk, 1), ("--max-waiting", args.max_waiting, 1)):
        if value < least:
            raise ValueError(f"{flag} {value}: must be at least {least}.")
    if args.kv_memory is not None and not (math.isfinite(args.kv_memory) and args.kv_memory > 0):
        raise ValueError(f"--kv-memory {args.kv_memory}: must be a positive number of GiB.")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in [0, 65535] (0: any free port).")
    if args.api_key == "":
        raise ValueError("--api-key is empty: give a key, or leave the option out to serve without one.")
    serve(args.preset, tp=args.tp, dp=args.dp, host=args.host, port=args.port, api_key=args.api_key,
          served_model_name=args.served_model_name, max_batch=args.max_batch,
          kv_memory=None if args.kv_memory is None else int(args.kv_memory * 2**30),
          prefill_chunk=args.prefill_chunk, max_waiting=args.max_waiting, dtype=args.dtype, quantize=args.quantize)


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


def _add_generation_arguments(parser):
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="e.g. float32, bfloat16 (default: the checkpoint's)")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="weight-only int8, quantized while loading")


def _add_finetune_command(commands):
    ft = commands.add_parser("finetune", help="fine-tune on a .txt or .jsonl file, sharded, resumable")
    ft.add_argument("preset", metavar="PRESET_OR_DIR")
    ft.add_argument("--tp", type=int, default=1)
    ft.add_argument("--dp", type=int, default=1, help="data-parallel devices, each with a whole tp share of the model")
    ft.add_argument("--fsdp", type=int, default=1,
                    help="fully sharded data-parallel devices (instead of --dp): they split the batch, and also "
                         "the weights, gradients and optimizer state")
    ft.add_argument("--data", required=True,
                    help=".txt (one document) or .jsonl, a line each: {'text': ...}, {'messages': [...]} (only the "
                         "assistant's replies trained) or {'prompt': ..., 'completion': ...} (only the completion)")
    ft.add_argument("--lora-rank", type=int, default=None)
    ft.add_argument("--steps", type=int, default=100)
    ft.add_argument("--batch-size", type=int, default=8)
    ft.add_argument("--seq-len", type=int, default=128)
    ft.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                    help="join examples into full rows, or pad one per row (default: pack plain text, pad the rest)")
    ft.add_argument("--stride", type=int, default=None,
                    help="packed rows start every N tokens (default: seq-len)")
    ft.add_argument("--chat-template", default=None, metavar="FILE",
                    help="a Jinja chat template for 'messages' data in place of the checkpoint's")
    ft.add_argument("--lr", type=float, default=1e-4)
    ft.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (needs --out)")
    ft.add_argument("--out", default=None, help="folder for checkpoints (resumed from) and the final model")
    ft.add_argument("--dtype", default=None)
    ft.add_argument("--remat", choices=["auto", "none", "products", "layers"], default="auto",
                    help="what each block keeps for the backward pass (auto: the least recompute that fits in memory)")
    ft.add_argument("--quantize", choices=["int8"], default=None, help="int8 frozen base (train LoRA adapters)")
    ft.set_defaults(run=_finetune)


def _add_serve_command(commands):
    server = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    server.add_argument("preset", metavar="PRESET_OR_DIR")
    server.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of each copy of the model")
    server.add_argument("--dp", type=int, default=1,
                        help="copies of the model, each on its own --tp devices with its own engine; a request goes "
                             "to the least busy one")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", default=os.environ.get("TP_ZOO_API_KEY"),
                        help="the key clients send as 'Authorization: Bearer KEY' (default: $TP_ZOO_API_KEY; "
                             "without either, none is needed)")
    server.add_argument("--served-model-name", default=None,
                        help="the model's name in the API (default: the preset's name or the directory's)")
    server.add_argument("--max-batch", type=int, default=64, help="requests each engine runs at once")
    server.add_argument("--kv-memory", type=float, default=None, metavar="GIB",
                        help="GiB per device for each engine's paged KV cache (default: most of what the weights "
                             "leave)")
    server.add_argument("--prefill-chunk", type=int, default=512,
                        help="prompt tokens prefilled per step (longer prompts in chunks of it)")
    server.add_argument("--max-waiting", type=int, default=1024,
                        help="requests each engine keeps waiting; beyond them, requests get 429 with Retry-After")
    server.add_argument("--dtype", default=None, help="e.g. float32, bfloat16 (default: the checkpoint's)")
    server.add_argument("--quantize", choices=["int8"], default=None, help="weight-only int8, quantized while loading")
    server.set_defaults(run=_serve)


def _parser():
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
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-length", type=int, default=None, help="prompt + new tokens")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="new tokens (default 64)")
    _add_generation_arguments(gen)
    gen.set_defaults(run=_generate)
    chat = commands.add_parser("chat", help="chat with an instruct checkpoint (user lines from stdin)")
    chat.add_argument("preset", metavar="PRESET_OR_DIR")
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    chat.add_argument("--max-new-tokens", type=int, default=None,
                      help="tokens per reply, and the room kept for one: the oldest turns are dropped to keep it "
                           "(default: 512, or half the model's positions if fewer)")
    chat.add_argument("--chat-template", default=None, metavar="FILE",
                      help="a Jinja chat template in place of the checkpoint's")
    _add_generation_arguments(chat)
    chat.set_defaults(run=_chat)
    _add_finetune_command(commands)
    _add_serve_command(commands)
    return parser


def main(argv=None):
    _simulate_cpu_devices()
    # Only tp_zoo's output: XLA's C++ logging reads this when jax starts its
    # backends, and TensorFlow's start-up lines are dropped as it is imported.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import_keras_hub_quietly()
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        print(f"tp-zoo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
