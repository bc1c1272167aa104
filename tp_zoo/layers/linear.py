"""Megatron's column- and row-parallel linear layers.

Column-parallel: the kernel is split on its output dim (and so is the bias);
each device computes its slice of the output with no communication.
Row-parallel: the kernel is split on its input dim; each device multiplies
its slice of the input, the partial products are all-reduced, and the
replicated bias is added once, after the all-reduce.

The per-head variant (HeadMergeDense) is the row rule on an EinsumDense-style
kernel of shape (heads, head_dim, hidden), split on the heads axis, as
attention's output needs it.

A layer's split dim may be padded up to a multiple of tp (`padding`, an
`AxisPadding`, given by the attention or MLP that owns the layer): the
padded kernel columns (and bias entries) or rows are zero, and a
row-parallel layer also zeroes its padded inputs, so the padding adds
nothing and its slices get zero gradients.
"""

import jax
import jax.numpy as jnp
import keras

from tp_zoo import parallel
from tp_zoo.layers import quantize as q8
from tp_zoo.layers.base import AxisPadding
from tp_zoo.layers.base import Fused
from tp_zoo.layers.base import Part
from tp_zoo.layers.base import ShardedLayer
from tp_zoo.layers.base import check_divisible
from tp_zoo.layers.base import real_mask
from tp_zoo.layers.base import round_up
from tp_zoo.layers.precision import product_precision

M = parallel.MODEL
B = parallel.BATCH

# Why a layer cannot pad its split dim alone: the layer on the other side of
# the split activation must pad the same way (the owning block's choice).
_PAD_UPSTREAM = (
    " (its input arrives split by the layer before it, so any padding is that layer's to add, "
    "as ParallelAttention and ParallelMLP do)"
)
_PAD_WITH_CONSUMER = (
    " (its output stays split for the layer after it, so padding is chosen for both, "
    "as ParallelAttention and ParallelMLP do; a gathered output pads itself)"
)


def _activation_layout(rank, trailing):
    """(BATCH, None, ..., *trailing) for an activation of `rank` dims."""
    return (B,) + (None,) * (rank - 1 - len(trailing)) + tuple(trailing)


class _ParallelLinear(ShardedLayer):
    """x -> einsum(x, kernel) (+ bias), with one of Megatron's split rules.

    Subclasses set the equation, the kernel and bias shapes and layouts, the
    layouts of the input's and output's trailing dims, and whether the
    partial products are summed over devices (row-parallel).
    """

    equation = None
    reduces = False
    split_axis = None  # the kernel dim split over the devices (and padded, if any)

    def __init__(
        self,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        quantized=None,
        padding=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # None, or the `AxisPadding` of the split dim (a list from get_config).
        self.padding = None if padding is None else AxisPadding(*padding)
        if quantized is not None:
            q8.check_mode(quantized, self.name)
        # None, or the quantization mode ("int8"): the kernel is then int8
        # values, output-major, with a float32 per-output-channel
        # `kernel_scale` (see quantize()).
        self.quantized = quantized
        q8.use_own_quantize(self)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    # Subclasses: shapes and layouts.
    def kernel_shape(self, in_dim):
        raise NotImplementedError

    kernel_layout = bias_layout = in_trailing = out_trailing = ()
    bias_shape = ()

    def build(self, input_shape):
        in_dim = input_shape[-1] if len(self.in_trailing) == 1 else input_shape[-2:]
        shape = self.kernel_shape_built = tuple(self.kernel_shape(in_dim))
        if self.padding is not None and shape[self.split_axis] != self.padding.size:
            raise ValueError(
                f"{self.name}: the split dim of kernel shape {shape} should be {self.padding.size} (its padding)."
            )
        if self.quantized:
            # Made quantized (a saved quantized model, or from_preset(quantize=)):
            # the values come from the file.
            self.kernel_scale, self.kernel = self._add_int8_weights("ones", "zeros")
        else:
            self.kernel = self.add_sharded_weight(
                "kernel", shape, self.kernel_layout, self.kernel_initializer, padding=self._padding(len(shape)),
                parts=self.parts_of(shape, kernel=True),
            )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_sharded_weight(
                "bias", self.bias_shape, self.bias_layout, self.bias_initializer,
                padding=self._padding(len(shape))[len(self.in_trailing) :], parts=self.parts_of(shape),
            )

    def _padding(self, rank):
        """Per kernel dim: the split dim's `AxisPadding`, None elsewhere."""
        return tuple(self.padding if d == self.split_axis else None for d in range(rank))

    def parts_of(self, kernel_shape, kernel=False):
        """The `Fused` parts of the kernel (`kernel=True`) or of a variable of
        the output dims (bias, int8 scale); None: a layer of one projection."""
        return None

    # --- weight-only int8 -----------------------------------------------------
    @property
    def scale_layout(self):
        """The scale's layout: that of the kernel's output dims."""
        return tuple(self.kernel_layout[len(self.in_trailing) :])

    @property
    def values_layout(self):
        """The int8 values' layout: the kernel's, output-major."""
        return q8.output_major(self.kernel_layout, len(self.in_trailing))

    def _add_int8_weights(self, scale, values):
        """(kernel_scale, kernel) of the int8 kernel, from initializers or
        global arrays (see `quantize.add_int8_weights`)."""
        shape = self.kernel_shape_built
        return q8.add_int8_weights(
            self, shape, self.kernel_layout, self._padding(len(shape)), len(self.in_trailing), scale, values,
            kernel_parts=self.parts_of(shape, kernel=True), scale_parts=self.parts_of(shape),
        )

    def quantize(self, mode=None, type_check=True, config=None):
        """Replaces the float kernel by int8 values, stored output-major
        (shape (*out_dims, *in_dims), split as the kernel's dims were), and a
        float32 per-output-channel `kernel_scale` (max |w| over the whole
        reduction dims / 127, the same at every tp). Checks everything before
        changing anything."""
        q8.check_mode(mode, self.name)
        if config is not None:
            raise ValueError(f"{self.name}: a quantization config is not supported; call quantize({mode!r}).")
        if not self.built:
            raise ValueError(f"{self.name}: cannot quantize a layer that isn't built yet.")
        if self.quantized:
            raise ValueError(f"{self.name}: the layer is already quantized ({self.quantized}).")
        if self.lora_enabled:
            raise ValueError(f"{self.name}: cannot quantize a layer with LoRA enabled; merge or quantize first.")
        values, scale = q8.quantize_int8(self.kernel.value, len(self.in_trailing))
        q8.install(self, *self._add_int8_weights(scale, values), mode)

    # --- LoRA ---------------------------------------------------------------
    lora_enabled = False
    lora_parts = ()  # the parts of a fused kernel that have adapters
    _lora_layouts = {}  # adapter variable name -> its layout, in the order made

    def enable_lora(self, rank, lora_alpha=None, a_initializer="he_uniform", b_initializer="zeros", parts=None):
        """Freezes the kernel (and bias) and adds a trainable low-rank update
        kernel + (lora_alpha / rank) * A @ B, as Keras' Dense does.

        The adapters are float32 whatever the layer's dtype (as PEFT makes
        them): a bfloat16 adapter could not hold the small steps training
        takes. The layer computes x @ kernel + scale * (x @ A) @ B, the
        adapters cast to the compute dtype, so an update far below the
        kernel's rounding step still changes the output.

        A takes the kernel's input dims and B its output dims, so the split
        follows the kernel: a column-parallel kernel's B is split with its
        outputs (A whole on every device), a row-parallel kernel's A with
        its inputs (B whole); each device's A @ B is its own kernel block.
        A fused kernel has one (A, B) per part named in `parts` (all parts
        by default), of the shapes a separate layer's adapters would have.
        """
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"{self.name}: LoRA rank must be a positive integer, got {rank!r}.")
        if not self.built:
            raise ValueError(f"{self.name}: cannot enable LoRA on a layer that isn't built yet.")
        if self.lora_enabled:
            raise ValueError(f"{self.name}: LoRA is already enabled.")
        fused = self.parts_of(self.kernel_shape_built)
        if fused is None and parts is not None:
            raise ValueError(f"{self.name}: LoRA parts are for fused kernels; this layer has one projection.")
        if fused is not None:
            names = [p.layer for p in fused.parts]
            parts = names if parts is None else list(parts)
            unknown = [p for p in parts if p not in names]
            if unknown or not parts:
                raise ValueError(f"{self.name}: LoRA parts {parts} must be some of {names}.")
            self.lora_parts = tuple(p for p in fused.parts if p.layer in parts)
        n_in = len(self.in_trailing)
        shape, layout = self.kernel_shape_built, self.kernel_layout
        padding = self._padding(len(shape))
        self._tracker.unlock()
        self._lora_layouts = {}
        for part in self.lora_parts or (None,):
            prefix = "" if part is None else f"{part.layer}_"
            if part is None:
                out_shape, out_padding, out_layout = shape[n_in:], padding[n_in:], layout[n_in:]
            else:
                out_shape, out_padding, out_layout = part.shape, part.padding, part.layout
            adapters = (
                ("lora_kernel_a", shape[:n_in] + (rank,), layout[:n_in] + (None,), a_initializer,
                 padding[:n_in] + (None,)),
                ("lora_kernel_b", (rank,) + tuple(out_shape), (None,) + tuple(out_layout), b_initializer,
                 (None,) + tuple(out_padding)),
            )
            for name, adapter_shape, adapter_layout, initializer, adapter_padding in adapters:
                setattr(self, prefix + name, self.add_sharded_weight(
                    prefix + name, adapter_shape, adapter_layout, initializer, dtype="float32", padding=adapter_padding
                ))
                self._lora_layouts[prefix + name] = adapter_layout
        self._tracker.lock()
        self.kernel.trainable = False
        if self.use_bias:
            self.bias.trainable = False
        self.lora_rank = rank
        self.lora_alpha = rank if lora_alpha is None else lora_alpha
        self.lora_enabled = True

    def lora_variables(self):
        """(name, variable) of the LoRA adapters: A and B, per part of a fused kernel."""
        return [(name, getattr(self, name)) for name in self._lora_layouts]

    def merge_lora(self):
        """Folds the LoRA update into the kernel and zeroes B (adapters stay, now inert)."""
        weights, layouts = self.weights_and_layouts()
        merged = self.run_sharded(self._merged_float, (layouts,), self.kernel_layout, weights, key="merge_lora")
        if self.quantized:  # the merged kernel is quantized again (new scales)
            values, scale = q8.quantize_int8(merged, len(self.in_trailing))
            self.kernel.assign(values)
            self.kernel_scale.assign(scale)
        else:
            self.kernel.assign(merged.astype(self.kernel.dtype))
        for name, variable in self.lora_variables():
            if name.endswith("_b"):
                variable.assign(jnp.zeros_like(variable.value))

    # --- computation --------------------------------------------------------
    def weights_and_layouts(self):
        """The variables' current values and layouts, for enclosing layers."""
        values = [self.kernel.value]
        layouts = [self.values_layout if self.quantized else self.kernel_layout]
        if self.use_bias:
            values.append(self.bias.value)
            layouts.append(self.bias_layout)
        if self.quantized:
            values.append(self.kernel_scale.value)
            layouts.append(self.scale_layout)
        for name, variable in self.lora_variables():
            values.append(variable.value)
            layouts.append(self._lora_layouts[name])
        return tuple(values), tuple(layouts)

    def _lora_pairs(self, weights):
        """The local (A, B) of each adapted part, from `weights_and_layouts`' values."""
        pairs = weights[len(weights) - len(self._lora_layouts) :]
        return tuple(zip(pairs[::2], pairs[1::2]))

    def _by_part(self, terms, lead, out_shape):
        """One term per adapted part (each `lead` + its part's local output
        shape) as one float32 array of `lead` + `out_shape`: a single
        projection's term as it is; a fused kernel's terms each in its
        part's block along the fused axis, zeros where a part has none."""
        if not self.lora_parts:
            return terms[0]
        fused = self.parts_of(self.kernel_shape_built)
        by_part = dict(zip((p.layer for p in self.lora_parts), terms))
        blocks = []
        for part in fused.parts:
            block = tuple(lead) + tuple(out_shape[: fused.axis]) + (part.size,) + tuple(out_shape[fused.axis + 1 :])
            term = by_part.get(part.layer)
            blocks.append(jnp.zeros(block, jnp.float32) if term is None else term.reshape(block))
        return jnp.concatenate(blocks, axis=len(lead) + fused.axis)

    def _merged_float(self, weights):
        """The local kernel in float32, in the kernel's order (a quantized
        one dequantized), LoRA update (lora_alpha / rank) A @ B added."""
        n_in = len(self.in_trailing)
        if self.quantized:
            kernel = q8.to_kernel_order(q8.dequantize(weights[0], weights[2 if self.use_bias else 1]), n_in)
        else:
            kernel = weights[0].astype(jnp.float32)
        scale = self.lora_alpha / self.lora_rank
        updates = [
            scale * jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST) for a, b in self._lora_pairs(weights)
        ]
        return kernel + self._by_part(updates, kernel.shape[:n_in], kernel.shape[n_in:])

    def effective(self, weights, merge_lora=False):
        """(kernel, bias or None, LoRA pairs) from local weights, for `apply`.
        A quantized kernel is a `QuantizedKernel` (int8 values, scale); the
        pairs are each adapted part's local (A, B), () without LoRA.
        `merge_lora=True` folds the adapters into the kernel instead
        (dequantized, in the compute dtype), for callers that cut the kernel
        up (a replicated q/k/v kernel's `take_group`)."""
        kernel = weights[0]
        bias = weights[1] if self.use_bias else None
        if self.lora_enabled and merge_lora:
            return self._merged_float(weights).astype(self.compute_dtype), bias, ()
        if self.quantized:
            kernel = q8.QuantizedKernel(kernel, weights[2 if self.use_bias else 1])
        return kernel, bias, self._lora_pairs(weights) if self.lora_enabled else ()

    def _lora_term(self, lora, x, out_shape):
        """scale * (x @ A) @ B summed into the layer's local output of
        `out_shape` (trailing dims), in float32: both products in x's dtype
        (the adapters cast to it), accumulated in float32. On a row-parallel
        layer it is this device's partial sum, reduced with the kernel's."""
        n_in = len(self.in_trailing)
        scale = self.lora_alpha / self.lora_rank
        terms = []
        for a, b in lora:
            h = jnp.tensordot(x, a.astype(x.dtype), axes=n_in, precision=product_precision(x),
                              preferred_element_type=jnp.float32).astype(x.dtype)
            terms.append(scale * jnp.tensordot(h, b.astype(x.dtype), axes=1, precision=product_precision(x),
                                               preferred_element_type=jnp.float32))
        return self._by_part(terms, x.shape[: x.ndim - n_in], out_shape)

    def apply(self, kernel, bias, x, lora=()):
        """The layer's math on local shards (inside a sharded region), with
        `effective`'s kernel, bias and LoRA pairs."""
        quantized = isinstance(kernel, q8.QuantizedKernel)
        if not quantized and not lora and bias is None and not (self.reduces and self.tp > 1):
            y = jnp.einsum(self.equation, x, kernel, precision=product_precision(x, kernel))
            return self.activation(y) if self.activation is not None else y
        # Summed over devices and biased in float32, then rounded once (as
        # torch's addmm): rounding the product before its bias, or each
        # device's partial sum, costs visible bf16 accuracy. Only here: a
        # float32 product is much slower for batch-1 decode on GPUs.
        n_in = len(self.in_trailing)
        if quantized:
            # int8 values (exact in bf16) times x, accumulated in float32; the
            # per-output-channel scale is the same on every device, so it
            # comes after the sum, unless LoRA's partial sums join it.
            y = q8.int8_product(x, kernel.values, n_in)
            scale = kernel.scale.astype(jnp.float32)
            if lora:
                y = y * scale
        else:
            y = jnp.einsum(self.equation, x, kernel, precision=product_precision(x, kernel),
                           preferred_element_type=jnp.float32)
        if lora:
            y = y + self._lora_term(lora, x, y.shape[y.ndim - len(self.out_trailing) :])
        if self.reduces:
            y = parallel.all_reduce(y)
        if quantized and not lora:
            y = y * scale
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        y = y.astype(x.dtype)
        return self.activation(y) if self.activation is not None else y

    def local_apply(self, weights, x):
        """What one device computes on its shards (inside a sharded region)."""
        if self.reduces and self.padding is not None and self.padding.is_padded:
            x = x * self._local_input_mask(x)
        kernel, bias, lora = self.effective(weights)
        return self.apply(kernel, bias, x, lora)

    def _local_input_mask(self, x):
        """0/1 over this device's slice of the (padded) split input dims:
        zero at the padding, so that the padded rows of the kernel (and of
        LoRA's A) get no gradient from whatever the padding carried."""
        mask = real_mask(self._padding(len(self.in_trailing)))
        local = x.shape[x.ndim - len(self.in_trailing)]
        mask = jax.lax.dynamic_slice_in_dim(mask, parallel.model_index() * local, local, axis=0)
        return mask.astype(x.dtype)

    def call(self, x):
        weights, layouts = self.weights_and_layouts()
        return self.run_sharded(
            self.local_apply,
            (layouts, _activation_layout(x.ndim, self.in_trailing)),
            _activation_layout(x.ndim - len(self.in_trailing) + len(self.out_trailing), self.out_trailing),
            weights,
            x,
        )

    def compute_output_shape(self, input_shape):
        lead = tuple(input_shape[: len(input_shape) - len(self.in_trailing)])
        return lead + tuple(self.output_trailing_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            activation=keras.activations.serialize(self.activation),
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        if self.quantized:
            config["quantized"] = self.quantized
        if self.padding is not None:
            config["padding"] = list(self.padding)
        return config


@keras.saving.register_keras_serializable(package="tp_zoo")
class ColumnParallelDense(_ParallelLinear):
    """Dense layer with its kernel and bias split on the output dim.

    The output stays split on its last dim (what a following
    `RowParallelDense` wants) unless `gather_output=True`. An activation
    here must be elementwise, since each device sees only its columns.
    """

    equation = "...i,io->...o"
    kernel_layout = (None, M)
    bias_layout = (M,)
    in_trailing = (None,)
    split_axis = 1

    def __init__(self, units, activation=None, use_bias=True, gather_output=False, **kwargs):
        super().__init__(activation=activation, use_bias=use_bias, **kwargs)
        self.units = units
        self.gather_output = gather_output
        self.out_trailing = (None,) if gather_output else (M,)
        if gather_output:
            if self.padding is not None:
                raise ValueError(f"{self.name}: a gathered output pads itself (to a multiple of tp); give no padding.")
            # Gathered, then cut back to `units`: nothing outside sees this padding.
            self.padding = AxisPadding.trailing(units, round_up(units, self.tp))
        padded_units = units if self.padding is None else self.padding.size
        check_divisible(self.name, "units", padded_units, self.tp, _PAD_WITH_CONSUMER)
        self.bias_shape = (padded_units,)
        self.output_trailing_shape = (units if gather_output else padded_units,)

    def kernel_shape(self, in_dim):
        return (in_dim, self.bias_shape[0])

    def local_apply(self, weights, x):
        y = super().local_apply(weights, x)
        return parallel.all_gather(y, axis=-1)[..., : self.units] if self.gather_output else y

    def get_config(self):
        config = {**super().get_config(), "units": self.units, "gather_output": self.gather_output}
        if self.gather_output:  # tp's own padding, made again at the tp it is rebuilt under
            del config["padding"]
        return config


@keras.saving.register_keras_serializable(package="tp_zoo")
class RowParallelDense(_ParallelLinear):
    """Dense layer with its kernel split on the input dim.

    Takes an input split on its last dim (a column-parallel output; a
    replicated input is sliced locally), all-reduces the partial products
    and adds the replicated bias once, after the all-reduce.
    """

    equation = "...i,io->...o"
    reduces = True
    kernel_layout = (M, None)
    bias_layout = (None,)
    in_trailing = (M,)
    out_trailing = (None,)
    split_axis = 0

    def __init__(self, units, activation=None, use_bias=True, **kwargs):
        super().__init__(activation=activation, use_bias=use_bias, **kwargs)
        self.units = units
        self.bias_shape = (units,)
        self.output_trailing_shape = (units,)

    def kernel_shape(self, in_dim):
        check_divisible(self.name, "input dim", in_dim, self.tp, _PAD_UPSTREAM)
        return (in_dim, self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class _FusedColumnDense(_ParallelLinear):
    """Several column-parallel projections of one input as one kernel, laid
    out so that each device's shard holds its slice of every projection
    side by side: one product per device where there were several (vLLM's
    QKVParallelLinear / MergedColumnParallelLinear). Each projection is a
    `Part` of the kernel (and of the bias, int8 values and scale):
    checkpoints load it, get/set_weights and export show it, and LoRA adapts
    it as the variable of a separate layer.

    Subclasses set `out_shape` (the padded output dims), `out_layout`,
    `out_padding` (an `AxisPadding` or None per output dim), `fused_axis`
    (the output dim the parts sit along) and `parts` (layer name, size along
    that dim, and the part's own output shape, padding and layout).
    """

    in_trailing = (None,)

    def _setup(self):
        letters = "abcdefgh"[: len(self.out_shape)]
        self.equation = f"...z,z{letters}->...{letters}"
        self.kernel_layout = (None,) + tuple(self.out_layout)
        self.bias_layout = tuple(self.out_layout)
        self.out_trailing = tuple(self.out_layout)
        self.bias_shape = tuple(self.out_shape)
        self.output_trailing_shape = tuple(self.out_shape)

    def kernel_shape(self, in_dim):
        return (in_dim,) + self.bias_shape

    def _padding(self, rank):
        return (None,) * (rank - len(self.out_shape)) + tuple(self.out_padding)

    @property
    def part_names(self):
        """The projections this layer fuses, in kernel order."""
        return [name for name, *_ in self.parts]

    def parts_of(self, kernel_shape, kernel=False):
        whole = lambda n: AxisPadding.trailing(n, n)
        lead = (kernel_shape[0],) if kernel else ()
        parts = tuple(
            Part(name, size, lead + tuple(shape), tuple(map(whole, lead)) + tuple(padding),
                 (None,) * len(lead) + tuple(layout))
            for name, size, shape, padding, layout in self.parts
        )
        return Fused(len(lead) + self.fused_axis, parts)


@keras.saving.register_keras_serializable(package="tp_zoo")
class QKVParallelDense(_FusedColumnDense):
    """hidden -> queries, keys and values in one product: kernel (hidden,
    kv heads, 2 + query heads per kv head, head_dim), each kv head's key,
    value and its group of query heads side by side, split on the kv heads.

    `padding` is the query heads' `AxisPadding` (kv heads as groups, the
    query heads of each as group entries; see `ParallelAttention`): the
    kv heads are padded at their end and each group at its end, behind the
    key and value. `replicated=True` keeps the kernel whole on every device
    (kv heads fewer than tp: each device then cuts out its kv head and its
    query heads, `take_group`). The parts are "key", "value" and "query",
    each a kernel of shape (hidden, heads, head_dim).
    """

    fused_axis = 1

    def __init__(self, head_dim, padding, use_bias=True, replicated=False, **kwargs):
        super().__init__(use_bias=use_bias, padding=padding, **kwargs)
        q = self.padding
        self.padding = None  # several dims are padded: see out_padding
        self.query_padding = q
        self.head_dim = head_dim
        self.replicated = replicated
        heads = None if replicated else M
        if not replicated:
            check_divisible(self.name, "kv heads", q.padded_groups, self.tp)
        kv_padding = AxisPadding.trailing(q.groups, q.padded_groups)
        whole = AxisPadding.trailing(head_dim, head_dim)
        self.out_shape = (q.padded_groups, 2 + q.padded_group_size, head_dim)
        self.out_layout = (heads, None, None)
        self.out_padding = (kv_padding, AxisPadding.trailing(2 + q.group_size, 2 + q.padded_group_size), None)
        kv_part = ((q.padded_groups, head_dim), (kv_padding, whole), (heads, None))
        self.parts = (
            ("key", 1) + kv_part,
            ("value", 1) + kv_part,
            ("query", q.padded_group_size, (q.size, head_dim), (q, whole), (heads, None)),
        )
        self._setup()

    def split(self, y):
        """(queries, keys, values) of a local output (..., kv heads, 2 + group, head_dim):
        (..., kv heads x group, head_dim) and (..., kv heads, head_dim) twice."""
        q = y[..., 2:, :]
        return q.reshape(q.shape[:-3] + (-1, self.head_dim)), y[..., 0, :], y[..., 1, :]

    @staticmethod
    def take_group(kernel, bias, kv_head, first_query, queries):
        """Of a replicated local kernel (float or `QuantizedKernel`) and bias
        (or None): kv head `kv_head`'s key and value and its query heads
        [first_query, first_query + queries), what one device computes."""

        def cut(a, axis):  # axis: the kv-head dim of `a`
            a = jax.lax.dynamic_slice_in_dim(a, kv_head, 1, axis=axis)
            kv = jax.lax.slice_in_dim(a, 0, 2, axis=axis + 1)
            q = jax.lax.dynamic_slice_in_dim(a, 2 + first_query, queries, axis=axis + 1)
            return jnp.concatenate([kv, q], axis=axis + 1)

        if isinstance(kernel, q8.QuantizedKernel):  # output-major values: the kv heads first
            kernel = q8.QuantizedKernel(cut(kernel.values, 0), cut(kernel.scale, 0))
        else:
            kernel = cut(kernel, 1)
        return kernel, (None if bias is None else cut(bias, 0))

    def get_config(self):
        return {
            **super().get_config(),
            "head_dim": self.head_dim,
            "padding": list(self.query_padding),
            "replicated": self.replicated,
        }


@keras.saving.register_keras_serializable(package="tp_zoo")
class MergedColumnParallelDense(_FusedColumnDense):
    """hidden -> several projections of `units` each (an MLP's gate and up)
    in one product: kernel (hidden, len(names), units), split on the units.
    `padding` pads the units (at their end), as for `ColumnParallelDense`."""

    fused_axis = 0

    def __init__(self, units, names=("gate", "up"), use_bias=True, **kwargs):
        super().__init__(use_bias=use_bias, **kwargs)
        self.units = units
        self.names = tuple(names)
        padding = self.padding or AxisPadding.trailing(units, units)
        self.padding = None
        self.units_padding = padding
        check_divisible(self.name, "units", padding.size, self.tp, _PAD_WITH_CONSUMER)
        self.out_shape = (len(self.names), padding.size)
        self.out_layout = (None, M)
        self.out_padding = (None, padding)
        self.parts = tuple((name, 1, (padding.size,), (padding,), (M,)) for name in self.names)
        self._setup()

    def split(self, y):
        """Each projection's local output (..., units) of a local output (..., parts, units)."""
        return tuple(y[..., i, :] for i in range(len(self.names)))

    def get_config(self):
        config = {**super().get_config(), "units": self.units, "names": list(self.names)}
        if self.units_padding.is_padded:
            config["padding"] = list(self.units_padding)
        return config


@keras.saving.register_keras_serializable(package="tp_zoo")
class HeadMergeDense(_ParallelLinear):
    """(heads, head_dim) -> hidden, row-parallel over heads."""

    equation = "...nh,nhd->...d"
    reduces = True
    kernel_layout = (M, None, None)
    bias_layout = (None,)
    in_trailing = (M, None)
    out_trailing = (None,)
    split_axis = 0

    def __init__(self, units, use_bias=True, **kwargs):
        super().__init__(use_bias=use_bias, **kwargs)
        self.units = units
        self.bias_shape = (units,)
        self.output_trailing_shape = (units,)

    def kernel_shape(self, in_dim):
        heads, head_dim = in_dim
        check_divisible(self.name, "heads", heads, self.tp, _PAD_UPSTREAM)
        return (heads, head_dim, self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units}
