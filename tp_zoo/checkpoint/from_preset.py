"""`tp_zoo.from_preset`: a Hugging Face checkpoint as a sharded KerasHub CausalLM."""

import contextlib
import json
from pathlib import Path

import keras
import keras_hub

from tp_zoo import parallel
from tp_zoo.checkpoint.layout import Layout
from tp_zoo.checkpoint.loader import StreamingLoader
from tp_zoo.checkpoint.peft import load_peft_adapter
from tp_zoo.checkpoint.peft import read_adapter_config
from tp_zoo.checkpoint.source import checkpoint_directory
from tp_zoo.checkpoint.source import open_tensors
from tp_zoo.checkpoint.source import read_config
from tp_zoo.errors import UnsupportedConfigError
from tp_zoo.errors import WrongFamilyError
from tp_zoo.layers import weights_from
from tp_zoo.layers.quantize import check_mode
from tp_zoo.models import DecoderCausalLM
from tp_zoo.models import families
from tp_zoo.models import family_of
from tp_zoo.models.tokenizer import CheckpointTokenizer


def checkpoint_dtype(config):
    """The dtype a model loads in by default: the checkpoint's own (float32 if it names another)."""
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def _refuse_quantized(config, directory):
    """A checkpoint quantized by another tool (GPTQ, AWQ, bitsandbytes, fp8...)
    stores packed weights tp_zoo does not read; say so before reading any."""
    method = config.get("quantization_config")
    if method:
        name = method.get("quant_method", "an unnamed method") if isinstance(method, dict) else method
        raise UnsupportedConfigError(
            f"{directory.name} is already quantized ({name!r}, config.json's quantization_config): tp_zoo reads "
            "float checkpoints (float32, float16, bfloat16) and makes int8 itself: load the float checkpoint "
            "with quantize='int8'."
        )


def from_preset(preset, tp=1, dp=1, dtype=None, devices=None, allow_pickle=False, progress=True, quantize=None,
                adapter=None, fsdp=1):
    """Loads a checkpoint straight into per-device shards.

    Args:
        preset: a name from `tp_zoo.list_presets()`, a local directory with a
            Hugging Face checkpoint (config.json + safetensors) or a KerasHub
            preset (`lm.save_to_preset(dir)`), or "hf://org/name". Downloads go through `huggingface_hub` (its cache,
            HF_HUB_OFFLINE and tokens apply) and fetch only the files needed.
        tp, dp, fsdp, devices: the mesh, as for `tp_zoo.distribution`:
            `fsdp=N` in place of `dp=N` also splits every variable (and
            its optimizer moments) over those N devices, for fine-tuning
            what one device's share of tp cannot hold.
        dtype: variable and compute dtype (or a Keras dtype policy name such as
            "mixed_bfloat16"); defaults to the checkpoint's own dtype.
        allow_pickle: accept checkpoints that only have pickled PyTorch files.
            Unpickling can run arbitrary code: only for checkpoints you trust.
        progress: show a progress bar of the bytes loaded.
        quantize: "int8" to quantize the attention and MLP kernels while
            streaming (as `lm.quantize("int8")` would, without ever holding
            a float copy of the model): each device gets int8 blocks.
        adapter: a directory holding a PEFT LoRA adapter (adapter_config.json,
            adapter_model.safetensors), loaded onto the model once it is built
            (`tp_zoo.checkpoint.peft.load_peft_adapter`: LoRA enabled with the
            adapter's rank and targets). Its config is checked first, before
            the model is read.

    Returns:
        A `keras_hub.models.CausalLM` of the checkpoint's family, every variable
        already sharded over the (dp, tp) mesh; its `distribution` attribute is
        the `keras.distribution.ModelParallel` it was built under (None for a
        single device), and its fit/predict/generate run under it.
    """
    if adapter is not None:
        read_adapter_config(adapter)
    causal_lm = load_for_class(preset, None, tp, dp, dtype, devices, allow_pickle, progress, quantize, fsdp)
    if adapter is not None:
        load_peft_adapter(causal_lm, adapter)
    return causal_lm


def load_for_class(preset, expected_class, tp=1, dp=1, dtype=None, devices=None, allow_pickle=False, progress=True,
                   quantize=None, fsdp=1):
    """from_preset, refusing a checkpoint whose family's classes are not
    (subclasses of) `expected_class` (a CausalLM or Backbone class, or None):
    the classes' own from_preset (`tp_zoo.models.family.load_preset`)."""
    if quantize is not None:
        check_mode(quantize, "from_preset")
    distribution = parallel.distribution(tp=tp, dp=dp, devices=devices, fsdp=fsdp)
    if tp * dp * fsdp == 1 and devices is None:
        distribution = None  # one device: a plain single-device model
    if is_keras_hub_preset(preset):
        if quantize is not None:
            raise ValueError("quantize= applies to Hugging Face checkpoints; call lm.quantize() on a loaded preset.")
        return _load_keras_hub_preset(preset, expected_class, distribution, dtype)
    directory = checkpoint_directory(preset, allow_pickle=allow_pickle)
    config = read_config(directory)
    _refuse_quantized(config, directory)
    family = family_of(config)
    _check_fsdp_splits(family, config, fsdp)
    cls = family.causal_lm
    if expected_class is not None and not issubclass(cls, expected_class) and not issubclass(
        cls.backbone_cls, expected_class
    ):
        raise WrongFamilyError(
            f"{preset} is a {family.name} checkpoint (model_type={config.get('model_type')!r}); "
            f"{expected_class.__name__} loads {_family_named(expected_class)} checkpoints. Use "
            f"{cls.__name__}.from_preset or tp_zoo.from_preset."
        )
    tensors = open_tensors(directory, allow_pickle=allow_pickle)
    try:
        layout = Layout(family.layout)
        dtype = dtype or checkpoint_dtype(config)
        loader = StreamingLoader(tensors, layout, progress=progress, description=f"loading {directory.name} (tp={tp})",
                                 float_dtype=keras.dtype_policies.get(dtype).variable_dtype)
        scope = distribution.scope() if distribution is not None else contextlib.nullcontext()
        with loader, scope, weights_from(loader):
            backbone = cls.backbone_cls.from_hf_config(config, dtype=dtype, quantized=quantize)
            tokenizer = CheckpointTokenizer.from_directory(directory, config, family.adds_bos)
            causal_lm = cls(backbone=backbone, tokenizer=tokenizer, hf_config=config)
        loader.warn_unused()
    finally:
        tensors.close()
    causal_lm.distribution = distribution
    causal_lm.checkpoint_directory = directory
    causal_lm.load_stats = {"bytes_read": loader.bytes_read,
                            "checkpoint_bytes": sum(tensors.nbytes(n) for n in tensors.names())}
    return causal_lm


def _check_fsdp_splits(family, config, fsdp):
    """Refuses, before loading, an fsdp degree that cannot split the model:
    its weights are split along the hidden size, which fsdp must divide."""
    hidden = family.causal_lm.backbone_cls.decoder_config(config).hidden_dim
    if fsdp > 1 and hidden % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the hidden size {hidden}, along which fully sharded "
                         f"weights are split: use an fsdp that divides {hidden}.")


def is_keras_hub_preset(preset):
    """A directory written by KerasHub's `save_to_preset`, not a Hugging Face checkpoint."""
    return (Path(preset) / "metadata.json").is_file() and (Path(preset) / "task.json").is_file()


def _load_keras_hub_preset(preset, expected_class, distribution, dtype):
    """A directory written by `save_to_preset`: KerasHub's own loader, run
    under the requested distribution (the layers shard as they are made)."""
    task = json.loads((Path(preset) / "task.json").read_text())
    cls = keras.saving.get_registered_object(task.get("registered_name"))
    if cls is None or not issubclass(cls, DecoderCausalLM):
        raise WrongFamilyError(f"{preset} holds a {task.get('class_name')}, not a tp_zoo model.")
    if expected_class is not None and not issubclass(cls, expected_class) and not issubclass(
        cls.backbone_cls, expected_class
    ):
        raise WrongFamilyError(
            f"{preset} holds a {cls.__name__}; {expected_class.__name__} loads "
            f"{_family_named(expected_class)} checkpoints. Use {cls.__name__}.from_preset or tp_zoo.from_preset."
        )
    scope = distribution.scope() if distribution is not None else contextlib.nullcontext()
    with scope:
        causal_lm = keras_hub.models.CausalLM.from_preset(str(preset), **({"dtype": dtype} if dtype else {}))
    causal_lm.distribution = distribution
    return causal_lm


def _family_named(expected_class):
    for family in families():
        if issubclass(family.causal_lm, expected_class) or issubclass(family.causal_lm.backbone_cls, expected_class):
            return family.name
    return "no"

