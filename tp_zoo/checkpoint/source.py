"""Finding a checkpoint: a preset name, a local directory or hf://org/name."""

import difflib
import json
from pathlib import Path

import numpy as np

from tp_zoo.checkpoint.layout import presets_dir
from tp_zoo.checkpoint.tensor_files import InMemoryTensors
from tp_zoo.checkpoint.tensor_files import TensorFiles

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
    raise ValueError(
        f"Unknown preset {preset!r}.{hint} Use a name from tp_zoo.list_presets(), "
        "a local directory with a Hugging Face checkpoint, or hf://org/name."
    )


def _download(repo_id, allow_pickle):
    from huggingface_hub import snapshot_download

    patterns = _NEEDED + (_PICKLED if allow_pickle else [])
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def read_config(directory):
    path = Path(directory) / "config.json"
    if not path.exists():
        raise ValueError(f"{directory} has no config.json: not a Hugging Face checkpoint directory.")
    return json.loads(path.read_text())


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
