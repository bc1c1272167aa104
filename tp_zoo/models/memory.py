"""Device memory, known before a step runs: what is free, and what training
or generating takes on each device.

The training estimate counts the weights and the trainable state exactly
(each variable's shard on one device) and the activations a backward pass
keeps from per-token, per-layer sizes of the decoder's widths under each
remat policy, calibrated against peaks measured on an H200
(docs/performance-notes.md); it is an estimate, meant to refuse what
cannot fit and to choose a remat policy, not to budget to the last byte.
"""

import math
from typing import NamedTuple

import jax
import keras
import numpy as np

from tp_zoo.errors import DeviceMemoryError
from tp_zoo.layers.attention import padded_heads
from tp_zoo.layers.base import layout_of
from tp_zoo.layers.base import round_up
from tp_zoo.layers.decoder_block import REMAT_POLICIES
from tp_zoo.layers.embedding import loss_chunk
from tp_zoo.layers.decoder_block import check_remat
from tp_zoo.layers.quantize import scheme_for
from tp_zoo.parallel import FSDP


def free_device_bytes(devices):
    """Free memory of the fullest of `devices` this process holds (None where
    the platform does not report it, as on CPU)."""
    free = []
    for device in devices:
        if device.process_index != jax.process_index():
            continue
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free) if free else None


def model_devices(lm):
    """The devices of the model's mesh (the first local one without a mesh)."""
    mesh_info = lm.backbone.mesh_info
    return list(mesh_info.mesh.devices.flat) if mesh_info is not None else jax.local_devices()[:1]


class TrainingMemory(NamedTuple):
    """Bytes per device of one training step (the fullest device)."""

    weights: int  # every variable, frozen ones included
    gradients: int  # one per trainable variable, in its dtype
    optimizer: int  # AdamW's two float32 moments per trainable entry
    activations: int  # what the forward keeps for the backward, the loss's chunks, gathered weights

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.activations

    def __str__(self):
        gib = lambda n: f"{n / 2**30:.1f} GiB"
        return (f"{gib(self.total)} per device (weights {gib(self.weights)}, gradients {gib(self.gradients)}, "
                f"optimizer {gib(self.optimizer)}, activations {gib(self.activations)})")


class _Widths(NamedTuple):
    """What the activation estimate reads of a model on its mesh."""

    tp: int
    data: int  # data-parallel devices
    compute_bytes: int  # itemsize of the compute dtype
    hidden: int
    heads: int  # query heads, padded for tp (all devices)
    head_dim: int
    local_kv_heads: int
    intermediate: int  # padded for tp (all devices)
    layers: int
    vocab: int  # padded for tp (all devices)
    loss_chunk: int  # positions per chunk of the loss
    product_copy: int  # bytes of the largest quantized kernel's compute-dtype copy, per device
    gathered_block: int  # bytes of one block's weights gathered over fully sharded devices (0: not sharded)


def _model_widths(lm):
    backbone = lm.backbone
    block = backbone.transformer_layers[0]
    attention, tp = block.attention, block.attention.tp
    c = np.dtype(attention.compute_dtype).itemsize
    copy = max((l.scheme.product_copy_bytes(l.kernel.shape, c) for l in backbone.quantizable_layers()), default=0)
    mesh_info = backbone.mesh_info
    gathered = 0
    if mesh_info is not None and mesh_info.fully_sharded:
        gathered = sum(_shard_bytes(v) * (mesh_info.dp if FSDP in layout_of(v) else 1) for v in block.weights)
    return _Widths(tp, lm.data_parallel_degree, c, backbone.hidden_dim, attention.padded_heads, attention.head_dim,
                   attention.local_kv_heads, block.mlp.padded_intermediate_dim, backbone.num_layers,
                   lm.lm_head.padded_vocab_size,
                   loss_chunk(lm.lm_head.padded_vocab_size // tp, lm.lm_head.loss_chunk_tokens), copy // tp, gathered)


def _shard_bytes(variable):
    """Bytes of the largest shard of `variable` on one device."""
    value = variable.value
    shape = value.sharding.shard_shape(value.shape) if hasattr(value, "sharding") else value.shape
    return math.prod(shape) * np.dtype(variable.dtype).itemsize


def _activation_bytes(w, tokens, remat):
    """Bytes the backward pass keeps of `tokens` positions on one device, the
    largest transient of the step added."""
    c, hidden, tp = w.compute_bytes, w.hidden, w.tp
    queries, kv, intermediate = w.heads * w.head_dim // tp, w.local_kv_heads * w.head_dim, w.intermediate // tp
    # Per position and block: a block keeps its input and norms' outputs,
    # the q/k/v product, the attention output and softmax statistics, and
    # the MLP's two wide intermediates (XLA fuses the rest into them).
    whole_block = c * (2 * hidden + queries + 2 * kv + 2 * intermediate) + 4 * w.heads // tp
    kept = {
        "none": whole_block,
        # the products' outputs (the row-parallel ones summed in float32)
        "products": c * (hidden + queries + 2 * kv + 2 * intermediate) + 4 * 2 * hidden,
        "layers": c * hidden,
    }[remat]
    # Under remat, one block's forward again in the backward pass, with its
    # gradients beside it (measured: twice the block's own activations).
    recompute = 0 if remat == "none" else 2 * whole_block
    # The loss: hidden states in float32 and their gradient, and one chunk's
    # float32 logits (with their exponentials and gradient).
    local_vocab = w.vocab // tp
    chunk = min(tokens, w.loss_chunk)
    loss = tokens * hidden * (4 + 2 * c) + 3 * 4 * chunk * local_vocab
    # A quantized kernel may be multiplied as a compute-dtype copy, made
    # again in the backward pass (the largest one's, twice); fully sharded,
    # one block's gathered weights and their gradients before the reduce-scatter.
    return tokens * (w.layers * kept + recompute) + loss + 2 * w.product_copy + 2 * w.gathered_block


def _optimizer_bytes(entries, largest):
    """AdamW's float32 moments of `entries` trainable values; the update of
    the largest variable (`largest` entries) is made in float32 beside it
    (the weight, its gradient, the rounding's random bits)."""
    return 2 * 4 * entries + 10 * largest


def training_memory(lm, batch_size, seq_len, remat=None):
    """A `TrainingMemory` of one step of `batch_size` rows of `seq_len`
    tokens (split over the model's data-parallel devices) under `remat`
    (default: the model's own), for a model compiled with tp_zoo's AdamW:
    the weights and trainable state exactly, each variable's shard."""
    remat = check_remat(lm.remat if remat is None else remat)
    trainable = lm.trainable_variables
    weights = sum(_shard_bytes(v) for v in lm.weights)
    gradients = sum(_shard_bytes(v) for v in trainable)
    entries = [_shard_bytes(v) // np.dtype(v.dtype).itemsize for v in trainable]
    tokens = -(-batch_size // lm.data_parallel_degree) * seq_len
    return TrainingMemory(weights, gradients, _optimizer_bytes(sum(entries), max(entries, default=0)),
                          _activation_bytes(_model_widths(lm), tokens, remat))


def planned_training_memory(config, batch_size, seq_len, remat="none", tp=1, data=1, fully_sharded=False,
                            dtype="float32", quantize=None, lora_rank=None):
    """A `TrainingMemory` like `training_memory`'s, made from a `DecoderConfig`
    before any weight is loaded: the mesh (`tp`, `data` devices, variables
    split over them if `fully_sharded`), the variable `dtype`, the
    `quantize` mode of the frozen base, LoRA of `lora_rank` on the query and
    value projections (KerasHub's default targets) or full fine-tuning."""
    remat = check_remat(remat)
    c = np.dtype(keras.dtype_policies.get(dtype).compute_dtype).itemsize
    v = np.dtype(keras.dtype_policies.get(dtype).variable_dtype).itemsize
    scheme = scheme_for(quantize)
    kv, group = padded_heads(config.num_heads, config.num_kv_heads, tp)
    qkv_split = tp if kv % tp == 0 else 1  # kv heads fewer than tp: the q/k/v kernel whole on every device
    h, hd, inter = config.hidden_dim, config.head_dim, round_up(config.intermediate_dim, tp)
    vocab = round_up(config.vocab_size, tp)
    # Per device: (entries, outputs) of each block's kernels, then its other weights.
    norm = (2 if config.norm == "layer" else 1) * h  # a norm's scale (and bias)
    kernels = [(h * kv * (2 + group) * hd // qkv_split, kv * (2 + group) * hd // qkv_split),
               (kv * group * hd * h // tp, h), ((3 if config.gated_mlp else 2) * h * inter // tp, 2 * inter // tp)]
    others = 2 * norm + (kernels[0][1] if config.qkv_bias else 0) + (
        h if config.output_bias else 0) + ((2 if config.gated_mlp else 1) * inter // tp + h if config.mlp_bias else 0)
    block_bytes = sum(scheme.stored_bytes(n, out, v) for n, out in kernels) + v * others
    norm = (2 if config.norm == "layer" else 1) * h
    outside = vocab * config.embedding_dim // tp + (0 if config.tie_embeddings else vocab * h // tp) + norm + (
        (config.max_sequence_length + config.position_offset) * h if config.learned_positions else 0) + (
        2 * config.embedding_dim * h if config.embedding_dim != h else 0)
    split = data if fully_sharded else 1
    weights = (config.num_layers * block_bytes + v * outside) // split
    if lora_rank is None:
        entries = (config.num_layers * (sum(n for n, _ in kernels) + others) + outside) // split
        gate_up = (2 if config.gated_mlp else 1) * h * inter // tp
        largest = max(vocab * max(h, config.embedding_dim) // tp, gate_up, kernels[0][0], kernels[1][0]) // split
        gradients = v * entries
    else:  # A (hidden, rank) whole, B split with the outputs, for the query and the value
        entries = config.num_layers * lora_rank * (2 * h + (kv * group + kv) * hd // qkv_split) // split
        largest, gradients = lora_rank * max(h, kv * group * hd // qkv_split) // split, 4 * entries
        weights += gradients  # the adapters are weights too
    widths = _Widths(tp, data, c, h, kv * group, hd, kv // tp if kv % tp == 0 else 1, inter,
                     config.num_layers, vocab, loss_chunk(vocab // tp),
                     max((scheme.product_copy_bytes((n,), c) for n, _ in kernels), default=0),
                     block_bytes if fully_sharded else 0)
    tokens = -(-batch_size // data) * seq_len
    return TrainingMemory(weights, gradients, _optimizer_bytes(entries, largest),
                          _activation_bytes(widths, tokens, remat))


def fitting_remat(what, estimate, devices, remat="auto", weights_on_device=True):
    """The remat policy of the least recompute whose step fits the free
    memory of `devices` (less a 10% margin for what the estimate does not
    see): `estimate(policy)`
    gives its `TrainingMemory` (`what`: the step, for the error); a named
    `remat` is checked to fit. With
    `weights_on_device`, the free memory is what is left beside them.
    Where the platform does not report it (CPUs), "auto" is "none".
    DeviceMemoryError, with the estimate, when nothing fits."""
    candidates = list(REMAT_POLICIES) if remat == "auto" else [check_remat(remat)]
    free = free_device_bytes(devices)
    if free is None:
        return candidates[0]
    for policy in candidates:
        needed = estimate(policy)
        if needed.total - (needed.weights if weights_on_device else 0) <= 0.9 * free:
            return policy
    beside = " beside the weights" if weights_on_device else ""
    raise DeviceMemoryError(
        f"{what} needs about {needed} with remat={policy!r}; {free / 2**30:.1f} GiB is free{beside}. "
        f"Use a smaller batch or sequence, "
        f"{'LoRA, a larger tp or fsdp' if remat == 'auto' else 'remat=' + repr('auto') + ', LoRA, a larger tp or fsdp'}."
    )


def remat_for(lm, batch_size, seq_len, remat="auto"):
    """`fitting_remat` for a loaded model, training `batch_size` x `seq_len` tokens."""
    return fitting_remat(f"Training {batch_size} x {seq_len} tokens",
                         lambda policy: training_memory(lm, batch_size, seq_len, policy),
                         model_devices(lm), remat)


def generation_bytes(lm, batch_size, prompt_width, cache_length):
    """Estimated bytes per device of a generate() call beyond the weights:
    the KV cache, the prefill's largest live activations, and the float32
    logits of each row's last token."""
    backbone = lm.backbone
    return (backbone.cache_bytes(batch_size, cache_length) + backbone.prefill_bytes(batch_size, prompt_width)
            + 4 * batch_size * backbone.vocab_size)


def generation_memory_error(batch_size, prompt_width, cache_length, needed, free):
    have = "unknown" if free is None else f"{free / 2**30:.2f} GiB"
    return DeviceMemoryError(
        f"Generating {batch_size} rows (prompts padded to {prompt_width} tokens, cache of {cache_length} "
        f"positions) needs about {needed / 2**30:.2f} GiB per device beyond the weights; "
        f"{have} is free. Use fewer rows, shorter prompts or max_length, or a larger tp."
    )
