"""Sharded training checkpoints: weights, optimizer state and step.

Each process writes only the shards its own devices hold (one copy of each
distinct block), to its own safetensors file; nothing is gathered. A
checkpoint is written under a temporary name and renamed into place only
when complete, so a run killed in the middle of a save leaves the previous
checkpoint as the latest one. Restoring assembles each device's block from
the saved blocks that overlap it, matching entries by their index among the
real ones (the manifest records where each variable's tp padding sits), so
a checkpoint saved at one tp restores at another, whatever each pads.

The manifest records what tells a model apart (its architecture's sizes, its
Hugging Face config, its LoRA adapters' shapes) and the mesh it was saved
on; a checkpoint of another model, or with LoRA of another rank, is refused
before any variable is assigned.
"""

import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np

from tp_zoo.checkpoint.tensor_files import SafetensorsFile
from tp_zoo.checkpoint.tensor_files import write_safetensors
from tp_zoo.errors import CheckpointMismatchError
from tp_zoo.layers.base import AxisPadding
from tp_zoo.layers.base import paddings

_NAME = re.compile(r"^step_(\d{8})$")


def _state(causal_lm):
    """(key, variable, its paddings) for every variable a training run needs
    back. An optimizer slot pads as the variable it was made for (Keras names
    it "<that variable's path, / as _>_<slot>")."""
    items = [(v.path, v, paddings(v)) for v in causal_lm.variables]
    optimizer = getattr(causal_lm, "optimizer", None)
    if optimizer is not None and optimizer.built:
        owners = {v.path.replace("/", "_"): v for v in causal_lm.trainable_variables}
        for v in optimizer.variables:
            words = v.name.split("_")
            owner = next((owners[k] for k in ("_".join(words[:i]) for i in range(len(words) - 1, 0, -1))
                          if k in owners and tuple(owners[k].shape) == tuple(v.shape)), v)
            # Optimizer variable paths start with the optimizer's (counted) name.
            items.append(("optimizer/" + v.path.split("/", 1)[-1], v, paddings(owner)))
    return items


def _barrier(name):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_training_state(causal_lm, directory, step, keep=2):
    """Saves to directory/step_{step:08d}; returns that path. The `keep`
    newest checkpoints stay (None: all), older ones are deleted.

    With several processes (sharing `directory`), each writes its own
    shard-N.safetensors and pieces-N.json; process 0 writes the manifest and
    renames the folder once all have finished.
    """
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be a positive number of checkpoints or None (all), got {keep!r}.")
    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    tmp = directory / f".step_{step:08d}.tmp"
    process = jax.process_index()
    if process == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(f"tp_zoo save {step} begin")
    manifest = {"step": step, "model": _fingerprint(causal_lm), "config": _comparable(getattr(causal_lm, "hf_config", None)),
                "mesh": causal_lm.mesh_sizes, "variables": {}}
    pieces = []
    for key, variable, padding in _state(causal_lm):
        value = variable.value
        manifest["variables"][key] = {"shape": list(value.shape), "dtype": str(value.dtype),
                                      "padding": [list(p) for p in padding]}
        for shard in value.addressable_shards:
            if shard.replica_id != 0:
                continue
            index = [list(s.indices(n)[:2]) for s, n in zip(shard.index, value.shape)]
            pieces.append((f"{key}@{'_'.join(f'{a}-{b}' for a, b in index)}", shard, key, index))
    tensors = ((name, np.asarray(shard.data)) for name, shard, _, _ in pieces)
    write_safetensors(tmp / f"shard-{process:05d}.safetensors", tensors)
    mine = {name: {"key": key, "index": index, "file": f"shard-{process:05d}.safetensors"}
            for name, _, key, index in pieces}
    (tmp / f"pieces-{process:05d}.json").write_text(json.dumps(mine))
    for path in (tmp / f"shard-{process:05d}.safetensors", tmp / f"pieces-{process:05d}.json"):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _barrier(f"tp_zoo save {step} written")
    if process == 0:
        # The manifest comes last: a folder without one is never taken as complete.
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        with open(tmp / "manifest.json", "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        done = sorted(p for p in directory.iterdir() if _NAME.match(p.name))
        for old in done[: -keep if keep else 0]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(f"tp_zoo save {step} done")
    return final


def latest_checkpoint(directory):
    """The newest complete checkpoint under `directory`, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    done = sorted(p for p in directory.iterdir() if _NAME.match(p.name) and (p / "manifest.json").exists())
    return done[-1] if done else None


def read_manifest(path):
    """The manifest of the checkpoint at `path` (a dict)."""
    return json.loads((Path(path) / "manifest.json").read_text())


def lora_rank(causal_lm):
    """The rank of the model's LoRA adapters, None without LoRA."""
    backbone = causal_lm.backbone
    return backbone._lora_rank if getattr(backbone, "_lora_enabled_layers", None) else None


def saved_lora_rank(manifest):
    """The rank of a checkpoint's LoRA adapters (their inner dim), None without LoRA."""
    return next((saved["shape"][-1] for key, saved in manifest["variables"].items()
                 if key.endswith("lora_kernel_a")), None)


def check_lora_rank(manifest, rank, path):
    """Refuses to resume the checkpoint at `path` with LoRA of another rank
    (or with LoRA where it had none, or none where it had some)."""
    saved = saved_lora_rank(manifest)
    if saved != rank:
        raise CheckpointMismatchError(
            f"{path} was trained with {describe_lora(saved)}, this run has {describe_lora(rank)}: resume it with "
            f"{describe_lora(saved)}, or start a new run elsewhere."
        )


def describe_lora(rank):
    """"LoRA rank 8", or "no LoRA" for None."""
    return "no LoRA" if rank is None else f"LoRA rank {rank}"


def restore_training_state(causal_lm, path):
    """Loads a checkpoint into `causal_lm` (its optimizer is built if needed);
    returns the step. Everything is checked before anything is assigned."""
    path = Path(path)
    manifest = read_manifest(path)
    _check_same_model(causal_lm, manifest, path)
    check_lora_rank(manifest, lora_rank(causal_lm), path)
    optimizer = causal_lm.optimizer
    if optimizer is not None and not optimizer.built:
        optimizer.build(causal_lm.trainable_variables)
    state = _state(causal_lm)
    model_keys = {key for key, _, _ in state if not key.startswith("optimizer/")}
    extra = sorted(k for k in manifest["variables"] if not k.startswith("optimizer/") and k not in model_keys)
    if extra:
        raise CheckpointMismatchError(
            f"{path} holds {len(extra)} variables this model lacks (first {extra[0]}): it was saved from a "
            "different model (quantized, or with LoRA on other layers)."
        )
    restores = []
    for key, variable, padding in state:
        if key not in manifest["variables"]:
            raise CheckpointMismatchError(f"{path} has no saved value for {key}.")
        saved = manifest["variables"][key]
        saved_padding = _saved_padding(saved, padding)
        if _real(saved_padding) != _real(padding):
            raise CheckpointMismatchError(
                f"Saved {key} has shape {tuple(saved['shape'])} ({_real(saved_padding)} real), the model's is "
                f"{tuple(variable.shape)} ({_real(padding)} real)."
            )
        restores.append((key, variable, padding, saved_padding))
    by_key = {}
    for listing in sorted(path.glob("pieces-*.json")):
        for name, piece in json.loads(listing.read_text()).items():
            by_key.setdefault(piece["key"], []).append((name, piece))
    files = {}
    for key, variable, padding, saved_padding in restores:
        variable.assign(_assemble(variable, padding, saved_padding, by_key.get(key, []), files, path))
    return manifest["step"]


def _check_same_model(causal_lm, manifest, path):
    """Refuses a checkpoint of another architecture, or (where the manifest
    records one: checkpoints saved since) of another Hugging Face config."""
    mine = _fingerprint(causal_lm)
    if manifest["model"] != mine:
        raise CheckpointMismatchError(
            f"{path} was saved from a different model ({manifest['model']}); this one is {mine}."
        )
    check_same_config(manifest, getattr(causal_lm, "hf_config", None), path)


def check_same_config(manifest, config, path):
    """Refuses the checkpoint at `path` (its `manifest`) for a model of
    another Hugging Face `config` (a dict; None: nothing to compare), as
    `tp-zoo finetune` does before loading the model."""
    saved, config = manifest.get("config"), _comparable(config)
    if saved is not None and config is not None and saved != config:
        differ = sorted(k for k in saved.keys() | config.keys() if saved.get(k) != config.get(k))
        shown = ", ".join(f"{k}: {saved.get(k)!r} saved, {config.get(k)!r} here" for k in differ[:3])
        raise CheckpointMismatchError(
            f"{path} was saved from a different model: its config differs in {len(differ)} entries ({shown})."
        )


def _real(padding):
    return tuple(p.true_size for p in padding)


def _saved_padding(saved, padding):
    """The saved variable's paddings; a manifest without them (older
    checkpoints) padded only at the end, as the vocab is."""
    if "padding" in saved:
        return tuple(AxisPadding(*p) for p in saved["padding"])
    return tuple(AxisPadding.trailing(min(p.true_size, n), n) for p, n in zip(padding, saved["shape"]))


def _assemble(variable, padding, saved_padding, pieces, files, path):
    """The variable's value for its current sharding, from the saved blocks,
    entry by entry of the same real index (zeros at this tp's padding)."""
    value = variable.value
    sharding = value.sharding
    mine = [p.real_index() for p in padding]
    theirs = [p.real_index() for p in saved_padding]
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(value.shape).items():
        block = [s.indices(n)[:2] for s, n in zip(index, value.shape)]
        out = np.zeros([b - a for a, b in block], dtype=value.dtype)
        for name, piece in pieces:
            # Per dim: where the block and the piece hold the same real entries.
            dst, src = [], []
            for (a, b), (p0, p1), m, t in zip(block, piece["index"], mine, theirs):
                common, d, s_ = np.intersect1d(m[a:b], t[p0:p1], return_indices=True)
                dst.append(d[common >= 0])
                src.append(s_[common >= 0])
            if any(len(d) == 0 for d in dst):
                continue
            if piece["file"] not in files:
                files[piece["file"]] = SafetensorsFile(path / piece["file"])
            saved = np.asarray(files[piece["file"]].array(name))
            out[np.ix_(*dst)] = saved[np.ix_(*src)]
        arrays.append(jax.device_put(out, device))
    return jax.make_array_from_single_device_arrays(value.shape, sharding, arrays)


# Config entries that say how a checkpoint was written, not what its model is.
_WRITING_ONLY = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")


def _comparable(config):
    """A Hugging Face config less how it was written (None for None), as its
    JSON reads back (tuples as lists): what a manifest records and compares."""
    if config is None:
        return None
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in _WRITING_ONLY}))


def _fingerprint(causal_lm):
    """What identifies a model's architecture (not its tp): family config sizes."""
    backbone = causal_lm.backbone
    keys = ("vocab_size", "hidden_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_dim")
    return {k: getattr(backbone, k) for k in keys} | {"class": type(causal_lm).__name__}
