"""`tp-zoo finetune`: fine-tune a checkpoint on a text file, sharded and resumable.

The data is a .txt file (one document) or a .jsonl file (one {"text": ...}
per line). Documents are tokenized with the checkpoint's tokenizer, joined
with its EOS token and cut into windows of `seq_len + 1` tokens (starting
every `stride` tokens: seq_len by default, less for overlapping windows); each step
takes `batch_size` windows in an order fixed by the seed, so a resumed run
sees exactly the batches an uninterrupted one would.
"""

import itertools
import json
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
from tp_zoo.checkpoint.training_state import latest_checkpoint
from tp_zoo.checkpoint.training_state import restore_training_state
from tp_zoo.checkpoint.training_state import save_training_state
from tp_zoo.errors import DataFileError


def _lines(path, limit=None):
    """The data file's first `limit` lines (all by default), newlines kept."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise DataFileError(f"Data file {path} must be .txt or .jsonl.")
    if not path.exists():
        raise DataFileError(f"Data file {path} does not exist.")
    try:
        with path.open(encoding="utf-8") as f:
            return list(itertools.islice(f, limit))
    except (OSError, UnicodeDecodeError) as error:
        raise DataFileError(f"Data file {path} cannot be read: {error}.") from None


def _jsonl_texts(path, lines):
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            text = None
        if not isinstance(text, str):
            raise DataFileError(f"{path}:{number}: expected a JSON object with a 'text' field (a string).")
        texts.append(text)
    return texts


def read_texts(path):
    lines = _lines(path)
    return _jsonl_texts(path, lines) if Path(path).suffix == ".jsonl" else ["".join(lines)]


def check_data(path, lines=100):
    """Fails fast, before a model is loaded, on a data file that is missing,
    unreadable, empty or (its first `lines` lines) not in its format."""
    head = _lines(path, lines)
    if not any(line.strip() for line in head):
        raise DataFileError(f"Data file {path} is empty.")
    if Path(path).suffix == ".jsonl":
        _jsonl_texts(path, head)


def windows(causal_lm, texts, seq_len, stride=None):
    """(token_ids, labels) windows of seq_len tokens from the joined documents."""
    if causal_lm.tokenizer is None:
        raise ValueError("This checkpoint has no tokenizer files: tp-zoo finetune needs one.")
    limit = causal_lm.backbone.max_sequence_length
    if seq_len > limit:
        raise ValueError(f"seq_len={seq_len} is beyond the model's {limit} positions.")
    eos = list(causal_lm.tokenizer.eos_ids[:1])
    stream = []
    for text in texts:
        stream += causal_lm.tokenizer.encode(text) + eos
    if len(stream) < seq_len + 1:
        raise ValueError(
            f"The dataset has {len(stream)} tokens: not enough for one sequence of {seq_len} + 1 tokens."
        )
    ids = np.asarray(stream, "int32")
    starts = range(0, len(ids) - seq_len, stride or seq_len)
    x = np.stack([ids[s : s + seq_len] for s in starts])
    y = np.stack([ids[s + 1 : s + seq_len + 1] for s in starts])
    return x, y


def batch_for_step(step, count, batch_size, seed=0):
    """Indices of the windows of a step: a fresh permutation every epoch."""
    per_epoch = count // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(count)
    return order[offset * batch_size : (offset + 1) * batch_size]


def finetune(causal_lm, data, steps=100, batch_size=8, seq_len=128, lr=1e-4, lora_rank=None,
             save_every=None, out=None, seed=0, stride=None, progress=True):
    """Trains `causal_lm` in place; returns the losses of the steps it ran.

    With `out`, checkpoints go to out/checkpoints every `save_every` steps
    (and at the end); a run finding one there resumes from it. The final
    model is exported to out/model in the Hugging Face layout.
    """
    dp = causal_lm.data_parallel_degree
    if batch_size % dp:
        raise ValueError(f"batch_size={batch_size} is not divisible by dp={dp}.")
    x, y = windows(causal_lm, read_texts(data), seq_len, stride)
    if len(x) < batch_size:
        raise ValueError(f"The dataset has {len(x)} sequences of {seq_len} tokens, fewer than batch_size={batch_size}.")
    if lora_rank is not None:
        causal_lm.backbone.enable_lora(lora_rank)
    causal_lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=lr), weighted_metrics=[])
    checkpoints = Path(out) / "checkpoints" if out else None
    start = 0
    if checkpoints is not None and latest_checkpoint(checkpoints) is not None:
        start = restore_training_state(causal_lm, latest_checkpoint(checkpoints))
    losses = []
    columns = [TextColumn("[bold]fine-tuning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("loss {task.fields[loss]} | {task.fields[speed]} tokens/s")]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("steps", total=steps, completed=start, loss="-", speed="-")
        began = time.perf_counter()
        for step in range(start, steps):
            rows = batch_for_step(step, len(x), batch_size, seed)
            if dp > 1 and jax.process_count() > 1:
                # Processes along the "batch" axis each feed their own share.
                rows = np.array_split(rows, jax.process_count())[jax.process_index()]
            batch = {"token_ids": x[rows], "padding_mask": np.ones_like(x[rows])}
            losses.append(float(causal_lm.train_on_batch(batch, y[rows])))
            done = step + 1 - start
            speed = done * batch_size * seq_len / (time.perf_counter() - began)
            bar.update(task, completed=step + 1, loss=f"{losses[-1]:.3f}", speed=f"{speed:,.0f}")
            if checkpoints is not None and (step + 1 == steps or (save_every and (step + 1) % save_every == 0)):
                save_training_state(causal_lm, checkpoints, step + 1)
    if out:
        if lora_rank is not None:
            causal_lm.backbone.merge_lora()
        export_to_hf(causal_lm, Path(out) / "model")
    return losses
