"""One transformer decoder block: attention and MLP, each with a residual."""

import jax
import keras

from tp_zoo.layers.attention import ParallelAttention
from tp_zoo.layers.base import ShardedLayer
from tp_zoo.layers.mlp import ParallelMLP
from tp_zoo.layers.replicated import LayerNorm
from tp_zoo.layers.replicated import RMSNorm


# Activation checkpointing (remat) of a block in training: what its forward
# keeps for the backward pass; the rest is computed again there.
REMAT_POLICIES = {
    "none": None,  # everything: fastest, most memory
    # the outputs of the matrix products (projections); norms, activations,
    # rotary and attention are recomputed
    "products": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # the block's input alone: the whole block runs twice, memory per block
    # is one hidden state per position
    "layers": jax.checkpoint_policies.nothing_saveable,
}


def check_remat(policy):
    if policy not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat policy {policy!r}; expected one of {', '.join(map(repr, REMAT_POLICIES))}.")
    return policy


def make_norm(kind, epsilon, name, dtype):
    if kind == "rms":
        return RMSNorm(epsilon=epsilon, name=name, dtype=dtype)
    if kind == "layer":
        return LayerNorm(epsilon=epsilon, name=name, dtype=dtype)
    raise ValueError(f"Unknown norm {kind!r}; expected 'layer' or 'rms'.")


@keras.saving.register_keras_serializable(package="tp_zoo")
class DecoderBlock(ShardedLayer):
    """x + attention(norm(x)), then h + mlp(norm(h)) (pre-norm, the default);
    with `pre_norm=False` the norms come after each residual sum instead
    (post-norm, as in OPT-350m).

    `attention` and `mlp` are the keyword arguments of `ParallelAttention`
    and `ParallelMLP`.
    """

    def __init__(self, attention, mlp, norm="layer", norm_epsilon=1e-5, pre_norm=True, **kwargs):
        super().__init__(**kwargs)
        self.pre_norm = pre_norm
        self.norm = norm
        self.norm_epsilon = norm_epsilon
        dtype = self.dtype_policy
        self.attention_norm = make_norm(norm, norm_epsilon, "attention_norm", dtype)
        self.attention = ParallelAttention(**attention, name="attention", dtype=dtype)
        self.mlp_norm = make_norm(norm, norm_epsilon, "mlp_norm", dtype)
        self.mlp = ParallelMLP(**mlp, name="mlp", dtype=dtype)

    def build(self, input_shape):
        for layer in (self.attention_norm, self.attention, self.mlp_norm, self.mlp):
            layer.build(input_shape)

    # See REMAT_POLICIES; set on a model by `DecoderCausalLM.remat`.
    remat = "none"

    def call(self, x, padding_mask=None, cache=None, positions=None, paged=None):
        """As `ParallelAttention.call`: with a cache, returns (output, new cache)."""
        policy = REMAT_POLICIES[self.remat]
        if policy is not None and cache is None and not isinstance(x, keras.KerasTensor):
            return jax.checkpoint(lambda x, mask: self._forward(x, mask), policy=policy)(x, padding_mask)
        return self._forward(x, padding_mask, cache, positions, paged)

    def _forward(self, x, padding_mask=None, cache=None, positions=None, paged=None):
        new_cache = None
        attention_in = self.attention_norm(x) if self.pre_norm else x
        if cache is None:
            h = self.attention(attention_in, padding_mask=padding_mask)
        else:
            h, new_cache = self.attention(attention_in, padding_mask=padding_mask, cache=cache, positions=positions,
                                          paged=paged)
        h = x + h
        if not self.pre_norm:
            h = self.attention_norm(h)
        out = h + self.mlp(self.mlp_norm(h) if self.pre_norm else h)
        if not self.pre_norm:
            out = self.mlp_norm(out)
        return out if cache is None else (out, new_cache)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        attention = self.attention.get_config()
        mlp = self.mlp.get_config()
        for nested in (attention, mlp):  # Keras' own keys are the block's
            for key in ("name", "trainable", "dtype"):
                nested.pop(key, None)
        return {
            **super().get_config(),
            "attention": attention,
            "mlp": mlp,
            "norm": self.norm,
            "norm_epsilon": self.norm_epsilon,
            "pre_norm": self.pre_norm,
        }
