"""Training rows beside the anchors: tp_zoo against transformers + PEFT and
KerasHub's own Llama, on one device (tp_zoo issue #26).

    python scripts/bench_train.py --rows lora long int8 full [--shape llama3_8b] [--steps 10 --warmup 3]
    JAX_PLATFORMS=cpu python scripts/bench_train.py --shape tiny --rows lora long int8 full --steps 2 --warmup 1

Row groups (random weights, bf16 weights, AdamW, a fixed random batch):

  lora   LoRA r16 on query and value, 8 x 1024: tp_zoo (float32 adapters,
         its float32-math AdamW), transformers + PEFT (sdpa, float32
         adapters, torch AdamW), KerasHub's LlamaCausalLM (its enable_lora,
         Keras' AdamW in bf16, which may leave the loss flat).
  long   LoRA r16 at 1 x 32768: tp_zoo with remat "layers" and "products",
         PEFT with gradient checkpointing; tp_zoo at 1 x 131072, remat
         "layers" (a quarter of the steps: each is long).
  int8   the 70B shape with int8 weights (random int8 values, scales of
         0.02/64), LoRA r16 at 1 x 4096, remat "layers"; tp_zoo only.
  full   full fine-tuning at 4 x 1024: tp_zoo (remat "none" and
         "products") and transformers (torch AdamW, foreach).
  dense  the old table: full fine-tuning in mixed_bfloat16 at 8 x 1024,
         tp_zoo at each --tp and KerasHub.

Each row runs in its own process (this script again, with --one SPEC,
answering one JSON line), so its peak memory is its own, and an
out-of-memory or a stuck row (--row-timeout) is reported in its row
instead of ending the run. A JAX row's child may take 95% of the GPU
(XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; JAX's default is 75%), preallocated
as JAX does by default: with preallocation off, the 8B LoRA row at 1 x
131072 failed to allocate its 56 GiB step on an H200 with 120 GiB free,
and ran with it on (71.2 GiB peak). JAX's peak_bytes_in_use is its
allocator's peak either way. A torch row's child runs JAX (if anything
imports it) on the CPU, so that the GPU is torch's alone.

Every row: tokens/s from the median step time over --steps steps after
--warmup; the peak device memory (JAX: peak_bytes_in_use; torch:
max_memory_allocated; "-" on CPU), tp_zoo's own estimate beside it
(tp_zoo.models.memory.training_memory, where it exists); the first and last
loss of the timed steps (learning rates 1e-3 for LoRA, 1e-4 for full
fine-tuning, so that it falls in a few steps); for full fine-tuning MFU =
6 x trainable parameters x tokens/s / 790 TFLOP/s. The table comes last.

Without a GPU (a smoke run), batches are at most 2 rows and sequences a
64th as long (at least 64 tokens: 1024 -> 64, 32768 -> 512, 131072 ->
2048), and the int8 row takes --shape in place of the 70B; --seq-scale F
multiplies every sequence length by F instead (batches as they are).
--only WORD... keeps the rows whose "framework what batch x seq" contains
one of the words (e.g. --rows long --only "x 131072"), to split a group
over several commands.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("KERAS_BACKEND", "jax")  # the parent imports no Keras, JAX nor torch: its children do

RESULT = "BENCH_TRAIN_RESULT "  # the child's answer: this prefix, then one JSON line
LORA_RANK = 16
LIBRARIES = ("torch", "transformers", "peft")


# --- the rows ---------------------------------------------------------------

def row(framework, what, batch, seq, train, lr, **more):
    """One measurement's spec (what the child needs, all JSON)."""
    return {"framework": framework, "what": what, "batch": batch, "seq": seq, "train": train, "lr": lr,
            "dtype": "bfloat16", "remat": "none", "tp": 1, **more}


def group_rows(group, shape, on_gpu, tps):
    """The specs of one row group, at their full (GPU) sizes."""
    lora = f"LoRA r{LORA_RANK} q,v"
    if group == "lora":
        return [
            row("tp_zoo", lora, 8, 1024, "lora", 1e-3),
            row("transformers+PEFT", lora, 8, 1024, "lora", 1e-3),
            row("KerasHub", lora + ", Keras AdamW", 8, 1024, "lora", 1e-3),
        ]
    if group == "long":
        return [
            row("tp_zoo", lora + ", remat layers", 1, 32768, "lora", 1e-3, remat="layers"),
            row("tp_zoo", lora + ", remat products", 1, 32768, "lora", 1e-3, remat="products"),
            row("transformers+PEFT", lora + ", grad ckpt", 1, 32768, "lora", 1e-3, checkpointing=True),
            row("tp_zoo", lora + ", remat layers", 1, 131072, "lora", 1e-3, remat="layers", steps_divisor=4),
        ]
    if group == "int8":
        big = "llama3_70b" if on_gpu else shape
        return [row("tp_zoo", f"{big} int8, {lora}, remat auto", 1, 4096, "lora", 1e-3,
                    shape=big, quantized="int8", remat="auto")]
    if group == "full":
        return [
            row("tp_zoo", "full bf16", 4, 1024, "full", 1e-4),
            row("tp_zoo", "full bf16, remat products", 4, 1024, "full", 1e-4, remat="products"),
            row("transformers", "full bf16, AdamW foreach", 4, 1024, "full", 1e-4),
        ]
    if group == "dense":
        return [row("KerasHub", "full mixed_bfloat16", 8, 1024, "full", 1e-4, dtype="mixed_bfloat16")] + [
            row("tp_zoo", f"full mixed_bfloat16, tp={tp}", 8, 1024, "full", 1e-4, dtype="mixed_bfloat16", tp=tp)
            for tp in tps
        ]
    raise ValueError(group)


def sized(spec, on_gpu, seq_scale):
    """The spec at this run's size: as is on a GPU, else a smoke run's
    (batch at most 2, a 64th of the sequence, at least 64 tokens), or every
    sequence times `seq_scale` if given."""
    spec = dict(spec)
    if seq_scale is not None:
        spec["seq"] = max(16, int(spec["seq"] * seq_scale))
    elif not on_gpu:
        spec["batch"] = min(spec["batch"], 2)
        spec["seq"] = max(64, spec["seq"] // 64)
    return spec


# --- the child: one measurement -----------------------------------------------

def first_line(error):
    """The first non-empty line of an exception's message, cut to 110 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text[:110]


def is_out_of_memory(text):
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OutOfMemory" in text


def estimate_memory(lm, batch, seq, remat):
    """(total bytes, its breakdown) of tp_zoo's own estimate of a training
    step (None and the error where it fails: the row is measured all the
    same)."""
    from tp_zoo.models.memory import training_memory

    try:
        estimate = training_memory(lm, batch, seq, remat)
        return int(estimate.total), str(estimate)
    except Exception as error:
        return None, f"no estimate: {type(error).__name__}: {first_line(error)}"


def randomize_int8(lm, scale=0.02 / 64):
    """Every int8 `kernel` filled with random int8 values made on its devices
    (into its own sharding, one variable at a time) and every `kernel_scale`
    set to `scale`: weights of about 0.02, so activations are sane and the
    loss can fall (the zeros tp_zoo_model makes would train nothing)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    makers = {}  # one compiled maker per (shape, sharding)
    for i, variable in enumerate(lm.weights):
        name = variable.path.split("/")[-1]
        sharding = variable.value.sharding
        if name == "kernel" and str(variable.dtype) == "int8":
            shape = tuple(variable.shape)
            if (shape, sharding) not in makers:
                draw = lambda key, shape=shape: jax.random.randint(key, shape, -127, 128, jnp.int8)
                makers[shape, sharding] = jax.jit(draw, out_shardings=sharding)
            variable.assign(makers[shape, sharding](jax.random.key(i)))
        elif name == "kernel_scale":
            variable.assign(jax.device_put(np.full(variable.shape, scale, "float32"), sharding))


def keras_row(spec):
    """A tp_zoo or KerasHub row: build, LoRA or not, compile with Keras'
    AdamW, time `train_on_batch`. Returns the row's measurements."""
    from bench_common import hf_config, keras, keras_hub_model, peak_device_bytes, timed_steps
    from bench_common import tp_zoo_model, trainable_parameters, training_batch

    batch, seq = spec["batch"], spec["seq"]
    config = hf_config(spec["shape"], max_position_embeddings=max(8192, seq))
    keras.utils.set_random_seed(0)
    loss = {}
    if spec["framework"] == "tp_zoo":
        lm = tp_zoo_model(config, spec["tp"], spec["dtype"], quantized=spec.get("quantized"))
        if spec.get("quantized"):
            randomize_int8(lm)
    else:
        lm = keras_hub_model(config, spec["dtype"])
        loss = {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}
    if spec["train"] == "lora":
        lm.backbone.enable_lora(LORA_RANK)
    # tp_zoo remakes Keras' AdamW as its own (float32 math); KerasHub keeps it.
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=spec["lr"]), weighted_metrics=[], **loss)
    estimate, estimate_text = (None, None)
    if spec["framework"] == "tp_zoo":
        # "auto": what tp_zoo.finetune would choose for this batch on this device.
        from tp_zoo.models.memory import remat_for

        lm.remat = remat_for(lm, batch, seq) if spec["remat"] == "auto" else spec["remat"]
        estimate, estimate_text = estimate_memory(lm, batch, seq, lm.remat)
        estimate_text = f"remat={lm.remat!r}: {estimate_text}"
    x, y = training_batch(batch, seq, config["vocab_size"])
    step = lambda: float(lm.train_on_batch(x, y, return_dict=True)["loss"])
    seconds, losses = timed_steps(step, spec["warmup"], spec["steps"])
    return dict(seconds=seconds, losses=losses, params=trainable_parameters(lm), peak=peak_device_bytes(),
                estimate=estimate, estimate_text=estimate_text)


def torch_row(spec):
    """A transformers row: LlamaForCausalLM in bf16 (sdpa), with PEFT's LoRA
    or fully trained, torch's AdamW, a standard step (forward with labels,
    backward, step, zero_grad). Returns the row's measurements."""
    import torch

    from bench_common import hf_config, torch_llama, timed_steps, training_batch

    batch, seq = spec["batch"], spec["seq"]
    config = hf_config(spec["shape"], max_position_embeddings=max(8192, seq))
    cuda = torch.cuda.is_available()
    model = torch_llama(config, "bfloat16", "cuda" if cuda else "cpu", attn_implementation="sdpa")
    if spec.get("checkpointing"):
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # PEFT: the frozen embeddings' output must carry gradients
    if spec["train"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
            task_type="CAUSAL_LM"))  # adapters float32: PEFT's default
    model.train()  # gradient checkpointing acts in training mode only
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], foreach=True)
    x, _ = training_batch(batch, seq, config["vocab_size"])
    ids = torch.from_numpy(x["token_ids"]).long().to(next(model.parameters()).device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    seconds, losses = timed_steps(step, spec["warmup"], spec["steps"], torch.cuda.synchronize if cuda else None)
    return dict(seconds=seconds, losses=losses, params=sum(p.numel() for p in params),
                peak=torch.cuda.max_memory_allocated() if cuda else None, estimate=None, estimate_text=None)


def run_one(spec):
    """The child's work: one row (or, with "info", the run's header and
    whether JAX sees a GPU); prints RESULT and its JSON as the last line."""
    try:
        if spec.get("info"):
            import jax

            from bench_common import SHAPES, header, library_versions

            if spec["shape"] not in SHAPES:
                raise ValueError(f"unknown shape {spec['shape']!r}; expected one of {', '.join(sorted(SHAPES))}")
            result = dict(status="ok", gpu=jax.devices()[0].platform == "gpu",
                          header=header(spec["info"], library_versions(*LIBRARIES)))
        else:
            from bench_common import BF16_PEAK_FLOPS, training_flops

            measure = keras_row if spec["framework"] in ("tp_zoo", "KerasHub") else torch_row
            result = dict(status="ok", **measure(spec))
            result["tokens"] = spec["batch"] * spec["seq"] / result["seconds"]
            if spec["train"] == "full":
                result["mfu"] = training_flops(result["params"], result["tokens"]) / BF16_PEAK_FLOPS
    except Exception as error:  # reported in the row: the run goes on
        text = f"{type(error).__name__}: {error}"
        result = dict(status="OOM" if is_out_of_memory(text) else "error", message=first_line(error))
        print(text[:4000], file=sys.stderr)
    print(RESULT + json.dumps(result), flush=True)


# --- the parent: one child per row ---------------------------------------------

def run_child(spec, timeout):
    """Runs `spec` in a child process (JAX without preallocation; a torch
    row's JAX on the CPU) and returns its answer; a child that dies or
    outlives `timeout` seconds is killed with its process group and
    reported as such."""
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", **os.environ}  # a caller may choose otherwise
    if spec.get("framework") in ("transformers", "transformers+PEFT"):
        env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return dict(status="timeout", message=f"killed after {timeout} s")
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = [line for line in err.splitlines() if line.strip()][-3:]
    print("\n".join(tail), file=sys.stderr)
    status = "OOM" if is_out_of_memory(err) else "crashed"
    return dict(status=status, message=f"exit status {child.returncode}: " + (tail[-1][:90] if tail else ""))


def gib(n):
    return "-" if n is None else f"{n / 2**30:.1f}"


def describe(spec, result):
    """One line of progress for a finished row."""
    size = f"{spec['batch']} x {spec['seq']}"
    if result["status"] != "ok":
        return f"{spec['framework']} {spec['what']} {size}: {result['status']}: {result['message']}"
    losses = result["losses"]
    return (f"{spec['framework']} {spec['what']} {size}: {result['seconds'] * 1000:.1f} ms/step, "
            f"peak {gib(result['peak'])} GiB, loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def table(header, done):
    """The report: the header, one line per row, tp_zoo's estimates below."""
    lines = [header, ""]
    lines.append(f"{'framework':<19}{'what':<44}{'batch x seq':>13}{'ms/step':>10}{'tokens/s':>10}"
                 f"{'peak GiB':>10}{'est. GiB':>10}  {'loss first -> last':<20}{'MFU':>6}")
    notes = []
    for spec, result in done:
        start = f"{spec['framework']:<19}{spec['what']:<44}{str(spec['batch']) + ' x ' + str(spec['seq']):>13}"
        if result["status"] != "ok":
            lines.append(f"{start}  {result['status']}: {result['message']}")
            continue
        losses = result["losses"]
        mfu = "-" if result.get("mfu") is None else f"{100 * result['mfu']:.1f}%"
        lines.append(f"{start}{result['seconds'] * 1000:>10.1f}{result['tokens']:>10,.0f}{gib(result['peak']):>10}"
                     f"{gib(result['estimate']):>10}  {f'{losses[0]:.3f} -> {losses[-1]:.3f}':<20}{mfu:>6}")
        if result.get("estimate_text"):
            notes.append(f"  {spec['what']}, {spec['batch']} x {spec['seq']}: {result['estimate_text']}")
    if notes:
        lines += ["", "tp_zoo's estimates (tp_zoo.models.memory.training_memory):"] + notes
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["lora"], choices=["lora", "long", "int8", "full", "dense"])
    parser.add_argument("--shape", default="llama3_8b")
    parser.add_argument("--only", nargs="+", default=None,
                        help="keep the rows whose 'framework what batch x seq' contains one of these words")
    parser.add_argument("--tp", type=int, nargs="+", default=[1], help="the dense rows' tp values")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-scale", type=float, default=None)
    parser.add_argument("--row-timeout", type=int, default=300, help="seconds before a row's child is killed")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one row's JSON spec
    args = parser.parse_args()
    if args.one:
        return run_one(json.loads(args.one))

    what = f"train, shape {args.shape}, random weights, AdamW, median of {args.steps} steps after {args.warmup}"
    info = run_child({"info": what, "shape": args.shape}, args.row_timeout)
    if info["status"] != "ok":
        sys.exit(f"bench_train.py: {info['message']}")
    specs = []
    for group in args.rows:
        for spec in group_rows(group, args.shape, info["gpu"], args.tp):
            spec = sized({"shape": args.shape, **spec}, info["gpu"], args.seq_scale)
            divisor = spec.pop("steps_divisor", 1)
            spec.update(steps=max(2, args.steps // divisor), warmup=min(args.warmup, max(1, args.warmup // divisor)))
            label = f"{spec['framework']} {spec['what']} {spec['batch']} x {spec['seq']}".lower()
            if args.only is None or any(word.lower() in label for word in args.only):
                specs.append(spec)
    done = []
    for i, spec in enumerate(specs):
        start = time.perf_counter()
        result = run_child(spec, args.row_timeout)
        done.append((spec, result))
        print(f"[{i + 1}/{len(specs)}] {describe(spec, result)} ({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print(table(info["header"], done))


if __name__ == "__main__":
    main()
