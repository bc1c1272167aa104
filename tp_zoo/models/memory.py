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
import numpy as np

from tp_zoo.errors import DeviceMemoryError
from tp_zoo.layers.decoder_block import REMAT_POLICIES
from tp_zoo.layers.decoder_block import check_remat


def free_device_bytes(lm):
    """Free memory of the fullest device the model uses (None where the
    platform does not report it, as on CPU)."""
    mesh_info = lm.backbone.mesh_info
    devices = mesh_info.mesh.devices.flat if mesh_info is not None else jax.local_devices()[:1]
    free = []
    for device in devices:
        if device.process_index != jax.process_index():
            continue
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free) if free else None


class TrainingMemory(NamedTuple):
    """Bytes per device of one training step (the fullest device)."""

    weights: int  # every variable, frozen ones included
    gradients: int  # one per trainable variable, in its dtype
    optimizer: int  # AdamW's two float32 moments per trainable entry
    activations: int  # what the forward keeps for the backward, and the loss's chunks

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.activations

    def __str__(self):
        gib = lambda n: f"{n / 2**30:.1f} GiB"
        return (f"{gib(self.total)} per device (weights {gib(self.weights)}, gradients {gib(self.gradients)}, "
                f"optimizer {gib(self.optimizer)}, activations {gib(self.activations)})")


def _shard_bytes(variable):
    """Bytes of the largest shard of `variable` on one device."""
    value = variable.value
    shape = value.sharding.shard_shape(value.shape) if hasattr(value, "sharding") else value.shape
    return math.prod(shape) * np.dtype(variable.dtype).itemsize


def _activation_bytes(lm, tokens, remat):
    """Bytes the backward pass keeps of `tokens` positions on one device, the
    largest transient of the step added."""
    backbone = lm.backbone
    attention = backbone.transformer_layers[0].attention
    tp = attention.tp
    c = np.dtype(attention.compute_dtype).itemsize
    hidden = backbone.hidden_dim
    queries = attention.padded_heads * attention.head_dim // tp
    kv = attention.local_kv_heads * attention.head_dim
    intermediate = backbone.transformer_layers[0].mlp.padded_intermediate_dim // tp
    # Per position and block: a block keeps its input and norms' outputs,
    # the q/k/v product, the attention output and softmax statistics, and
    # the MLP's two wide intermediates (XLA fuses the rest into them).
    whole_block = c * (2 * hidden + queries + 2 * kv + 2 * intermediate) + 4 * attention.padded_heads // tp
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
    head = lm.lm_head
    local_vocab = head.padded_vocab_size // tp
    chunk = min(tokens, head.loss_chunk_tokens or max(256, 2**27 // local_vocab))
    loss = tokens * hidden * (4 + 2 * c) + 3 * 4 * chunk * local_vocab
    # A quantized kernel may be multiplied as a compute-dtype copy, made
    # again in the backward pass: the largest one's, twice.
    converted = 2 * max((l.scheme.product_copy_bytes(l.kernel.shape, c) for l in backbone.quantizable_layers()),
                        default=0) // tp
    return tokens * (backbone.num_layers * kept + recompute) + loss + converted


def training_memory(lm, batch_size, seq_len, remat=None):
    """A `TrainingMemory` of one step of `batch_size` rows of `seq_len`
    tokens (split over the model's data-parallel devices) under `remat`
    (default: the model's own), for a model compiled with tp_zoo's AdamW."""
    remat = check_remat(lm.remat if remat is None else remat)
    trainable = lm.trainable_variables
    weights = sum(_shard_bytes(v) for v in lm.weights)
    gradients = sum(_shard_bytes(v) for v in trainable)
    entries = sum(_shard_bytes(v) // np.dtype(v.dtype).itemsize for v in trainable)
    # The update of the largest variable is made in float32 beside it (the
    # weight, its gradient, the rounding's random bits).
    largest = max((_shard_bytes(v) // np.dtype(v.dtype).itemsize for v in trainable), default=0)
    optimizer = 2 * 4 * entries + 10 * largest
    tokens = -(-batch_size // lm.data_parallel_degree) * seq_len
    return TrainingMemory(weights, gradients, optimizer, _activation_bytes(lm, tokens, remat))


def remat_for(lm, batch_size, seq_len, remat="auto"):
    """The remat policy to train `batch_size` x `seq_len` tokens with:
    `remat="auto"` picks the one that recomputes least among those whose
    step fits in the free device memory (less a 10% margin for what the
    estimate does not see), a named policy is checked to fit.
    DeviceMemoryError, with the estimate, when nothing fits. Where the
    platform does not report its memory (CPUs), "auto" is "none"."""
    candidates = list(REMAT_POLICIES) if remat == "auto" else [check_remat(remat)]
    free = free_device_bytes(lm)
    if free is None:
        return candidates[0]
    for policy in candidates:
        estimate = training_memory(lm, batch_size, seq_len, policy)
        # The weights are on the devices already: `free` is what is left.
        if estimate.total - estimate.weights <= 0.9 * free:
            return policy
    raise DeviceMemoryError(
        f"Training {batch_size} x {seq_len} tokens needs about {estimate} with remat={policy!r}; "
        f"{free / 2**30:.1f} GiB is free beside the weights. Use a smaller batch or sequence, "
        f"{'LoRA, or a larger tp' if remat == 'auto' else 'remat=' + repr('auto') + ', LoRA, or a larger tp'}."
    )


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
