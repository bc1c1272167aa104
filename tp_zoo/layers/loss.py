"""Cross-entropy on vocab-split logits, without gathering them.

Each device holds logits for its slice of the vocab. The log-sum-exp is
built from two all-reduces (the max, then the sum of exponentials) and the
target logit from a third (only the device owning the label contributes),
so the full (batch, seq, vocab) logits never exist on one device.
"""

import contextlib
import contextvars

import jax.numpy as jnp
import keras
from keras.src.backend import set_keras_mask

from tp_zoo import parallel

M = parallel.MODEL
B = parallel.BATCH

# The label of a token the loss skips (transformers' value); what
# `tp_zoo.models.training_examples` writes outside trained spans.
IGNORED_LABEL = -100

# The LM head whose hidden states (not logits) a model hands to
# `VocabParallelCrossEntropy` while it traces a training or test step.
_head_in_loss = contextvars.ContextVar("tp_zoo_head_in_loss", default=None)


@contextlib.contextmanager
def head_in_loss(head):
    """In this scope the model's outputs are hidden states, and
    `VocabParallelCrossEntropy` applies `head` itself, in chunks of
    positions (`VocabParallelLMHead.cross_entropy`), so that no step holds
    every position's logits."""
    token = _head_in_loss.set(head)
    try:
        yield
    finally:
        _head_in_loss.reset(token)


def active_head_in_loss():
    """The head of the enclosing `head_in_loss` scope, or None."""
    return _head_in_loss.get()


def local_cross_entropy(logits, labels):
    """Per-token loss from this device's slice of the vocab's logits (inside a sharded region)."""
    logits = logits.astype("float32")
    rows = logits.shape[-1]
    local_labels = labels - parallel.model_index() * rows
    mine = (local_labels >= 0) & (local_labels < rows)
    peak = parallel.all_reduce_max(jnp.max(logits, axis=-1))
    sum_exp = parallel.all_reduce(jnp.sum(jnp.exp(logits - peak[..., None]), axis=-1))
    picked = jnp.take_along_axis(logits, jnp.where(mine, local_labels, 0)[..., None], axis=-1)[..., 0]
    target = parallel.all_reduce(jnp.where(mine, picked, 0.0))
    return jnp.log(sum_exp) + peak - target


def vocab_parallel_cross_entropy(labels, logits, ignore_class=None):
    """Per-token loss, shape of `labels`; `logits` may be split on the vocab dim."""
    mesh_info = parallel.active_mesh()
    labels = jnp.asarray(labels, "int32")
    vocab = logits.shape[-1]
    tp = 1 if mesh_info is None else mesh_info.tp
    if vocab % tp:
        # Pad to a multiple of tp with logits that add nothing to the sum.
        pad = [(0, 0)] * (logits.ndim - 1) + [(0, tp - vocab % tp)]
        logits = jnp.pad(logits, pad, constant_values=jnp.finfo(logits.dtype).min)
    layout = (B,) + (None,) * (labels.ndim - 1)
    loss = parallel.run_sharded(
        mesh_info, local_cross_entropy, (layout + (M,), layout), layout, logits, labels
    )
    return _skip_ignored(loss, labels, ignore_class)


def _skip_ignored(loss, labels, ignore_class):
    """Zero loss, and a Keras mask that drops them from the mean, where the label is `ignore_class`."""
    if ignore_class is None:
        return loss
    valid = labels != ignore_class
    loss = jnp.where(valid, loss, 0.0)
    set_keras_mask(loss, valid)
    return loss


@keras.saving.register_keras_serializable(package="tp_zoo")
class VocabParallelCrossEntropy(keras.losses.Loss):
    """Sparse categorical cross-entropy from logits split on the vocab dim.

    Args:
        ignore_class: label value whose tokens do not count (e.g. -100 or a
            padding id); they also drop out of the mean. A `sample_weight`
            (such as a padding mask) works as with any Keras loss.
        from_logits: must be True: the loss is defined on logits.
    """

    def __init__(
        self,
        ignore_class=None,
        from_logits=True,
        reduction="sum_over_batch_size",
        name="vocab_parallel_cross_entropy",
        dtype=None,
    ):
        if not from_logits:
            raise ValueError(
                "VocabParallelCrossEntropy works on logits; probabilities would "
                "need the full softmax gathered. Pass from_logits=True."
            )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.ignore_class = ignore_class

    def call(self, y_true, y_pred):
        head = active_head_in_loss()
        if head is None:
            return vocab_parallel_cross_entropy(y_true, y_pred, self.ignore_class)
        labels = jnp.asarray(y_true, "int32")
        return _skip_ignored(head.cross_entropy(y_pred, labels), labels, self.ignore_class)

    def get_config(self):
        return {**super().get_config(), "ignore_class": self.ignore_class, "from_logits": True}
