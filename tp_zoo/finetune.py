"""`tp-zoo finetune`: fine-tune a checkpoint on a data file, sharded and resumable.

The data is a .txt file (one document) or a .jsonl file of examples, one
per line, in TRL's formats (`tp_zoo.models.training_examples`):
{"text": ...} (every token trained), {"messages": [...]} (a conversation
through the chat template; only the assistant's replies trained) and
{"prompt": ..., "completion": ...} (only the completion trained). The
settings, the output folder and every line are checked before the model
loads (`check_finetune`), and every example encoded before the first step,
so a bad setting or line stops the run before anything is trained.

Examples are packed (joined and cut into windows of `seq_len + 1` tokens,
starting every `stride` tokens: seq_len by default) or padded (one per
row; one longer than seq_len + 1 is refused). By default plain text is
packed and instruction data padded. The loss is the mean over the trained
tokens of a batch. Each step takes `batch_size` rows in an order fixed by
the seed, so a resumed run sees exactly the batches an uninterrupted one
would.
"""

import json
import math
import numbers
import os
import sys
import time
from pathlib import Path

import jax
import keras
import numpy as np
from rich.progress import BarColumn
from rich.progress import MofNCompleteColumn
from rich.progress import Progress
from rich.progress import TextColumn
from rich.progress import TimeElapsedColumn

from tp_zoo.checkpoint.export import export_to_hf
from tp_zoo.checkpoint.peft import save_peft_adapter
from tp_zoo.checkpoint.training_state import check_lora_rank
from tp_zoo.checkpoint.training_state import check_same_config
from tp_zoo.checkpoint.training_state import describe_lora
from tp_zoo.checkpoint.training_state import latest_checkpoint
from tp_zoo.checkpoint.training_state import read_manifest
from tp_zoo.checkpoint.training_state import restore_training_state
from tp_zoo.checkpoint.training_state import save_training_state
from tp_zoo.errors import DataFileError
from tp_zoo.errors import FinetuneSettingsError
from tp_zoo.checkpoint.from_preset import checkpoint_dtype
from tp_zoo.models.family import family_of
from tp_zoo.models.memory import fitting_remat
from tp_zoo.models.memory import planned_training_memory
from tp_zoo.models.memory import remat_for
from tp_zoo.models.memory import training_memory
from tp_zoo.models.training_examples import FORMATS
from tp_zoo.models.training_examples import check_example
from tp_zoo.models.training_examples import encode_examples
from tp_zoo.models.training_examples import packed_rows
from tp_zoo.models.training_examples import padded_rows


def _lines(path):
    """The data file's lines, newlines kept."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise DataFileError(f"Data file {path} must be .txt or .jsonl.")
    if not path.exists():
        raise DataFileError(f"Data file {path} does not exist.")
    try:
        with path.open(encoding="utf-8") as f:
            return list(f)
    except (OSError, UnicodeDecodeError) as error:
        raise DataFileError(f"Data file {path} cannot be read: {error}.") from None


def read_examples(path):
    """[(where, example)]: the data file's examples, each checked, with where
    it is ("data.jsonl:7") for errors; a DataFileError names the first bad line."""
    lines = _lines(path)
    if not any(line.strip() for line in lines):
        raise DataFileError(f"Data file {path} is empty.")
    if Path(path).suffix == ".txt":
        return [(str(path), "".join(lines))]
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            example = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFileError(f"{where}: not JSON ({error.msg}).") from None
        if not isinstance(example, dict):
            raise DataFileError(f"{where}: a {type(example).__name__}, not a JSON object ({FORMATS}).")
        try:
            check_example(example, where)
        except ValueError as error:
            raise DataFileError(str(error)) from None
        examples.append((where, example))
    return examples


def check_finetune(data, steps=100, batch_size=8, seq_len=128, lr=1e-4, lora_rank=None, save_every=None,
                   out=None, stride=None, dp=1, fsdp=1):
    """Refuses, before a model is loaded and before anything is written,
    settings `finetune` cannot run (a FinetuneSettingsError), a bad data
    file (a DataFileError) and a resume of checkpoints in `out` trained
    with LoRA of another rank (a CheckpointMismatchError). Returns the
    data's examples (as `read_examples`)."""
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len), ("dp", dp), ("fsdp", fsdp),
                        ("lora_rank", lora_rank), ("save_every", save_every), ("stride", stride)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise FinetuneSettingsError(f"{name}={value!r}: must be a whole number of at least 1.")
    if not isinstance(lr, keras.optimizers.schedules.LearningRateSchedule) and (
            isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0):
        raise FinetuneSettingsError(f"lr={lr!r}: the learning rate must be a positive finite number.")
    if dp > 1 and fsdp > 1:
        raise FinetuneSettingsError(f"dp={dp} and fsdp={fsdp}: give one of them (fsdp devices split the batch too).")
    for name, degree in (("dp", dp), ("fsdp", fsdp)):
        if batch_size % degree:
            raise FinetuneSettingsError(f"batch_size={batch_size} is not divisible by {name}={degree}.")
    if save_every is not None and out is None:
        raise FinetuneSettingsError(f"save_every={save_every} needs out, a folder to save the checkpoints in.")
    if out is not None:
        _check_out(Path(out))
    examples = read_examples(data)
    latest = latest_checkpoint(Path(out) / "checkpoints") if out is not None else None
    if latest is not None:
        check_lora_rank(read_manifest(latest), lora_rank, latest)
    return examples


def check_resumes_model(out, config):
    """Refuses, before the model loads, checkpoints in `out` saved from a
    model of another Hugging Face `config` (a CheckpointMismatchError)."""
    latest = latest_checkpoint(Path(out) / "checkpoints") if out is not None else None
    if latest is not None:
        check_same_config(read_manifest(latest), config, latest)


def planned_memory(config, batch_size=8, seq_len=128, lora_rank=None, remat="auto", tp=1, dp=1, fsdp=1, dtype=None,
                   quantize=None):
    """(remat policy, `TrainingMemory` per device) of fine-tuning a Hugging
    Face checkpoint on the mesh, from its `config` (config.json's dict)
    alone, before any weight is loaded: "auto" takes the least recompute
    that fits the free memory of the mesh's devices; DeviceMemoryError
    (with the estimate) when nothing fits."""
    decoder = family_of(config).causal_lm.backbone_cls.decoder_config(config)
    data = max(dp, fsdp)

    def estimate(policy):
        return planned_training_memory(decoder, batch_size, seq_len, policy, tp=tp, data=data, fully_sharded=fsdp > 1,
                                       dtype=dtype or checkpoint_dtype(config), quantize=quantize, lora_rank=lora_rank)

    policy = fitting_remat(f"Training {batch_size} x {seq_len} tokens", estimate,
                           jax.devices()[: tp * data], remat, weights_on_device=False)
    return policy, estimate(policy)


def _check_out(out):
    """Refuses an output folder that is a file (or whose checkpoints or model
    folder is), or that cannot be made or written."""
    for folder in (out, out / "checkpoints", out / "model"):
        if folder.exists() and not folder.is_dir():
            raise FinetuneSettingsError(f"out={out}: {folder} is a file, not a folder.")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise FinetuneSettingsError(f"out={out} cannot be made: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FinetuneSettingsError(f"out={out} cannot be written: {existing} is not writable.")


def _say(text):
    """A line about what the run does, to stderr (once, from process 0)."""
    if jax.process_index() == 0:
        print(f"finetune: {text}", file=sys.stderr, flush=True)


def training_rows(causal_lm, examples, seq_len, packing=None, stride=None, chat_template=None):
    """({"token_ids", "padding_mask"}, labels) rows of seq_len tokens from
    `read_examples`' examples: packed or padded (None: packed if they are
    all plain text); labels are -100 where nothing is trained."""
    if causal_lm.tokenizer is None:
        raise ValueError("This checkpoint has no tokenizer files: tp-zoo finetune needs one.")
    limit = causal_lm.backbone.max_sequence_length
    if seq_len > limit:
        raise ValueError(f"seq_len={seq_len} is beyond the model's {limit} positions.")
    if packing is None:
        packing = all(check_example(example) == "text" for _, example in examples)
    if not packing and stride is not None:
        raise ValueError("stride applies to packed examples; padded ones take a row each.")
    encoded = encode_examples(causal_lm.tokenizer, examples, chat_template)
    if packing:
        return packed_rows(encoded, seq_len, stride)
    return padded_rows(encoded, seq_len, names=[where for where, _ in examples])


def batch_for_step(step, count, batch_size, seed=0):
    """Indices of the windows of a step: a fresh permutation every epoch."""
    per_epoch = count // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(count)
    return order[offset * batch_size : (offset + 1) * batch_size]


def _mesh_change(saved, now):
    """The mesh a run resumes on, and the one it was saved on if another."""
    sizes = lambda mesh: " ".join(f"{name}={size}" for name, size in mesh.items())
    return sizes(now) if saved in (None, now) else f"{sizes(now)} (saved at {sizes(saved)})"


def _train_steps(causal_lm, x, y, steps, batch_size, seed, out, save_every, progress):
    """Runs the training steps `steps` (a range) on the rows (x, y), saving
    checkpoints to out/checkpoints as `finetune` says; returns the losses."""
    dp, rows, seq_len = causal_lm.data_parallel_degree, len(y), y.shape[1]
    columns = [TextColumn("[bold]fine-tuning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("loss {task.fields[loss]} | {task.fields[speed]} tokens/s")]
    losses = []
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("steps", total=steps.stop, completed=steps.start, loss="-", speed="-")
        began = time.perf_counter()
        for step in steps:
            picked = batch_for_step(step, rows, batch_size, seed)
            if dp > 1 and jax.process_count() > 1:
                # Processes along the "batch" axis each feed their own share.
                picked = np.array_split(picked, jax.process_count())[jax.process_index()]
            batch = {name: value[picked] for name, value in x.items()}
            losses.append(float(causal_lm.train_on_batch(batch, y[picked])))
            speed = (step + 1 - steps.start) * batch_size * seq_len / (time.perf_counter() - began)
            bar.update(task, completed=step + 1, loss=f"{losses[-1]:.3f}", speed=f"{speed:,.0f}")
            if out is not None and (step + 1 == steps.stop or (save_every and (step + 1) % save_every == 0)):
                save_training_state(causal_lm, out / "checkpoints", step + 1)
    return losses


def finetune(causal_lm, data, steps=100, batch_size=8, seq_len=128, lr=1e-4, lora_rank=None,
             save_every=None, out=None, seed=0, stride=None, packing=None, chat_template=None, remat="auto",
             progress=True):
    """Trains `causal_lm` in place; returns the losses of the steps it ran.

    Settings, data and `out` are checked first (`check_finetune`), nothing
    trained or written on a problem. `packing` and `stride` as in
    `training_rows`; `chat_template`: a Jinja template for conversations in
    place of the checkpoint's. With `out`, checkpoints go to out/checkpoints
    every `save_every` steps (and at the end); a run finding one there
    resumes from it (said on stderr), refused if it was another model's or
    of another LoRA rank. The final model is exported to out/model in the
    Hugging Face layout, with `chat_template` if given; with `lora_rank`,
    its adapters (before they are merged) to out/adapter in PEFT's format.
    A run whose checkpoints hold `steps` steps already trains nothing and
    exports only if out/model is missing. `remat` ("auto", or a policy of
    `DecoderCausalLM.remat`): "auto" takes the least recompute whose step
    fits the free device memory; a step that cannot fit is refused before
    it runs (DeviceMemoryError, with the estimate).
    """
    data_parallel = dict(list(causal_lm.mesh_sizes.items())[1:])
    examples = check_finetune(data, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, lora_rank=lora_rank,
                              save_every=save_every, out=out, stride=stride, **data_parallel)
    out = Path(out) if out is not None else None
    latest = latest_checkpoint(out / "checkpoints") if out is not None else None
    done = read_manifest(latest)["step"] if latest is not None else 0
    if done >= steps:
        if (out / "model").exists():
            _say(f"nothing left to train ({done} steps done); {out / 'model'} is exported already, not again.")
            return []
        _say(f"nothing left to train ({done} steps done); exporting that model to {out / 'model'}.")
    x, y = training_rows(causal_lm, examples, seq_len, packing, stride, chat_template)
    rows = len(y)
    if rows < batch_size:
        raise ValueError(f"The dataset has {rows} sequences of {seq_len} tokens, fewer than batch_size={batch_size}.")
    if lora_rank is not None:
        causal_lm.backbone.enable_lora(lora_rank)
    causal_lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=lr), weighted_metrics=[])
    causal_lm.remat = remat_for(causal_lm, batch_size, seq_len, remat)
    _say(f"remat={causal_lm.remat!r}: about {training_memory(causal_lm, batch_size, seq_len)}.")
    start = 0
    if latest is not None:
        start = restore_training_state(causal_lm, latest)
        _say(f"resuming from {latest}: step {start} of {steps}, {describe_lora(lora_rank)}, "
             f"{_mesh_change(read_manifest(latest).get('mesh'), causal_lm.mesh_sizes)}.")
    losses = _train_steps(causal_lm, x, y, range(start, steps), batch_size, seed, out, save_every, progress)
    if out is not None:
        if lora_rank is not None:
            save_peft_adapter(causal_lm, out / "adapter")
            causal_lm.backbone.merge_lora()
        export_to_hf(causal_lm, out / "model", chat_template=chat_template)
    return losses
