"""Multi-head attention with its heads split over the tensor-parallel devices.

Each device owns num_heads / tp query heads and the key/value heads those
query heads read: num_kv_heads / tp of them when tp divides num_kv_heads,
otherwise (tp a multiple of num_kv_heads, as in GQA/MQA at high tp) the key
and value kernels are kept whole on every device and each device uses the
one head its query heads share. Queries, keys and values come from one
product per device (`QKVParallelDense`). The output projection is
row-parallel, so the whole layer costs one all-reduce. The KV cache is split
the same way and never gathered.

Head counts that tp does not divide are padded with inert heads (zero
query/key/value columns, zero output rows; see `padded_heads`), inside each
kv group, so the padded layer is an ordinary GQA layer of more heads and
each real query head still reads its own kv head.
"""

import warnings

import jax
import jax.numpy as jnp
import keras

from tp_zoo import parallel
from tp_zoo.layers import attention_ops as ops
from tp_zoo.layers.base import AxisPadding
from tp_zoo.layers.base import ShardedLayer
from tp_zoo.layers.fused_linear import QKVParallelDense
from tp_zoo.layers.linear import HeadMergeDense
from tp_zoo.layers.rotary import RotaryEmbedding

M = parallel.MODEL
B = parallel.BATCH


def padded_heads(num_heads, num_kv_heads, tp):
    """(kv heads, query heads per kv head) after padding for `tp`.

    The fewest query heads (then kv heads) K' * G', with K' >= the kv heads
    and G' >= the query heads per kv head, that tp can split: either tp
    divides K' (each device holds K' / tp kv heads), or K' divides tp and
    tp / K' divides G' (kv heads whole on every device, each device's
    queries inside one group). K' = tp rounded up always qualifies.
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}.")
    group = num_heads // num_kv_heads
    choices = (
        (kv * g, kv, g)
        for kv in range(num_kv_heads, num_kv_heads + tp)
        for g in range(group, group + tp)
        if kv % tp == 0 or (tp % kv == 0 and g % (tp // kv) == 0)
    )
    _, kv, g = min(choices)
    return kv, g


@keras.saving.register_keras_serializable(package="tp_zoo")
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
        if isinstance(rotary, dict):  # from get_config
            rotary = RotaryEmbedding(**rotary)
        num_kv_heads = num_kv_heads or num_heads
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.padded_kv_heads, padded_group = padded_heads(num_heads, num_kv_heads, self.tp)
        self.padded_heads = self.padded_kv_heads * padded_group
        # Real query head j of kv head k sits at k * padded_group + j.
        query_padding = AxisPadding(num_kv_heads, self.padded_kv_heads, num_heads // num_kv_heads, padded_group)
        if self.padded_heads != num_heads:
            warnings.warn(self._padding_note(), stacklevel=2)
        self.head_dim = head_dim
        self.hidden_dim = hidden_dim
        self.rotary = rotary
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.sliding_window = sliding_window
        self.kv_replicated = self.padded_kv_heads % self.tp != 0
        # Key/value heads each device holds in its cache.
        self.local_kv_heads = 1 if self.kv_replicated else self.padded_kv_heads // self.tp
        common = dict(kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy)
        self.qkv = QKVParallelDense(
            head_dim, query_padding, use_bias=use_qkv_bias, replicated=self.kv_replicated, name="qkv", **common
        )
        self.output_dense = HeadMergeDense(
            hidden_dim, use_bias=use_output_bias, padding=query_padding, name="output", **common
        )

    def _padding_note(self):
        added = self.padded_heads - self.num_heads
        kv = ""
        if self.padded_kv_heads != self.num_kv_heads:
            kv = f" and {self.num_kv_heads} key/value heads to {self.padded_kv_heads}"
        return (
            f"{self.num_heads} query heads padded to {self.padded_heads}{kv} for tp={self.tp}: "
            f"{added} inert head{'s' if added > 1 else ''} per layer, about {100 * added / self.num_heads:.0f}% more attention "
            f"compute and weights. tp values that need no padding: {self._unpadded_tp_values()}."
        )

    def _unpadded_tp_values(self):
        unpadded = (self.num_kv_heads, self.num_heads // self.num_kv_heads)
        return [t for t in range(1, self.num_heads + 1) if padded_heads(self.num_heads, self.num_kv_heads, t) == unpadded]

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.output_dense.build(tuple(input_shape[:-1]) + (self.padded_heads, self.head_dim))

    def _projections(self):
        return (self.qkv, self.output_dense)

    # --- KV cache -----------------------------------------------------------
    def cache_shape(self, batch_size, max_length):
        """Global shape of this layer's key cache and of its value cache:
        (batch, kv heads, length, head_dim), split on the kv heads."""
        return (batch_size, self.local_kv_heads * self.tp, max_length, self.head_dim)

    cache_layout = (B, M, None, None)

    def empty_cache(self, batch_size, max_length, dtype=None):
        """(keys, values) of zeros, each placed split over the devices."""
        shape = self.cache_shape(batch_size, max_length)
        dtype = dtype or self.compute_dtype
        zeros = jnp.zeros(shape, dtype)
        if self.mesh_info is not None:
            zeros = jax.device_put(zeros, parallel.sharding(self.mesh_info, self.cache_layout))
        return zeros, zeros

    def cache_bytes(self, batch_size, max_length, dtype=None):
        """Bytes of `empty_cache`'s keys and values on one device."""
        itemsize = jnp.dtype(dtype or self.compute_dtype).itemsize
        return 2 * batch_size * self.local_kv_heads * max_length * self.head_dim * itemsize

    # --- paged KV cache (a serving engine's) ----------------------------------------
    page_layout = (M, None, None, None)

    def empty_pages(self, num_pages, page_size, dtype=None):
        """(keys, values) pages of zeros, each (kv heads, num_pages, page_size,
        head_dim), split over the devices on the kv heads as the cache is."""
        shape = (self.local_kv_heads * self.tp, num_pages, page_size, self.head_dim)
        sharding = None if self.mesh_info is None else parallel.sharding(self.mesh_info, self.page_layout)
        # Two arrays, not one twice: the engine donates both to each step.
        return tuple(jnp.zeros(shape, dtype or self.compute_dtype, device=sharding) for _ in range(2))

    def page_bytes(self, page_size, dtype=None):
        """Bytes of one page of keys and values on one device."""
        return self.cache_bytes(1, page_size, dtype)

    # --- computation ----------------------------------------------------------
    def _local_qkv(self, weights, x, positions):
        """This device's queries, keys and values."""
        return self.qkv.split(self._local_qkv_product(weights, x, positions))

    def _local_qkv_product(self, weights, x, positions):
        """This device's keys, values and queries from one product, keys and
        queries rotated: (batch, seq, kv heads, 2 + group, head_dim)."""
        y = self.qkv.local_call(weights[0], x, own_heads=True)
        if self.rotary is not None:
            # Keys and queries rotated in one elementwise pass over the
            # product (values, slot 1, pass through): one kernel, not two.
            rotated = self.rotary(y.reshape(y.shape[:2] + (-1, self.head_dim)), positions).reshape(y.shape)
            y = jnp.where(jnp.arange(y.shape[-2])[:, None] == 1, y, rotated)
        return y

    def _local_attention(self, weights, x, padding_mask):
        """Causal attention over `x` alone (training, scoring)."""
        positions = jnp.arange(x.shape[1])
        q, k, v = self._local_qkv(weights, x, positions)
        if ops.fused_applies(q):
            lengths = None if padding_mask is None else jnp.sum(padding_mask.astype("int32"), axis=-1)
            out = ops.fused_attention(q, k, v, lengths, self.sliding_window)
        else:
            mask = ops.causal_mask(positions, positions, self.sliding_window)[None]
            if padding_mask is not None:
                mask = mask & padding_mask[:, None, :].astype(bool)
            out = ops.dense_attention(q, k, v, mask)
        return self.output_dense.local_call(weights[1], out)

    def _local_prefill(self, weights, x, lengths, cache):
        """Causal attention over prompts at positions 0..seq-1 (right padded to
        `lengths`), writing their keys and values into the cache. Memory
        stays linear in the prompt: flash attention on GPUs, blocks elsewhere."""
        q, k, v = self._local_qkv(weights, x, jnp.arange(x.shape[1]))
        to_cache = lambda c, new: jax.lax.dynamic_update_slice_in_dim(
            c, jnp.swapaxes(new, 1, 2).astype(c.dtype), 0, axis=2
        )
        cache = (to_cache(cache[0], k), to_cache(cache[1], v))
        if ops.fused_applies(q):
            out = ops.fused_attention(q, k, v, lengths, self.sliding_window)
        else:
            out = ops.blockwise_attention(q, k, v, self.sliding_window)
        return self.output_dense.local_call(weights[1], out), cache

    def _local_decode(self, weights, x, positions, cache):
        """One new token per row at its own position: write its key and value
        into the cache, then attend to the row's keys up to it."""
        qkv = self._local_qkv_product(weights, x, positions[:, None])[:, 0]
        out, k_cache, v_cache = ops.decode_step_fused(qkv, *cache, positions, self.sliding_window)
        return self.output_dense.local_call(weights[1], out[:, None]), (k_cache, v_cache)

    def _local_paged(self, weights, x, groups, pages):
        """`x` (1, tokens, hidden): the tokens of `groups` one after another.
        A group is (starts, valid, tables) of its rows: each row's tokens at
        positions starts, starts + 1, ... (those `valid`), their keys and
        values written into the row's pages, then attending to the row's
        keys up to each of them. One product per projection for all groups
        (decode steps beside prompts' chunks read the weights once)."""
        positions = [starts[:, None] + jnp.arange(valid.shape[1]) for starts, valid, _ in groups]
        qkv = self._local_qkv_product(weights, x, jnp.concatenate([p.reshape(-1) for p in positions])[None])[0]
        outs, offset = [], 0
        for (starts, valid, tables), group_positions in zip(groups, positions):
            rows, width = valid.shape
            part = qkv[offset: offset + rows * width].reshape(rows, width, *qkv.shape[1:])
            offset += rows * width
            out, k_pages, v_pages = ops.paged_attention(part, *pages, tables, group_positions, valid,
                                                        self.sliding_window)
            pages = (k_pages, v_pages)
            outs.append(out.reshape(rows * width, *out.shape[2:]))
        return self.output_dense.local_call(weights[1], jnp.concatenate(outs)[None]), pages

    def call(self, x, padding_mask=None, cache=None, positions=None, paged=None):
        """Without a cache: attention over `x`. With `cache` (keys, values),
        returns (output, new cache): with `positions` (batch,), `x` is one
        new token per row at those positions (a decode step); without, `x`
        holds prompts from position 0, right padded as `padding_mask` says
        (the prefill). With `paged`, `cache` is pages (`empty_pages`) and
        `x` (1, tokens, hidden) groups of rows' next tokens, each group's
        (starts (rows,), valid (rows, width), tables (rows, table width)) in
        `paged`: decode steps (a width of 1) and prompts' chunks."""
        weights = tuple(p.local_weights() for p in self._projections())
        x_layout = (B, None, None)
        if cache is None:
            has_mask = padding_mask is not None
            args, layouts = (x,), (x_layout,)
            if has_mask:
                args, layouts = args + (padding_mask,), layouts + ((B, None),)
            local = lambda w, x, mask=None: self._local_attention(w, x, mask)
            return self.run_with_weights(local, weights, layouts, x_layout, *args, key=("attention", has_mask))
        if paged is not None:
            # Rows of a group are not the batch dim (x has one row): whole on every device.
            group_layouts = tuple(((None,), (None, None), (None, None)) for _ in paged)
            page_layouts = (self.page_layout, self.page_layout)
            return self.run_with_weights(
                self._local_paged, weights, (x_layout, group_layouts, page_layouts), (x_layout, page_layouts),
                x, tuple(paged), tuple(cache),
            )
        cache_layouts = (self.cache_layout, self.cache_layout)
        out_layout = (x_layout, cache_layouts)
        if positions is None:
            lengths = jnp.sum(padding_mask.astype("int32"), axis=-1)
            return self.run_with_weights(
                self._local_prefill, weights, (x_layout, (B,), cache_layouts), out_layout, x, lengths, tuple(cache),
            )
        return self.run_with_weights(
            self._local_decode, weights, (x_layout, (B,), cache_layouts), out_layout,
            x, jnp.asarray(positions, "int32"), tuple(cache),
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.hidden_dim,)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "rotary": None if self.rotary is None else self.rotary.get_config(),
            "sliding_window": self.sliding_window,
            "use_qkv_bias": self.qkv.use_bias,
            "use_output_bias": self.output_dense.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
