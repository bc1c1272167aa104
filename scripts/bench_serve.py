"""Serving: the continuous-batching engine (in process) driven by concurrent
clients, beside static batches of `generate` in the same run.

    python scripts/bench_serve.py --shape llama3_8b [--rows fixed64 fixed256 one mixed] [--minutes 8]

Random weights, bf16, greedy, no stop tokens (every request makes its
max_tokens). Each client sends a request, waits for its last token, and
sends the next (a closed loop): `--requests` per client. The fixed rows of
many clients run twice on one engine: first every client at once (a burst:
the first prompts all wait together), then "staggered", client i's first
request sent i / clients of a request's time (the burst's mean) after the
first, as clients that come and go at a steady rate arrive. Figures:
- output tokens/s: every request's new tokens over the time from the first
  submission to the last token;
- time to first token (TTFT): submission to the first token, p50 / p99;
- inter-token latency (ITL): the gaps between a request's tokens, p50 / p99.
Static rows: one `generate` call of the whole batch (prompts, then every
row's new tokens), best of 2 after a warm-up; its tokens/s counts the
prefill, as the engine's does. The step time is generate's per token
((t(prompt + N) - t(prompt + 1)) / (N - 1)), the floor: weights + the batch's
KV cache read once per step at HBM_BANDWIDTH. Compute floors (at
BF16_PEAK_FLOPS, products only, attention left out): "ceiling" tokens/s, the
requests' new tokens over the FLOPs of all their prompt and new tokens; the
burst's TTFT floor, every client's prompt prefilled.

The mixed row: 128 requests of prompts 32-4096 and outputs 16-1024 tokens
(seeded uniform draws) all sent at once, against static batches of 16 of
them in arrival order (each generate call as long as its longest prompt
and output, which the shorter rows wait for).

Each row warms the engine up first (one request per client, 8 tokens) so
that its programs are compiled before the clock starts. Every run's prompts
are drawn anew (seeded), so none begins like an earlier one: no prefix
cache hits. The table comes
last.
"""

import argparse
import gc
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import BF16_PEAK_FLOPS  # noqa: E402
from bench_common import HBM_BANDWIDTH  # noqa: E402
from bench_common import add_model_arguments  # noqa: E402
from bench_common import best_time  # noqa: E402
from bench_common import decode_bytes_per_device  # noqa: E402
from bench_common import decode_floor_ms  # noqa: E402
from bench_common import generate_call  # noqa: E402
from bench_common import header  # noqa: E402
from bench_common import hf_config  # noqa: E402
from bench_common import per_token_ms  # noqa: E402
from bench_common import tp_zoo_model  # noqa: E402
from bench_common import trainable_parameters  # noqa: E402

import numpy as np  # noqa: E402

from tp_zoo.serving.engine import Engine  # noqa: E402
from tp_zoo.serving.requests import SamplingParams  # noqa: E402

# name -> (clients, prompt tokens, new tokens): the targets.
FIXED = {"fixed64": (64, 512, 256), "fixed256": (256, 512, 256), "one": (1, 512, 256)}
# The rows that also time generate's step (two more compiles and calls):
# those whose inter-token latency has a target against it.
STEP_ROWS = ("fixed64", "one")
MIXED_REQUESTS, MIXED_STATIC_BATCH = 128, 16
TINY_SCALE = 16  # --shape tiny: lengths / 16, for a CPU smoke run


def drive(engine, requests, clients, deadline, stagger=0.0):
    """Sends `requests` ((prompt ids, new tokens) pairs) over `clients`
    closed-loop clients, client i's first request `stagger` x i / clients
    seconds after the first's; returns each finished request's (submit
    time, token times) and the wall time, stopping at `deadline` (a
    time.perf_counter())."""
    queue = list(reversed(requests))
    records, lock, done = [], threading.Lock(), threading.Event()
    in_flight = [0]

    def send():
        with lock:
            if not queue:
                if in_flight[0] == 0:
                    done.set()
                return
            prompt, new = queue.pop()
            in_flight[0] += 1
        times = []
        submitted = time.perf_counter()

        def on_output(output):
            times.extend([time.perf_counter()] * len(output.new_ids))
            if output.finish_reason:
                with lock:
                    records.append((submitted, times))
                    in_flight[0] -= 1
                send()

        engine.submit(prompt, SamplingParams(temperature=0, max_tokens=new), on_output)

    def start_clients():
        for client in range(clients):
            time.sleep(max(0.0, start + stagger * client / clients - time.perf_counter()))
            send()

    start = time.perf_counter()
    threading.Thread(target=start_clients, daemon=True).start()
    done.wait(timeout=max(0.0, deadline - time.perf_counter()))
    if not done.is_set():
        raise TimeoutError(f"{len(records)} of {len(requests)} requests done by the deadline")
    return records, time.perf_counter() - start


def prompts(lengths, vocab, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, vocab - 1, n).tolist() for n in lengths]


def summary(records, wall):
    ttft = [times[0] - submitted for submitted, times in records]
    itl = [gap for _, times in records for gap in np.diff(times)]
    tokens = sum(len(times) for _, times in records)
    pct = lambda values, q: 1000 * float(np.percentile(values, q)) if values else float("nan")
    return {"tokens/s": tokens / wall, "ttft p50": pct(ttft, 50), "ttft p99": pct(ttft, 99),
            "itl p50": pct(itl, 50), "itl p99": pct(itl, 99), "requests": len(records),
            "request s": float(np.mean([times[-1] - submitted for submitted, times in records]))}


def flops_per_token(lm, config):
    """Products' FLOPs of one token through the model's blocks, and of its
    logits."""
    embedding = config["vocab_size"] * config["hidden_size"]
    untied = not config.get("tie_word_embeddings", False)
    return 2 * (trainable_parameters(lm) - embedding * (1 + untied)), 2 * embedding


def compute_floors(lm, config, clients, prompt, new):
    """(ceiling tokens/s, burst TTFT floor ms) at BF16_PEAK_FLOPS: see the
    module's docstring."""
    layers, logits = flops_per_token(lm, config)
    request = layers * (prompt + new) + logits * new
    return new * BF16_PEAK_FLOPS / request, 1000 * clients * layers * prompt / BF16_PEAK_FLOPS


def fixed_row(lm, config, name, args, scale, deadline):
    """The row's engine runs (a burst, then staggered where there are many
    clients) and its static batch: {row name: figures}."""
    clients, prompt, new = FIXED[name]
    prompt, new = prompt // scale, new // scale
    engine = Engine(lm, max_batch=clients, prefill_chunk=args.prefill_chunk)
    engine.start()
    results = {}
    try:
        warm = [(p, 8) for p in prompts([prompt] * clients, config["vocab_size"], seed=1)]
        drive(engine, warm, clients, deadline)
        requests = [(p, new) for p in prompts([prompt] * clients * args.requests, config["vocab_size"])]
        results[name] = summary(*drive(engine, requests, clients, deadline))
        if clients > 1:
            before = engine.stats().preemptions
            stagger = results[name]["request s"]
            # Prompts of their own: the burst's would be the prefix cache's.
            requests = [(p, new) for p in prompts([prompt] * clients * args.requests, config["vocab_size"], seed=3)]
            results[f"{name} staggered"] = summary(*drive(engine, requests, clients, deadline, stagger))
            results[f"{name} staggered"]["preemptions"] = engine.stats().preemptions - before
            results[name]["preemptions"] = before
    finally:
        engine.stop()
        del engine
        gc.collect()  # the pool's memory back before generate's caches take theirs
    static = clients * new / best_time(generate_call(lm, [prompt] * clients, new), 2)
    ceiling, ttft_floor = compute_floors(lm, config, clients, prompt, new)
    for result in results.values():
        result.update({"static tokens/s": static, "ceiling tokens/s": ceiling})
    results[name]["ttft floor"] = ttft_floor
    if name in STEP_ROWS:  # the rows whose ITL targets are set against generate's step
        weights, kv = decode_bytes_per_device(lm, config, 1, 2)
        step = per_token_ms(lm, clients, prompt, new, 2)
        floor = decode_floor_ms(weights, kv, clients, prompt + new // 2, HBM_BANDWIDTH)
        for result in results.values():
            result.update({"static step ms": step, "floor ms": floor})
    return results


def mixed_row(lm, config, args, scale, deadline):
    rs = np.random.RandomState(2)
    lengths = (rs.randint(32, 4097, MIXED_REQUESTS) // scale).clip(1)
    news = (rs.randint(16, 1025, MIXED_REQUESTS) // scale).clip(1)
    ids = prompts(lengths, config["vocab_size"])
    engine = Engine(lm, max_batch=MIXED_REQUESTS, prefill_chunk=args.prefill_chunk)
    engine.start()
    try:
        drive(engine, [(p, 8) for p in prompts(lengths, config["vocab_size"], seed=1)], MIXED_REQUESTS, deadline)
        result = summary(*drive(engine, list(zip(ids, news)), MIXED_REQUESTS, deadline))
    finally:
        engine.stop()
        del engine
        gc.collect()
    static = 0.0
    for first in range(0, MIXED_REQUESTS, MIXED_STATIC_BATCH):
        batch = slice(first, first + MIXED_STATIC_BATCH)
        static += best_time(generate_call(lm, list(lengths[batch]), int(news[batch].max())), 1)
    result["static tokens/s"] = int(news.sum()) / static
    layers, logits = flops_per_token(lm, config)
    flops = layers * int((lengths + news).sum()) + logits * int(news.sum())
    result["ceiling tokens/s"] = int(news.sum()) * BF16_PEAK_FLOPS / flops
    return {"mixed": result}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rows", nargs="+", default=["one", "fixed64", "fixed256", "mixed"])
    parser.add_argument("--requests", type=int, default=3, help="requests per client (fixed rows)")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--minutes", type=float, default=8.0, help="stop (with an error) past this")
    args = parser.parse_args()
    deadline = time.perf_counter() + 60 * args.minutes
    config = hf_config(args.shape, max_position_embeddings=8192)
    scale = TINY_SCALE if args.shape == "tiny" else 1
    lm = tp_zoo_model(config, 1, "bfloat16")
    lm.compile(sampler="greedy")
    results = {}
    for row in args.rows:
        rows = mixed_row(lm, config, args, scale, deadline) if row == "mixed" else fixed_row(
            lm, config, row, args, scale, deadline)
        for name, result in rows.items():
            print(name, {k: round(v, 2) for k, v in result.items()}, flush=True)
        results.update(rows)
    print(header(f"bench_serve.py --shape {args.shape}, prefill chunk {args.prefill_chunk}"))
    print("| row | engine tokens/s | static tokens/s | ratio | compute ceiling tokens/s | TTFT p50 / p99 ms "
          "(burst floor) | ITL p50 / p99 ms | static step ms (floor) | requests |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row, r in results.items():
        step = f"{r['static step ms']:.2f} ({r['floor ms']:.2f})" if "static step ms" in r else "-"
        floor = f" ({r['ttft floor']:.0f})" if "ttft floor" in r else ""
        print(f"| {row} | {r['tokens/s']:,.0f} | {r['static tokens/s']:,.0f} | "
              f"{r['tokens/s'] / r['static tokens/s']:.2f} | {r['ceiling tokens/s']:,.0f} | "
              f"{r['ttft p50']:.0f} / {r['ttft p99']:.0f}{floor} | "
              f"{r['itl p50']:.2f} / {r['itl p99']:.2f} | {step} | {r['requests']} |")


if __name__ == "__main__":
    main()
