"""Multi-head attention with its heads split over the tensor-parallel devices.

Each device owns num_heads / tp query heads and the key/value heads those
query heads read: num_kv_heads / tp of them when tp divides num_kv_heads,
otherwise (tp a multiple of num_kv_heads, as in GQA/MQA at high tp) the key
and value kernels are kept whole on every device and each device uses the
one head its query heads share. The output projection is row-parallel, so
the whole layer costs one all-reduce. The KV cache is split the same way and
never gathered.
"""

import jax
import jax.numpy as jnp
import keras

from tp_zoo import parallel
from tp_zoo.layers.base import ShardedLayer
from tp_zoo.layers.base import valid_tp_values
from tp_zoo.layers.linear import HeadMergeDense
from tp_zoo.layers.linear import HeadSplitDense

M = parallel.MODEL
B = parallel.BATCH
_MASKED = -1e30


def _check_heads(name, num_heads, num_kv_heads, tp):
    def works(t):
        return num_heads % t == 0 and (num_kv_heads % t == 0 or t % num_kv_heads == 0)

    if num_heads % num_kv_heads:
        raise ValueError(
            f"{name}: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}."
        )
    if not works(tp):
        raise ValueError(
            f"{name}: {num_heads} query heads and {num_kv_heads} key/value heads "
            f"cannot be split over tp={tp}. tp values that would work: "
            f"{[t for t in valid_tp_values(num_heads) if works(t)]}."
        )


def _fused_attention_applies(q):
    """cuDNN flash attention: on NVIDIA GPUs, for 16-bit heads of up to 128."""
    return (
        FUSED_ATTENTION
        and jax.devices()[0].platform == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] <= 128
        and q.shape[-1] % 8 == 0
    )


# Set to False to compare with the plain XLA attention (as a benchmark does).
FUSED_ATTENTION = True


class ParallelAttention(ShardedLayer):
    """Causal self-attention, heads split over devices.

    Args:
        num_heads, num_kv_heads: query and key/value heads (MHA when equal,
            GQA when fewer kv heads, MQA with one).
        head_dim: size of each head.
        hidden_dim: model width (the output size).
        rotary: a `RotaryEmbedding`, or None when the model adds learned
            positions to its inputs instead.
        use_qkv_bias, use_output_bias: biases of the projections.
        sliding_window: if set, a query sees only the last `sliding_window`
            keys (Mistral).

    Call with `x` (batch, seq, hidden) and an optional `padding_mask`
    (batch, seq). For decoding pass `cache` (from `empty_cache`) and
    `cache_update_index`; the call then returns `(output, new_cache)`.
    """

    def __init__(
        self,
        num_heads,
        head_dim,
        hidden_dim,
        num_kv_heads=None,
        rotary=None,
        use_qkv_bias=True,
        use_output_bias=True,
        sliding_window=None,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        num_kv_heads = num_kv_heads or num_heads
        _check_heads(self.name, num_heads, num_kv_heads, self.tp)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.hidden_dim = hidden_dim
        self.rotary = rotary
        self.sliding_window = sliding_window
        self.kv_replicated = num_kv_heads % self.tp != 0
        # Key/value heads each device holds in its cache.
        self.local_kv_heads = 1 if self.kv_replicated else num_kv_heads // self.tp
        common = dict(kernel_initializer=kernel_initializer, dtype=self.dtype_policy)
        self.query = HeadSplitDense(num_heads, head_dim, use_bias=use_qkv_bias, name="query", **common)
        self.key = HeadSplitDense(
            num_kv_heads, head_dim, use_bias=use_qkv_bias, replicated=self.kv_replicated, name="key", **common
        )
        self.value = HeadSplitDense(
            num_kv_heads, head_dim, use_bias=use_qkv_bias, replicated=self.kv_replicated, name="value", **common
        )
        self.output_dense = HeadMergeDense(hidden_dim, use_bias=use_output_bias, name="output", **common)

    def build(self, input_shape):
        self.query.build(input_shape)
        self.key.build(input_shape)
        self.value.build(input_shape)
        self.output_dense.build(tuple(input_shape[:-1]) + (self.num_heads, self.head_dim))

    def _projections(self):
        return (self.query, self.key, self.value, self.output_dense)

    # --- KV cache -----------------------------------------------------------
    def cache_shape(self, batch_size, max_length):
        """Global shape of this layer's cache: (batch, 2, length, kv heads, head_dim)."""
        return (batch_size, 2, max_length, self.local_kv_heads * self.tp, self.head_dim)

    cache_layout = (B, None, None, M, None)

    def empty_cache(self, batch_size, max_length, dtype=None):
        shape = self.cache_shape(batch_size, max_length)
        dtype = dtype or self.compute_dtype
        if self.mesh_info is None:
            return jnp.zeros(shape, dtype)
        return jax.device_put(jnp.zeros(shape, dtype), parallel.sharding(self.mesh_info, self.cache_layout))

    # --- computation ----------------------------------------------------------
    def _local_kv(self, projection, weights, x):
        """Keys or values of this device's kv heads. With replicated kv
        kernels, first cut out the one head this device's queries use."""
        kernel, bias = projection.effective(weights)
        if self.kv_replicated:
            head = parallel.model_index() // (self.tp // self.num_kv_heads)
            kernel = jax.lax.dynamic_slice_in_dim(kernel, head, 1, axis=1)
            bias = None if bias is None else jax.lax.dynamic_slice_in_dim(bias, head, 1, axis=0)
        return projection.apply(kernel, bias, x)

    def _local_attention(self, weights, x, padding_mask, cache, start):
        wq, wk, wv, wo = weights
        q = self.query.local_apply(wq, x)
        k = self._local_kv(self.key, wk, x)
        v = self._local_kv(self.value, wv, x)
        seq = x.shape[1]
        q_pos = start + jnp.arange(seq)
        if self.rotary is not None:
            q = self.rotary(q, q_pos)
            k = self.rotary(k, q_pos)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[:, 0], k.astype(cache.dtype), start, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[:, 1], v.astype(cache.dtype), start, axis=1)
            cache = jnp.stack([k, v], axis=1)
        elif _fused_attention_applies(q):
            out = self._attend_fused(q, k, v, padding_mask)
            return self.output_dense.local_apply(wo, out)
        k_pos = jnp.arange(k.shape[1])
        mask = k_pos[None, :] <= q_pos[:, None]
        if self.sliding_window is not None:
            mask &= q_pos[:, None] - k_pos[None, :] < self.sliding_window
        mask = mask[None]
        if padding_mask is not None:
            mask = mask & padding_mask[:, None, :].astype(bool)
        out = self._attend(q, k, v, mask)
        out = self.output_dense.local_apply(wo, out)
        return out if cache is None else (out, cache)

    def _attend_fused(self, q, k, v, padding_mask):
        """cuDNN's fused (flash) attention on this device's heads: causal,
        right padding as sequence lengths, Mistral's window as a local window."""
        lengths = None
        if padding_mask is not None:
            lengths = jnp.sum(padding_mask.astype("int32"), axis=-1)
        window = None if self.sliding_window is None else (self.sliding_window - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            local_window_size=window, scale=1.0 / self.head_dim**0.5, implementation="cudnn",
        )

    def _attend(self, q, k, v, mask):
        b, s, h, d = q.shape
        kv = k.shape[2]
        q = q.reshape(b, s, kv, h // kv, d)
        scores = jnp.einsum("bskgd,btkd->bkgst", q, k).astype("float32")
        scores = scores * (1.0 / d**0.5)
        scores = jnp.where(mask[:, None, None], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
        return out.reshape(b, s, h, d)

    def call(self, x, padding_mask=None, cache=None, cache_update_index=None):
        weights, w_layouts = zip(*(p.weights_and_layouts() for p in self._projections()))
        x_layout = (B, None, None)
        args = [weights, x]
        layouts = [tuple(w_layouts), x_layout]
        if padding_mask is not None:
            args.append(padding_mask)
            layouts.append((B, None))
        if cache is not None:
            args += [cache, jnp.asarray(cache_update_index, "int32")]
            layouts += [self.cache_layout, ()]
        has_mask = padding_mask is not None

        def local(weights, x, *rest):
            mask = rest[0] if has_mask else None
            rest = rest[1:] if has_mask else rest
            cache, start = rest if rest else (None, 0)
            return self._local_attention(weights, x, mask, cache, start)

        out_layout = x_layout if cache is None else (x_layout, self.cache_layout)
        return self.run_sharded(local, tuple(layouts), out_layout, *args, key=("attention", has_mask))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.hidden_dim,)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "sliding_window": self.sliding_window,
            "use_qkv_bias": self.query.use_bias,
            "use_output_bias": self.output_dense.use_bias,
        }
