"""Finding a checkpoint: a preset name, a local directory or hf://org/name."""

import difflib
import json
from pathlib import Path

import numpy as np

from tp_zoo.checkpoint.layout import presets_dir
from tp_zoo.checkpoint.tensor_files import InMemoryTensors
from tp_zoo.checkpoint.tensor_files import TensorFiles
from tp_zoo.errors import CheckpointNotFoundError
from tp_zoo.errors import CorruptCheckpointError
from tp_zoo.errors import GatedCheckpointError
from tp_zoo.errors import HubUnreachableError

# Only the files a model needs: config, safetensors weights, tokenizer (and
# its chat template, in a file of its own in newer checkpoints).
_NEEDED = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "chat_template.jinja",
]
_PICKLED = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def presets():
    return json.loads((presets_dir() / "presets.json").read_text())


def list_presets():
    """Names of the checkpoints tp_zoo knows by name."""
    return sorted(presets())


def checkpoint_directory(preset, allow_pickle=False):
    """A local directory holding the checkpoint `preset` names."""
    path = Path(str(preset)).expanduser()
    if path.is_dir():
        return path
    if str(preset).startswith("hf://"):
        return _download(str(preset)[len("hf://") :], allow_pickle)
    known = presets()
    if preset in known:
        return _download(known[preset]["hf"], allow_pickle)
    close = difflib.get_close_matches(str(preset), list(known), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    if "/" in str(preset):
        hint += f" (No directory {path}; a Hugging Face repo is written hf://{preset}.)"
    raise CheckpointNotFoundError(
        f"Unknown preset {preset!r}.{hint} Use a name from tp_zoo.list_presets(), "
        "a local directory with a Hugging Face checkpoint, or hf://org/name."
    )


def _download(repo_id, allow_pickle):
    """snapshot_download of the needed files; its errors as one-line
    tp_zoo errors that say what to do."""
    import huggingface_hub
    from huggingface_hub import errors

    patterns = _NEEDED + (_PICKLED if allow_pickle else [])
    local = "or pass a local directory holding the checkpoint (config.json, *.safetensors)"
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except errors.GatedRepoError:
        raise GatedCheckpointError(
            f"{repo_id} is a gated repo on the Hugging Face Hub: accept its license at "
            f"https://huggingface.co/{repo_id}, then log in as that account (`hf auth login`, or set HF_TOKEN)."
        ) from None
    except errors.RepositoryNotFoundError:
        raise CheckpointNotFoundError(
            f"No repo {repo_id} on the Hugging Face Hub, or it is private (then log in: `hf auth login`, or set "
            f"HF_TOKEN). Check the name (tp_zoo.list_presets() lists the known ones), {local}."
        ) from None
    except errors.LocalEntryNotFoundError:  # the Hub out of reach, and no cached copy
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            why, fix = "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to download it once"
        else:
            why, fix = "the Hugging Face Hub could not be reached", "connect to the internet to download it once"
        raise HubUnreachableError(
            f"Cannot fetch {repo_id}: {why}, and the cache ({huggingface_hub.constants.HF_HUB_CACHE}) has no copy: "
            f"{fix}, {local}."
        ) from None
    except errors.HfHubHTTPError as error:
        status = error.response.status_code
        raise HubUnreachableError(
            f"The Hugging Face Hub answered {status} for {repo_id} and the cache has no copy: "
            f"{'check your token (HF_TOKEN, `hf auth login`)' if status in (401, 403) else 'try again later'}, {local}."
        ) from None


def read_config(directory):
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointNotFoundError(f"{directory} has no config.json: not a Hugging Face checkpoint directory.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CorruptCheckpointError(
            f"{path} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{path} cannot be read: {error}.") from None
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object of settings.")
    return config


def open_tensors(directory, allow_pickle=False):
    """The checkpoint's tensors: safetensors, or (opt-in) pickled PyTorch files."""
    directory = Path(directory)
    if list(directory.glob("*.safetensors")):
        return TensorFiles.from_directory(directory)
    pickled = sorted(directory.glob("pytorch_model*.bin"))
    if not pickled:
        raise ValueError(f"{directory} holds no weights (*.safetensors).")
    if not allow_pickle:
        raise ValueError(
            f"{directory} has only pickled PyTorch weights ({', '.join(p.name for p in pickled)}). "
            "Unpickling a file can run arbitrary code, so tp_zoo refuses it by default. "
            "If you trust this checkpoint, pass allow_pickle=True (it needs torch, and "
            "reads each file whole into host memory)."
        )
    return _read_pickled(pickled)


def _read_pickled(paths):
    try:
        import torch
    except ImportError:
        raise ValueError("allow_pickle=True needs torch to read pytorch_model*.bin files.") from None
    import ml_dtypes

    arrays = {}
    for path in paths:
        for name, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
            if tensor.dtype == torch.bfloat16:
                arrays[name] = tensor.float().numpy().astype(ml_dtypes.bfloat16)
            else:
                arrays[name] = np.asarray(tensor.numpy())
    return InMemoryTensors(arrays)
